"""Weight-decay groups of the optimiser (detectron2's by module type, the release's by name) and the schedule."""

import pytest
import torch
from torch import nn

from detectors.config import SolverConfig
from detectors.engine.train import build_optimizer, lr_factor


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))  # a weight whose name says "bias"
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _decay_of(optimizer, model):
    by_id = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    return {name: by_id.get(id(p)) for name, p in model.named_parameters()}


def _solver(**changes):
    return SolverConfig(weight_decay=1.0, weight_decay_norm=2.0, weight_decay_bias=3.0, **changes)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_by_type_is_detectron2s_grouping(optimizer):
    model = _Toy()
    decay = _decay_of(build_optimizer(_solver(optimizer=optimizer, decay_groups="by_type"), model), model)
    assert decay == {
        "conv.weight": 1.0, "conv.bias": 3.0,
        "gn.weight": 2.0, "gn.bias": 2.0, "ln.weight": 2.0, "ln.bias": 2.0,
        "relative_position_bias_table": 1.0,
        "frozen.weight": None, "frozen.bias": None,  # not optimised at all
    }


def test_by_name_is_the_releases_grouping():
    model = _Toy()
    decay = _decay_of(build_optimizer(_solver(decay_groups="by_name"), model), model)
    assert decay == {
        "conv.weight": 1.0, "conv.bias": 3.0,
        "gn.weight": 1.0, "gn.bias": 3.0, "ln.weight": 1.0, "ln.bias": 3.0,
        "relative_position_bias_table": 3.0,
        "frozen.weight": None, "frozen.bias": None,
    }


def test_unknown_grouping_or_optimizer_is_named():
    with pytest.raises(ValueError, match="decay_groups 'by_size'"):
        build_optimizer(_solver(decay_groups="by_size"), _Toy())
    with pytest.raises(ValueError, match="optimizer 'lamb'"):
        build_optimizer(_solver(optimizer="lamb"), _Toy())


def test_lr_factor_warms_up_linearly_then_steps():
    cfg = SolverConfig(warmup_iters=100, warmup_factor=0.001, steps=[1000, 2000], gamma=0.1)
    assert lr_factor(cfg, 0) == pytest.approx(0.001)
    assert lr_factor(cfg, 50) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(cfg, 100) == 1.0 and lr_factor(cfg, 999) == 1.0
    assert lr_factor(cfg, 1000) == pytest.approx(0.1) and lr_factor(cfg, 2000) == pytest.approx(0.01)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_solvers_lr_momentum_and_betas_reach_the_optimizer(optimizer):
    cfg = _solver(optimizer=optimizer, base_lr=0.03, momentum=0.7, betas=[0.8, 0.95])
    built = build_optimizer(cfg, _Toy())
    assert type(built) is {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[optimizer]
    for group in built.param_groups:
        assert group["lr"] == 0.03
        if optimizer == "sgd":
            assert group["momentum"] == 0.7 and group["nesterov"] is False
        else:
            assert group["betas"] == (0.8, 0.95)


def test_lr_factor_at_the_edges_of_warm_up_and_steps():
    """The last warm-up iteration is not yet at 1; a step is taken at its iteration, not after; a step inside the
    warm-up multiplies it (detectron2's WarmupMultiStepLR)."""
    cfg = SolverConfig(warmup_iters=4, warmup_factor=0.2, steps=[2, 6], gamma=0.5)
    assert lr_factor(cfg, 1) == pytest.approx(0.2 * 0.75 + 0.25)
    assert lr_factor(cfg, 2) == pytest.approx(0.5 * (0.2 * 0.5 + 0.5))
    assert lr_factor(cfg, 3) == pytest.approx(0.5 * (0.2 * 0.25 + 0.75))
    assert lr_factor(cfg, 4) == 0.5 and lr_factor(cfg, 5) == 0.5 and lr_factor(cfg, 6) == 0.25
    no_warm_up = SolverConfig(warmup_iters=0, steps=[1], gamma=0.1)
    assert lr_factor(no_warm_up, 0) == 1.0 and lr_factor(no_warm_up, 1) == pytest.approx(0.1)
