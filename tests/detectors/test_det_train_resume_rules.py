"""Resume and training-loop rules that a single CPU process would not otherwise show: each process restores its
own RNG state, a checkpoint of another data order is refused, and the loop clips gradients and switches autocast
as the solver says."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import detectors.engine.train as engine
from detectors.config import load_config
from detectors.engine.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "shapes_tiny.yaml"


def _solver_parts(cfg):
    model = nn.Linear(3, 2)
    optimizer = engine.build_optimizer(cfg.solver, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: engine.lr_factor(cfg.solver, it))
    return model, optimizer, scheduler


def _two_process_checkpoint(out, cfg, parts, data):
    """A checkpoint at iteration 4 with one RNG state per process, rank 1's drawn after reseeding."""
    model, optimizer, scheduler = parts
    torch.manual_seed(10)
    rank0 = rng_state()
    torch.manual_seed(11)
    rank1 = rng_state()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "iteration": 4, "rng": [rank0, rank1], "data": data,
             "solver": {k: getattr(cfg.solver, k) for k in engine._STATE_SHAPING}, "meta": {}}
    save_checkpoint(out, "model_0000004.pth", state)
    return rank0, rank1


@pytest.mark.parametrize("rank", [0, 1])
def test_each_process_resumes_its_own_rng_state(tmp_path, monkeypatch, rank):
    cfg = load_config(CONFIG, ["solver.max_iter=8"])
    parts = _solver_parts(cfg)
    states = _two_process_checkpoint(tmp_path, cfg, parts, engine._data_order(cfg))
    monkeypatch.setattr(engine, "get_rank", lambda: rank)
    torch.manual_seed(99)
    assert engine._resume(engine._resume_checkpoint(tmp_path, cfg), *parts, cfg) == 4
    assert torch.equal(torch.get_rng_state(), states[rank]["torch"])


def test_resume_continues_the_schedule_where_the_checkpoint_left_it(tmp_path):
    """shapes_tiny warms up over 100 iterations from 0.001 of base_lr=0.002: after 4 steps the resumed optimiser
    is at iteration 4 of the warm-up, and its next step at iteration 5, not back at the start."""
    cfg = load_config(CONFIG, ["solver.max_iter=8"])
    model, optimizer, scheduler = parts = _solver_parts(cfg)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    _two_process_checkpoint(tmp_path, cfg, parts, engine._data_order(cfg))
    model, optimizer, scheduler = fresh = _solver_parts(cfg)
    assert engine._resume(engine._resume_checkpoint(tmp_path, cfg), *fresh, cfg) == 4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.002 * (0.001 * 0.96 + 0.04))
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.002 * (0.001 * 0.95 + 0.05))


@pytest.mark.parametrize("deterministic", [False, True])
def test_the_runtime_seeds_each_process_with_seed_plus_rank(monkeypatch, deterministic):
    """detectron2's seed + rank, in Python's, NumPy's and torch's generators; the config's thread count; cuDNN
    autotuning only where reproducible kernels are not asked for, and TF32 off."""
    import random

    import numpy as np

    cfg = load_config(CONFIG, ["seed=5", "device=cpu", "num_threads=3", f"deterministic={str(deterministic).lower()}"])
    threads = []
    monkeypatch.setattr(engine, "get_rank", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    for flag in ("benchmark", "deterministic"):  # restored after the test; every run turns TF32 off
        monkeypatch.setattr(torch.backends.cudnn, flag, getattr(torch.backends.cudnn, flag))
    assert engine.setup_runtime(cfg) == torch.device("cpu")
    assert torch.initial_seed() == 7 and threads == [3]
    assert random.random() == random.Random(7).random()
    assert np.random.rand() == np.random.RandomState(7).rand()
    assert torch.backends.cudnn.benchmark is not deterministic and torch.backends.cudnn.deterministic is deterministic
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_a_checkpoint_of_other_parameter_groups_is_refused(tmp_path):
    """Same solver settings, but the bias trainable then and frozen now: the groups of [1, 1] parameters would not
    load into one group of 1 (torch's ValueError)."""
    cfg = load_config(CONFIG, ["solver.max_iter=8"])
    _two_process_checkpoint(tmp_path, cfg, _solver_parts(cfg), engine._data_order(cfg))
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    optimizer = engine.build_optimizer(cfg.solver, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: engine.lr_factor(cfg.solver, it))
    with pytest.raises(CheckpointError, match=r"parameter groups of \[1, 1\] parameters \(config: \[1\]\)"):
        engine._resume(engine._resume_checkpoint(tmp_path, cfg), model, optimizer, scheduler, cfg)


def test_a_checkpoint_of_another_data_order_is_refused(tmp_path):
    cfg = load_config(CONFIG, ["solver.max_iter=8"])
    parts = _solver_parts(cfg)
    _two_process_checkpoint(tmp_path, cfg, parts, {"seed": cfg.seed, "world_size": 2})
    with pytest.raises(CheckpointError, match=r"written with data order \{'seed': 0, 'world_size': 2\}"):
        engine._resume_checkpoint(tmp_path, cfg)
    _two_process_checkpoint(tmp_path, cfg, parts, {"seed": cfg.seed + 1, "world_size": 1})
    with pytest.raises(CheckpointError, match=r"data order \{'seed': 1, 'world_size': 1\}, this run's is \{'seed': 0, "
                                              r"'world_size': 1\} \(seed, processes\)"):
        engine._resume_checkpoint(tmp_path, cfg)


def test_cli_refuses_a_checkpoint_of_another_data_order_before_making_data(tmp_path, capsys):
    """What the config alone decides is checked before the data is read or generated: nothing but the log is
    added to the folder."""
    from detectors.cli import main

    cfg = load_config(CONFIG, ["solver.max_iter=8"])
    _two_process_checkpoint(tmp_path, cfg, _solver_parts(cfg), {"seed": cfg.seed + 1, "world_size": 1})
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["train", "--resume", "--config", str(CONFIG), "--output-dir", str(tmp_path), "--set",
                 f"data.shapes.root={tmp_path / 'data'}", "--set", "solver.max_iter=8"])
    assert code == 2 and "data order" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["log.txt"])


def test_a_checkpoint_of_weights_alone_is_refused_by_name(tmp_path):
    """A bare state dict, or converted weights with their metadata, that the folder's last_checkpoint names (copied
    in by hand): CheckpointError saying what is missing, not the KeyError of the first field read."""
    cfg = load_config(CONFIG, ["solver.max_iter=8"])
    parts = _solver_parts(cfg)
    for weights in (parts[0].state_dict(), {"model": parts[0].state_dict(), "meta": {"num_classes": 2}}):
        save_checkpoint(tmp_path, "model_final.pth", weights)
        with pytest.raises(CheckpointError, match=r"model_final.pth is not a training checkpoint \((model, )?"
                                                  r"optimizer, scheduler, iteration, rng, data missing\)"):
            engine._resume_checkpoint(tmp_path, cfg)


def _tiny(tmp_path, *extra):
    return load_config(CONFIG, [
        f"data.shapes.root={tmp_path / 'data'}", "data.shapes.num_train=8", "data.shapes.num_val=2",
        "data.num_workers=0", "model.backbone.widths=[8, 16, 16, 32]", "model.fpn_channels=32",
        "model.dyhead_channels=32", "model.dyhead_blocks=1", "solver.ims_per_batch=2", "solver.max_iter=2",
        "solver.warmup_iters=0", "solver.steps=[100]", "num_threads=1", "device=cpu", *extra])


def test_gradients_are_clipped_to_clip_grad_norm_only_when_it_is_set(tmp_path, monkeypatch):
    norms_after = []
    clip = nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        clip(parameters, max_norm, *args, **kwargs)
        norms_after.append((max_norm, torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in parameters if p.grad is not None])).item()))

    stepped = []  # the gradients' norm at each optimiser step
    build_optimizer = engine.build_optimizer

    def recording_optimizer(solver, model):
        optimizer = build_optimizer(solver, model)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: stepped.append(torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])).item()))
        return optimizer

    monkeypatch.setattr(engine.nn.utils, "clip_grad_norm_", spy)
    monkeypatch.setattr(engine, "build_optimizer", recording_optimizer)
    engine.train(_tiny(tmp_path, "solver.clip_grad_norm=1e-3"), tmp_path / "clipped")
    assert [n for n, _ in norms_after] == [1e-3, 1e-3]  # every iteration
    assert all(total <= 1e-3 * 1.01 for _, total in norms_after)
    assert len(stepped) == 2 and all(total <= 1e-3 * 1.01 for total in stepped)  # before the step
    norms_after.clear()
    stepped.clear()
    engine.train(_tiny(tmp_path, "solver.clip_grad_norm=0"), tmp_path / "unclipped")
    assert norms_after == [] and len(stepped) == 2 and all(total > 1e-2 for total in stepped)


@pytest.mark.parametrize("amp", [False, True])
def test_the_training_forward_runs_under_autocast_as_solver_amp_says(tmp_path, monkeypatch, amp):
    switched = []
    autocast = engine.autocast

    def spy(device, enabled):
        switched.append(enabled)
        return autocast(device, enabled)

    monkeypatch.setattr(engine, "autocast", spy)
    engine.train(_tiny(tmp_path, f"solver.amp={str(amp).lower()}"), tmp_path / "out")
    assert switched == [amp, amp]


def _recording_run(tmp_path, monkeypatch, *extra):
    """Trains `_tiny` with the extra settings, recording each training forward's losses, the learning rates of
    each optimiser step, one weight's gradient from each backward pass and at each step, and each evaluation's
    output folder (a stub: no detections are computed)."""
    seen = {"losses": [], "lrs": [], "backward": [], "stepped": [], "evaluations": []}
    build_detector, build_optimizer = engine.build_detector, engine.build_optimizer

    def recording_detector(*args, **kwargs):
        model = build_detector(*args, **kwargs)

        def hook(module, inputs, losses):
            if module.training:
                seen["losses"].append({k: v.item() for k, v in losses.items()})

        model.register_forward_hook(hook)
        return model

    def recording_optimizer(solver, model):
        optimizer = build_optimizer(solver, model)
        weight = next(p for p in model.parameters() if p.requires_grad)
        weight.register_hook(lambda grad: seen["backward"].append(grad.clone()))  # this iteration's gradient

        def hook(opt, args, kwargs):
            seen["lrs"].append([g["lr"] for g in opt.param_groups])
            seen["stepped"].append(weight.grad.clone())

        optimizer.register_step_pre_hook(hook)
        return optimizer

    def evaluate(model, test_set, cfg, device, output_dir, category_ids):
        seen["evaluations"].append(output_dir)
        return {"bbox": {"AP": float(len(seen["evaluations"]))}}

    monkeypatch.setattr(engine, "build_detector", recording_detector)
    monkeypatch.setattr(engine, "build_optimizer", recording_optimizer)
    monkeypatch.setattr(engine, "evaluate", evaluate)
    out = tmp_path / "out"
    engine.train(_tiny(tmp_path, *extra), out)
    return out, seen


def test_the_loop_steps_the_schedule_logs_checkpoints_and_evaluates_at_its_periods(tmp_path, monkeypatch):
    """4 iterations, warm-up over 2 from 0.25, a decay by 0.1 at iteration 3; log_period 3 (and the last
    iteration), checkpoint_period 2 and eval_period 2 (the last iteration's evaluation once, the final one). A
    record holds the mean of its window's losses, their sum, and the learning rate its last iteration trained
    with (detectron2 logs it before the scheduler steps)."""
    out, seen = _recording_run(
        tmp_path, monkeypatch, "solver.max_iter=4", "solver.optimizer=sgd", "solver.base_lr=0.01",
        "solver.warmup_iters=2", "solver.warmup_factor=0.25", "solver.steps=[3]", "solver.gamma=0.1",
        "solver.log_period=3", "solver.checkpoint_period=2", "solver.eval_period=2", "solver.clip_grad_norm=0")
    used = [0.01 * 0.25, 0.01 * (0.25 * 0.5 + 0.5), 0.01, 0.01 * 0.1]
    assert [lrs[0] for lrs in seen["lrs"]] == pytest.approx(used)  # the lr each optimiser step used
    assert all(len(set(lrs)) == 1 for lrs in seen["lrs"])  # in every parameter group
    # each step follows from its own iteration's gradient, not one summed with the previous iterations'
    assert len(seen["stepped"]) == len(seen["backward"]) == 4
    assert all(torch.equal(a, b) for a, b in zip(seen["stepped"], seen["backward"]))

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["iter"] for r in steps] == [3, 4]
    names = set(seen["losses"][0])
    assert names == {"loss_cls", "loss_box", "loss_centerness"}
    for record, window, lr in ((steps[0], seen["losses"][:3], used[2]), (steps[1], seen["losses"][3:], used[3])):
        assert set(record) == names | {"iter", "loss", "lr", "time"} and record["time"] > 0
        assert record["lr"] == pytest.approx(lr)
        for name in names:
            assert record[name] == pytest.approx(sum(w[name] for w in window) / len(window), rel=1e-5)
        assert record["loss"] == pytest.approx(sum(record[name] for name in names), rel=1e-6)
    log = (out / "log.txt").read_text()
    assert "iter 3/4" in log and "iter 4/4" in log and "iter 2/4" not in log

    assert [(r["iter"], r["bbox"]["AP"]) for r in records if "bbox" in r] == [(2, 1.0), (4, 2.0)]
    assert seen["evaluations"] == [None, out]  # the final evaluation writes its results to the folder
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000002.pth", "model_final.pth"]
    assert load_checkpoint(out / "model_0000002.pth")["iteration"] == 2
    assert load_checkpoint(out / "model_final.pth")["iteration"] == 4


def test_a_loss_that_is_not_finite_stops_training_before_the_step(tmp_path, monkeypatch):
    build_detector = engine.build_detector

    def diverging_detector(*args, **kwargs):
        model = build_detector(*args, **kwargs)
        calls = []

        def hook(module, inputs, losses):
            calls.append(1)
            if len(calls) == 2:
                return {**losses, "loss_box": losses["loss_box"] * float("inf")}

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(engine, "build_detector", diverging_detector)
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match="loss is inf at iteration 1"):
        engine.train(_tiny(tmp_path, "solver.max_iter=3", "solver.checkpoint_period=1"), out)
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000001.pth"]


def test_a_batch_whose_images_all_failed_to_load_stops_training_with_its_iteration(tmp_path, monkeypatch):
    """With data.skip_bad_images, a batch of only unreadable images has no images: a DatasetError naming the
    iteration, not a failure on None inside the model."""
    from detectors.data.coco import DatasetError

    empty = {"images": None, "image_sizes": [], "targets": [], "skipped": []}
    monkeypatch.setattr(engine, "build_train_loader", lambda *args, **kwargs: [empty])
    with pytest.raises(DatasetError, match="every image of the batch at iteration 0 failed to load"):
        engine.train(_tiny(tmp_path), tmp_path / "out")


def test_a_resume_records_the_periodic_evaluation_that_a_kill_cut_short_once(tmp_path, monkeypatch):
    """The periodic evaluation of iteration 2 follows its checkpoint: a run killed during it (here the stub raises)
    resumes at that checkpoint and must evaluate iteration 2 again, else its record is lost; a resume there whose
    record was written does not evaluate it twice."""
    class Killed(Exception):
        pass

    evaluations = []

    def evaluate(model, test_set, cfg, device, output_dir, category_ids):
        evaluations.append(output_dir)
        if len(evaluations) == 1:
            raise Killed
        return {"bbox": {"AP": float(len(evaluations))}}

    monkeypatch.setattr(engine, "evaluate", evaluate)
    out = tmp_path / "out"
    settings = ("solver.max_iter=4", "solver.log_period=2", "solver.checkpoint_period=2", "solver.eval_period=2")
    with pytest.raises(Killed):
        engine.train(_tiny(tmp_path, *settings), out)
    assert (out / "last_checkpoint").read_text() == "model_0000002.pth"

    def evaluation_records():
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["iter"], r["bbox"]["AP"] if "bbox" in r else None) for r in records]

    engine.train(_tiny(tmp_path, *settings), out, resume=True)
    assert evaluation_records() == [(2, None), (2, 2.0), (4, None), (4, 3.0)]
    (out / "last_checkpoint").write_text("model_0000002.pth")
    engine.train(_tiny(tmp_path, *settings), out, resume=True)
    assert evaluation_records() == [(2, None), (2, 2.0), (4, None), (4, 4.0)]
    assert evaluations == [None, None, out, out]
