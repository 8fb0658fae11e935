"""Atomic checkpoints holding everything a bit-identical resume needs."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dyhead.official import official_tower_name, read_checkpoint

__all__ = ["CheckpointError", "rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint", "last_checkpoint",
           "forget_last_checkpoint", "load_model_weights", "load_matching_state", "write_atomically",
           "remove_partial_writes"]

_LAST = "last_checkpoint"
_PARTIAL = ".tmp"  # `write_atomically`'s temporary: the file's name and this


class CheckpointError(ValueError):
    """A checkpoint or weights file that is missing, cannot be read, or does not fit the model; the message names
    the file."""


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


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then renames it to ``path`` once its bytes are on disk,
    and makes the rename durable too: a crash never leaves a truncated file, and after a power loss the name does
    not point at a file the disk never got. A write or rename that fails removes the temporary (a checkpoint's
    can be gigabytes) and raises."""
    tmp = path.with_name(path.name + _PARTIAL)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def remove_partial_writes(folder: Path, pattern: str) -> list[str]:
    """Removes the temporaries of `write_atomically` for the files of ``folder`` that match the glob ``pattern``:
    writes that a kill cut short (SIGKILL, a second signal), which no exception handler could remove. Returns
    their names."""
    partial = sorted(folder.glob(pattern + _PARTIAL))
    for path in partial:
        path.unlink(missing_ok=True)
    return [path.name for path in partial]


def save_checkpoint(output_dir: Path, name: str, state: dict[str, Any]) -> Path:
    """Writes ``state`` to ``output_dir/name``, then points ``output_dir/last_checkpoint`` at it, each through
    `write_atomically`."""
    path = output_dir / name
    write_atomically(path, lambda tmp: torch.save(state, tmp))
    write_atomically(output_dir / _LAST, lambda tmp: tmp.write_text(name))
    return path


def last_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint ``last_checkpoint`` names, or None when the folder has none."""
    pointer = output_dir / _LAST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not name:  # else it would name output_dir itself
        raise FileNotFoundError(f"{pointer} is empty: it names no checkpoint")
    path = output_dir / name
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{pointer} names {path}, which {what}")
    return path


def forget_last_checkpoint(output_dir: Path) -> str | None:
    """Removes ``output_dir/last_checkpoint`` (a run starting afresh there: a later ``--resume`` must not pick
    up the earlier run's checkpoint); returns the name it held, or None when there was none."""
    pointer = output_dir / _LAST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    pointer.unlink()
    return name


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a checkpoint on the CPU without unpickling arbitrary objects (`dyhead.official.read_checkpoint`).

    Raises:
        CheckpointError: the file is missing, is a folder (the message names a training folder's last checkpoint),
            or is not a dict that ``torch.load(weights_only=True)`` reads (not a checkpoint, truncated, or holding
            objects other than tensors and plain containers).
    """
    try:
        return read_checkpoint(path, "checkpoint")
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(f"{exc}{_folder_hint(Path(path))}") from exc


def _folder_hint(path: Path) -> str:
    """For a training output folder given where a checkpoint file belongs, the file its ``last_checkpoint`` names."""
    if not path.is_dir():
        return ""
    try:
        last = last_checkpoint(path)
    except FileNotFoundError:
        return ""
    return f"; its last checkpoint is {last}" if last is not None else ""


def load_matching_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """``model.load_state_dict(state)`` (strict), with a short error naming the source when the tensors do not
    fit the model: how many are missing, unexpected or of another shape, with a few names of each.

    Raises:
        CheckpointError: the state dict does not fit the model.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(names)} {what} (e.g. {', '.join(names[:3])})"
                 for names, what in ((missing, "missing"), (unexpected, "unexpected"), (shapes, "of another shape"))
                 if names]
        raise CheckpointError(f"{source} does not fit the model this config builds: tensors {'; '.join(parts)}. "
                              "Check --config and the model.* settings the weights were trained with")
    model.load_state_dict(state)


def load_model_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Model weights and metadata from a training checkpoint, or from a bare state dict (empty metadata).

    Raises:
        CheckpointError: the file is not a detector's weights in this library's names, but a DyHead neck's alone
            or a release checkpoint not yet converted (the error says how to convert it), or as `load_checkpoint`.
    """
    state = load_checkpoint(path)
    meta = {}
    if "model" in state and isinstance(state["model"], dict):
        state, meta = state["model"], state.get("meta", {})
    # Either would otherwise be reported as hundreds of missing and unexpected tensors.
    convert = "convert the release's detector checkpoint with `dyhead convert --detector RELEASE OUT --config CONFIG`"
    if state and all(str(key).startswith("blocks.") for key in state):
        raise CheckpointError(f"{path} holds a DyHead neck's weights alone (what `dyhead convert` writes without "
                              f"--detector), not a detector's: {convert}")
    if any(official_tower_name(str(key)) for key in state):
        raise CheckpointError(f"{path} is a microsoft/DynamicHead checkpoint in the release's names: {convert}")
    return state, meta
