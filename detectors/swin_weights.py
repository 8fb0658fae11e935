"""Swin Transformer weights from a torchvision or an official microsoft/Swin-Transformer state dict.

The official checkpoints (``swin_tiny_patch4_window7_224.pth`` ...) keep the patch merging inside the stage it
follows (``layers.i.downsample`` runs after stage i); torchvision's ``SwinTransformer.features`` interleaves
them: ``0`` is the patch embedding, ``2i + 1`` stage i (0-based) and ``2i + 2`` the merging after it.
"""

from __future__ import annotations

import re

from torch import Tensor, nn

__all__ = ["official_key_to_torchvision", "load_swin_state_dict"]

# Recomputed from the window size (and attn_mask only fits the classifier's input resolution).
_BUFFERS = ("relative_position_index", "attn_mask")
# The classifier's final norm and head: the detection backbone has one norm per returned level instead.
_UNUSED = ("norm.", "head.")

_MLP = {"fc1": "0", "fc2": "3"}  # torchvision's MLP is Sequential(Linear, GELU, Dropout, Linear, Dropout)
_OFFICIAL_RULES = [
    (re.compile(r"patch_embed\.proj\.(.+)"), lambda m: f"features.0.0.{m[1]}"),
    (re.compile(r"patch_embed\.norm\.(.+)"), lambda m: f"features.0.2.{m[1]}"),
    (
        re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.mlp\.(fc[12])\.(.+)"),
        lambda m: f"features.{2 * int(m[1]) + 1}.{m[2]}.mlp.{_MLP[m[3]]}.{m[4]}",
    ),
    (re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)"), lambda m: f"features.{2 * int(m[1]) + 1}.{m[2]}.{m[3]}"),
    (re.compile(r"layers\.(\d+)\.downsample\.(.+)"), lambda m: f"features.{2 * int(m[1]) + 2}.{m[2]}"),
    (re.compile(r"(norm|head)\.(.+)"), lambda m: m[0]),
]


def official_key_to_torchvision(key: str) -> str:
    """torchvision's name for an official Swin key, e.g. ``layers.0.downsample.reduction.weight`` ->
    ``features.2.reduction.weight``; raises ``ValueError`` naming a key it has no rule for (e.g. the absolute
    position embedding, which no released Swin-T/S/B uses)."""
    for pattern, rename in _OFFICIAL_RULES:
        match = pattern.fullmatch(key)
        if match:
            return rename(match)
    raise ValueError(f"official Swin key {key!r} has no torchvision counterpart")


def _to_torchvision(state: dict[str, Tensor], source: str) -> dict[str, tuple[str, Tensor]]:
    """``{torchvision name: (name in the source, tensor)}`` for the tensors the feature stages use."""
    if any(key.startswith("features.") for key in state):
        rename = None
    elif any(key.startswith(("patch_embed.", "layers.")) for key in state):
        rename = official_key_to_torchvision
    else:
        raise ValueError(f"{source}: neither a torchvision nor an official Swin state dict (keys {list(state)[:3]})")
    renamed = {}
    for key, value in state.items():
        name = rename(key) if rename else key
        if name.endswith(_BUFFERS) or name.startswith(_UNUSED):
            continue
        if not name.startswith("features."):
            raise ValueError(f"{source}: unexpected Swin key {key!r}")
        renamed[name] = (key, value)
    return renamed


def load_swin_state_dict(features: nn.Sequential, state: dict, source: str = "state dict") -> None:
    """Loads a whole Swin checkpoint into torchvision's ``SwinTransformer.features``, all tensors or nothing.

    Args:
        features: the model's ``features`` (its parameters are float32; the tensors are copied in).
        state: torchvision-layout keys (``features.*``, optionally ``norm.*``/``head.*``) or official keys
            (``patch_embed.*``, ``layers.*``, ...), optionally nested under ``"model"``. Position-index
            buffers, attention masks and the classifier's ``norm``/``head`` are skipped.
        source: where ``state`` came from, for error messages.

    Raises:
        ValueError naming the first offending keys: a tensor the model needs is missing, a key is not part of
        the model, or a shape differs.
    """
    if isinstance(state.get("model"), dict):
        state = state["model"]
    renamed = _to_torchvision(state, source)
    own = {f"features.{key}": value for key, value in features.state_dict().items()}
    needed = {key for key in own if not key.endswith(_BUFFERS)}
    missing = sorted(needed - renamed.keys())
    if missing:
        raise ValueError(f"{source}: lacks {len(missing)} Swin tensors (torchvision names), e.g. {missing[:3]}")
    unexpected = sorted(renamed[key][0] for key in renamed.keys() - needed)
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} keys are not part of this Swin, e.g. {unexpected[:3]}")
    for name, (key, value) in renamed.items():
        if value.shape != own[name].shape:
            raise ValueError(
                f"{source}: {key!r} has shape {tuple(value.shape)}, {name!r} needs {tuple(own[name].shape)}"
            )
    merged = {name[len("features."):]: value for name, value in own.items()}  # keeps the model's buffers
    merged.update({name[len("features."):]: value for name, (_, value) in renamed.items()})
    features.load_state_dict(merged, strict=True)
