"""Resume and training-loop rules that a single CPU process would not otherwise show: each process restores its
own RNG state, a checkpoint of another data order is refused, and the loop clips gradients and switches autocast
as the solver says."""

from pathlib import Path

import pytest
import torch
from torch import nn

import detectors.engine.train as engine
from detectors.config import load_config
from detectors.engine.checkpoint import CheckpointError, rng_state, save_checkpoint

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
    assert engine._resume(tmp_path, *parts, cfg) == 4
    assert torch.equal(torch.get_rng_state(), states[rank]["torch"])


def test_a_checkpoint_of_another_data_order_is_refused(tmp_path):
    cfg = load_config(CONFIG, ["solver.max_iter=8"])
    parts = _solver_parts(cfg)
    _two_process_checkpoint(tmp_path, cfg, parts, {"seed": cfg.seed, "world_size": 2})
    with pytest.raises(CheckpointError, match=r"written with data order \{'seed': 0, 'world_size': 2\}"):
        engine._resume(tmp_path, *parts, cfg)
    _two_process_checkpoint(tmp_path, cfg, parts, {"seed": cfg.seed + 1, "world_size": 1})
    with pytest.raises(CheckpointError, match="data order"):
        engine._resume(tmp_path, *parts, cfg)


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

    monkeypatch.setattr(engine.nn.utils, "clip_grad_norm_", spy)
    engine.train(_tiny(tmp_path, "solver.clip_grad_norm=1e-3"), tmp_path / "clipped")
    assert [n for n, _ in norms_after] == [1e-3, 1e-3]  # every iteration
    assert all(total <= 1e-3 * 1.01 for _, total in norms_after)
    norms_after.clear()
    engine.train(_tiny(tmp_path, "solver.clip_grad_norm=0"), tmp_path / "unclipped")
    assert norms_after == []


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
