"""Atomic checkpoints holding everything a bit-identical resume needs."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint", "last_checkpoint", "load_model_weights"]

_LAST = "last_checkpoint"


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and Python RNG states, as types ``torch.load(weights_only=True)`` reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state((np_state["name"], keys, np_state["pos"], np_state["has_gauss"], np_state["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(output_dir: Path, name: str, state: dict[str, Any]) -> Path:
    """Writes ``state`` to ``output_dir/name`` through a temporary file and a rename, so a crash never leaves a
    truncated checkpoint, then points ``output_dir/last_checkpoint`` at it the same way."""
    path = output_dir / name
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    pointer = output_dir / (_LAST + ".tmp")
    pointer.write_text(name)
    os.replace(pointer, output_dir / _LAST)
    return path


def last_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint ``last_checkpoint`` names, or None when the folder has none."""
    pointer = output_dir / _LAST
    if not pointer.is_file():
        return None
    path = output_dir / pointer.read_text().strip()
    if not path.is_file():
        raise FileNotFoundError(f"{pointer} names {path}, which does not exist")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a checkpoint on the CPU without unpickling arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Model weights and metadata from a training checkpoint, or from a bare state dict (empty metadata)."""
    state = load_checkpoint(path)
    if "model" in state and isinstance(state["model"], dict):
        return state["model"], state.get("meta", {})
    return state, {}
