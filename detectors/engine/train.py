"""The training loop: optimiser, schedule, checkpoints, logging, periodic and final evaluation."""

from __future__ import annotations

import bisect
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..backbones import prepare_backbone_weights
from ..build import build_detector
from ..config import Config, ConfigError, SolverConfig, config_to_dict
from ..data.build import build_dataset, build_train_loader
from ..data.coco import DatasetError
from .checkpoint import (CheckpointError, forget_last_checkpoint, last_checkpoint, load_checkpoint,
                         load_matching_state, remove_partial_writes, rng_state, save_checkpoint, set_rng_state)
from .distributed import (
    all_gather_objects,
    barrier,
    broadcast_buffers,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
    sum_across_processes,
)
from .evaluate import BadImageLog, autocast, check_categories, evaluate
from .logger import MetricsWriter, setup_logging
from .stop import StopSignals, TrainingInterrupted

__all__ = ["FINAL_CHECKPOINT", "setup_runtime", "build_optimizer", "lr_factor", "train"]

logger = logging.getLogger("detectors.train")

_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.SyncBatchNorm)
# Solver settings that shape the optimiser's state: a checkpoint only resumes under the same ones.
_STATE_SHAPING = ("optimizer", "decay_groups")

# What resuming reads of a checkpoint (`_checkpoint_state` writes them all)
_RESUMED = ("model", "optimizer", "scheduler", "iteration", "rng", "data")

FINAL_CHECKPOINT = "model_final.pth"  # the checkpoint of the last iteration, written before the final evaluation


def setup_runtime(cfg: Config) -> torch.device:
    """Joins the process group, then sets threads, seeds (``seed + rank``) and the cuDNN/TF32 switches from ``cfg``.

    TF32 stays off so that fp32 parts of the model (the losses, anything outside autocast) keep fp32
    accuracy; cuDNN autotuning is on unless ``deterministic`` asks for reproducible kernels.
    """
    device = init_distributed(cfg.device)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    # Each process its own stream (detectron2 seeds with seed + rank): Faster R-CNN's proposal sampling would
    # otherwise draw the same choices on every process. The models still start equal: DDP broadcasts rank 0's.
    seed = cfg.seed + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = not cfg.deterministic
    torch.backends.cudnn.deterministic = cfg.deterministic
    return device


def _decay_group(module: nn.Module, name: str, full_name: str, decay_groups: str) -> str:
    if decay_groups == "by_name":
        return "bias" if "bias" in full_name else "decay"
    if isinstance(module, _NORMS):
        return "norm"
    return "bias" if name == "bias" else "decay"


def build_optimizer(cfg: SolverConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over the trainable parameters, in weight-decay groups as ``cfg.decay_groups`` says.

    ``by_type`` (detectron2's ``get_default_optimizer_params``): ``weight_decay_norm`` on the weights and biases
    of normalisation layers, ``weight_decay_bias`` on other biases, ``weight_decay`` on the rest. ``by_name``
    (microsoft/DynamicHead's ``train_net.py``): ``weight_decay_bias`` on every parameter whose name contains
    "bias" (Swin's relative position bias tables included), ``weight_decay`` on the rest, norms included.
    """
    if cfg.decay_groups not in ("by_type", "by_name"):
        raise ValueError(f"unknown solver.decay_groups {cfg.decay_groups!r}; expected by_type or by_name")
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "norm": [], "bias": []}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{name}" if module_name else name
            groups[_decay_group(module, name, full_name, cfg.decay_groups)].append(param)
    decay = {"decay": cfg.weight_decay, "norm": cfg.weight_decay_norm, "bias": cfg.weight_decay_bias}
    params = [{"params": p, "weight_decay": decay[k]} for k, p in groups.items() if p]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.base_lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.base_lr, betas=tuple(cfg.betas))
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected sgd or adamw")


def lr_factor(cfg: SolverConfig, iteration: int) -> float:
    """Learning-rate multiplier at ``iteration``: linear warm-up from ``warmup_factor`` times multi-step decay."""
    factor = cfg.gamma ** bisect.bisect_right(cfg.steps, iteration)
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _evaluation_model(model: nn.Module) -> nn.Module:
    """The model every process evaluates: the checkpoint's, rank 0's. DDP hands rank 0's buffers to the others
    before each training forward, which then updates each process's running statistics from its own batch."""
    model = _unwrap(model)
    broadcast_buffers(model)
    return model


def _to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def _data_order(cfg: Config) -> dict[str, int]:
    return {"seed": cfg.seed, "world_size": get_world_size()}


class _LogWindow:
    """The loss sums and iterations since the last metrics record, and their seconds of training."""

    def __init__(self, sums: dict[str, torch.Tensor] | None = None, iterations: int = 0, seconds: float = 0.0):
        self.sums, self.iterations = sums or {}, iterations
        self.start = time.perf_counter() - seconds

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach()  # no host sync until the next record
        self.iterations += 1

    def state(self) -> dict:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "iterations": self.iterations,
                "seconds": time.perf_counter() - self.start}


def _checkpoint_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, iteration: int, cfg: Config, meta: dict,
    window: _LogWindow,
) -> dict:
    """Everything a bit-identical resume needs; the RNG states and log windows of all processes are gathered
    (collective). With the window, a run stopped between two metrics records still gives the next one the mean
    over all of its iterations."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "rng": all_gather_objects(rng_state()),
        "log_window": all_gather_objects(window.state()),
        "data": _data_order(cfg),
        "solver": {k: getattr(cfg.solver, k) for k in _STATE_SHAPING},
        "meta": meta,
    }


def _save(output_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, done: int, cfg: Config,
          meta: dict, window: _LogWindow) -> Path:
    """Writes the checkpoint of iteration ``done`` from the main process (every process takes part); its path."""
    state = _checkpoint_state(_unwrap(model), optimizer, scheduler, done, cfg, meta, window)
    name = FINAL_CHECKPOINT if done == cfg.solver.max_iter else f"model_{done:07d}.pth"
    if is_main_process():
        save_checkpoint(output_dir, name, state)
    barrier()
    return output_dir / name


def _check_solver_state(optimizer: torch.optim.Optimizer, scheduler, state: dict, cfg: Config,
                        checkpoint: Path) -> None:
    """Refuses a checkpoint whose optimiser state does not fit ``optimizer`` (another solver.optimizer or
    solver.decay_groups), and warns about settings the checkpoint overrides: loading restores its learning rates
    and group settings (weight decay, momentum...), whatever the config now says, as detectron2 does."""
    written = state.get("solver", {})
    differ = [f"solver.{k}={v} (config: {getattr(cfg.solver, k)})" for k, v in written.items()
              if getattr(cfg.solver, k) != v]
    saved, own = state["optimizer"]["param_groups"], optimizer.param_groups
    if not differ and [len(g["params"]) for g in saved] != [len(g["params"]) for g in own]:
        differ = [f"parameter groups of {[len(g['params']) for g in saved]} parameters (config: "
                  f"{[len(g['params']) for g in own]})"]
    if differ:
        raise CheckpointError(f"{checkpoint} was written with {'; '.join(differ)}: resume with the same")
    ignored = [f"{k} {g_saved[k]} (config: {g_own[k]})" for g_saved, g_own in zip(saved, own)
               for k in g_own.keys() & g_saved.keys() - {"params", "lr", "initial_lr"} if g_saved[k] != g_own[k]]
    if state["scheduler"].get("base_lrs", scheduler.base_lrs) != scheduler.base_lrs:
        ignored.insert(0, f"base learning rates {state['scheduler']['base_lrs']} (config: {scheduler.base_lrs})")
    if ignored:
        logger.warning("%s keeps its solver settings over the config's: %s", checkpoint,
                       "; ".join(dict.fromkeys(ignored)))


def _resume_checkpoint(output_dir: Path, cfg: Config) -> tuple[Path, dict] | None:
    """The last checkpoint of ``output_dir`` and its state, checked for what the config alone decides: it holds a
    training state, of the same data order, at an iteration within max_iter. None when the folder has none. Read
    before the data, which a refused checkpoint would otherwise wait for (COCO's annotations, a shapes set to
    generate)."""
    checkpoint = last_checkpoint(output_dir)
    if checkpoint is None:
        logger.warning("--resume: no checkpoint in %s, starting from scratch", output_dir)
        return None
    state = load_checkpoint(checkpoint)
    missing = [key for key in _RESUMED if key not in state]
    if missing:
        raise CheckpointError(f"{checkpoint} is not a training checkpoint ({', '.join(missing)} missing): weights "
                              "alone cannot be resumed; train without --resume to start afresh")
    if state["data"] != _data_order(cfg):
        raise CheckpointError(f"{checkpoint} was written with data order {state['data']}, this run's is "
                              f"{_data_order(cfg)} (seed, processes): resuming needs the same")
    if state["iteration"] > cfg.solver.max_iter:
        raise CheckpointError(f"{checkpoint} is at iteration {state['iteration']}, past solver.max_iter="
                              f"{cfg.solver.max_iter}: resume with a max_iter of at least that")
    return checkpoint, state


def _resume(found: tuple[Path, dict] | None, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
            cfg: Config) -> int:
    """Restores `_resume_checkpoint`'s checkpoint in place; returns its iteration (0 when there is none)."""
    if found is None:
        return 0
    checkpoint, state = found
    load_matching_state(model, state["model"], checkpoint)
    _check_solver_state(optimizer, scheduler, state, cfg, checkpoint)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][get_rank()])
    logger.info("resumed from %s at iteration %d", checkpoint, state["iteration"])
    return state["iteration"]


def _evaluates_periodically(solver: SolverConfig, done: int) -> bool:
    """Whether the periodic evaluation follows iteration ``done`` (the last one's is the final evaluation)."""
    return solver.eval_period > 0 and done % solver.eval_period == 0 and done < solver.max_iter


def _resumed_window(found: tuple[Path, dict] | None, device: torch.device) -> _LogWindow:
    """This process's log window in `_resume_checkpoint`'s checkpoint; an empty one when there is none, or for a
    checkpoint written before windows were kept."""
    windows = found[1].get("log_window") if found is not None else None
    if windows is None:
        return _LogWindow()
    window = windows[get_rank()]
    return _LogWindow({k: v.to(device) for k, v in window["sums"].items()}, window["iterations"], window["seconds"])


def train(cfg: Config, output_dir: Path, resume: bool = False) -> dict:
    """Trains the detector ``cfg`` describes and evaluates it on the test split.

    Writes to ``output_dir``: ``config.yaml``, ``log.txt``, ``metrics.jsonl`` (every ``log_period`` iterations
    the mean losses since the last record and the lr its last iteration trained with; evaluations),
    ``model_XXXXXXX.pth`` every ``checkpoint_period`` iterations and ``model_final.pth``, ``metrics.json`` and
    ``coco_instances_results.json``. With ``resume`` it continues from ``last_checkpoint`` with the same results
    as an uninterrupted run. A first SIGINT or SIGTERM (on any process) stops it after the current iteration with
    a checkpoint (`stop.StopSignals`).

    Returns:
        The final metrics on the main process (``{"bbox": {...}}``), an empty dict on the others.

    Raises:
        TrainingInterrupted: stopped on a signal; no final evaluation.
    """
    output_dir = Path(output_dir)
    device = setup_runtime(cfg)
    main = is_main_process()
    setup_logging(output_dir, main)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
    solver = cfg.solver
    prepare_backbone_weights(cfg.model.backbone)  # a bad weights setting fails now, not after the data is read
    resumed = _resume_checkpoint(output_dir, cfg) if resume else None
    if not main:
        barrier()  # the main process generates the synthetic set, if needed, before the others read it
    train_set = build_dataset(cfg, train=True)
    test_set = build_dataset(cfg, train=False)
    if main:
        barrier()
    num_classes = cfg.model.num_classes or len(train_set.category_ids)
    if num_classes < len(train_set.category_ids):
        raise ConfigError(f"model.num_classes={num_classes} is less than the {len(train_set.category_ids)} "
                          f"categories of {train_set.ann_file}; leave it null to take their count")
    model = build_detector(cfg.model, num_classes).to(device)
    optimizer = build_optimizer(solver, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(solver, it))
    meta = {"class_names": train_set.class_names, "category_ids": train_set.category_ids, "num_classes": num_classes}
    if main:
        check_categories(train_set.category_ids, test_set)

    start_iter = _resume(resumed, model, optimizer, scheduler, cfg)
    if is_distributed():
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    loader = build_train_loader(cfg, train_set, get_rank(), get_world_size(), start_batch=start_iter)
    metrics_log = None
    if main:
        # Only now that the data, the model and the checkpoint have loaded: a run that fails to start leaves the
        # folder's earlier run (its config, its resume pointer, its metrics) as it was.
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        earlier = None if resume else forget_last_checkpoint(output_dir)
        if earlier is not None:
            logger.warning("%s holds an earlier run (last checkpoint %s): starting from scratch, its files are "
                           "replaced as this run writes its own (--resume continues it instead)", output_dir, earlier)
        # A checkpoint of an iteration this run may not write again (a stop's) would keep its temporary for good
        partial = remove_partial_writes(output_dir, "model_*.pth")
        if partial:
            logger.info("removed %s: checkpoint writes that a kill cut short", ", ".join(partial))
        metrics_log = MetricsWriter(output_dir / "metrics.jsonl", resume_from=start_iter if resume else None,
                                    redo_evaluation=start_iter == solver.max_iter)
    logger.info(
        "training %d images (%d classes) for %d iterations of %d images on %s x %d",
        len(train_set), num_classes, solver.max_iter, solver.ims_per_batch, device, get_world_size(),
    )
    bad_images = BadImageLog(logger)
    model.train()
    progress = tqdm(
        total=solver.max_iter, initial=start_iter, disable=not main, dynamic_ncols=True, desc="train"
    )

    def evaluate_periodically(done: int) -> None:
        metrics = evaluate(_evaluation_model(model), test_set, cfg, device, None, train_set.category_ids)
        if main:
            metrics_log.write({"iter": done, **metrics})

    # The periodic evaluation comes after its iteration's checkpoint: a kill during it lost its record. The main
    # process's metrics tell whether it did, for all processes (the evaluation is collective).
    if resumed is not None and _evaluates_periodically(solver, start_iter) and all_gather_objects(
            main and start_iter not in metrics_log.evaluated)[0]:
        evaluate_periodically(start_iter)
    window = _resumed_window(resumed, device)
    batches = iter(loader)
    with StopSignals() as stop:
        for iteration in range(start_iter, solver.max_iter):
            batch = next(batches)
            bad_images.update(batch["skipped"])
            if batch["images"] is None:
                raise DatasetError(f"every image of the batch at iteration {iteration} failed to load")
            with autocast(device, solver.amp):
                losses = model(batch["images"].to(device), batch["image_sizes"], _to_device(batch["targets"], device))
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at iteration {iteration}: {losses}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if solver.clip_grad_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), solver.clip_grad_norm)
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]  # the one this iteration trained with, logged (as detectron2 does)
            scheduler.step()

            window.add(losses)
            done = iteration + 1
            progress.update(1)
            if done % solver.log_period == 0 or done == solver.max_iter:
                names = sorted(window.sums)
                stats = torch.stack([window.sums[k] / window.iterations for k in names])
                stats = (sum_across_processes(stats) / get_world_size()).tolist()
                record = dict(zip(names, stats))
                record["loss"] = sum(stats)
                seconds = (time.perf_counter() - window.start) / window.iterations
                record.update(iter=done, lr=lr, time=seconds)
                progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2g}")
                if main:
                    metrics_log.write(record)
                    eta = seconds * (solver.max_iter - done)
                    logger.info(
                        "iter %d/%d  loss %.4f (%s)  lr %.3g  %.3fs/it  eta %s",
                        done, solver.max_iter, record["loss"],
                        ", ".join(f"{k} {record[k]:.3f}" for k in names),
                        record["lr"], seconds, time.strftime("%H:%M:%S", time.gmtime(eta)),
                    )
                window = _LogWindow()
            saved = None
            if done % solver.checkpoint_period == 0 or done == solver.max_iter:
                saved = _save(output_dir, model, optimizer, scheduler, done, cfg, meta, window)
            if _evaluates_periodically(solver, done):
                evaluate_periodically(done)
            signum = stop.requested(device)
            if signum is not None:
                saved = saved or _save(output_dir, model, optimizer, scheduler, done, cfg, meta, window)
                progress.close()
                logger.warning("stopped after iteration %d/%d; %s holds it: continue with --resume", done,
                               solver.max_iter, saved)
                raise TrainingInterrupted(done, signum, saved)
    progress.close()
    metrics = evaluate(_evaluation_model(model), test_set, cfg, device, output_dir, train_set.category_ids)
    if main:
        metrics_log.write({"iter": solver.max_iter, **metrics})
    return metrics
