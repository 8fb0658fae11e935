"""The results file: `<device>-<date>.json` = {"meta": {...}, "records": [...]}, one record per (op, impl, dtype)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
from pathlib import Path

import torch

from .ops import DTYPES, IMPLS, OPS

# Every record has these keys (None where a value does not apply). A checked row adds "max_rel_err" (the largest
# relative norm error against the float64 reference over outputs and gradients), "worst" (which result that is)
# and "check" ("pass" or "fail") and "first_call_s" (seconds of the first call, Triton compilation and
# autotuning included); a timed row "reps" and "gflop" (the FLOPs counted, see benchmarks.flops);
# a row may add a "note", and "error" (the exception that stopped it; its timing fields are then None).
RECORD_KEYS = ("op", "impl", "dtype", "device", "shape", "median_ms", "p20_ms", "p80_ms", "tflops", "pct_of_peak",
               "peak_mem_mb")
META_KEYS = ("device_name", "torch", "triton", "cuda", "date", "command", "cuda_graphs")


def device_name(device: torch.device) -> str:
    """The GPU's name as CUDA reports it (e.g. "NVIDIA H100 80GB HBM3"), or a description of the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()}, torch threads: {torch.get_num_threads()}"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def make_meta(device: torch.device, command: str, cuda_graphs: bool = False) -> dict:
    """The file's meta; cuda_graphs: whether every step was timed as a CUDA graph replay."""
    return {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
        "command": command,
        "cuda_graphs": cuda_graphs,
    }


def results_path(out_dir: str | os.PathLike, meta: dict, device: torch.device) -> Path:
    """`<out_dir>/<gpu-slug>-<date>.json`, e.g. nvidia-h100-80gb-hbm3-2026-11-25.json (cpu-<date>.json on the CPU);
    `-graphs` before `.json` for a CUDA graph run, which is its own table."""
    name = meta["device_name"] if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    graphs = "-graphs" if meta.get("cuda_graphs") else ""
    return Path(out_dir) / f"{slug}-{meta['date']}{graphs}.json"


def make_record(op: str, impl: str, dtype: str, device: str, shape: str, **values) -> dict:
    """A record with all RECORD_KEYS (None where `values` gives none) and any extra `values`."""
    record = {"op": op, "impl": impl, "dtype": dtype, "device": device, "shape": shape}
    record.update({key: None for key in RECORD_KEYS[5:]})
    record.update(values)
    return record


def record_key(record: dict) -> tuple:
    """What identifies a record across runs: its op, impl, dtype, device and shape."""
    return tuple(record[key] for key in RECORD_KEYS[:5])


def sort_key(record: dict) -> tuple:
    """Table order: op, then dtype, then impl, in the order of their definitions."""
    def index(names, name):
        return names.index(name) if name in names else len(names)
    return (index(list(OPS), record["op"]), index(DTYPES, record["dtype"]), index(IMPLS, record["impl"]),
            record["shape"])


SKIPPED = "skipped: "  # how a row the time budget left out begins its error


def merge(previous: dict | None, meta: dict, records: list[dict]) -> dict:
    """The file's new content: `records` replace the previous file's records with the same (op, impl, dtype,
    device, shape) and the others are kept, so that a run of a subset updates a full run of the same day. A row
    the time budget skipped keeps the earlier measurement it would replace."""
    kept = []
    if previous is not None:
        measured = {record_key(r): r for r in previous["records"] if r["median_ms"] is not None}
        records = [measured.get(record_key(r), r) if str(r.get("error", "")).startswith(SKIPPED) else r
                   for r in records]
        new_keys = {record_key(r) for r in records}
        kept = [r for r in previous["records"] if record_key(r) not in new_keys]
        if kept and previous["meta"]["command"] != meta["command"]:
            meta = {**meta, "command": f"{previous['meta']['command']} ; {meta['command']}"}
    return {"meta": meta, "records": sorted(kept + records, key=sort_key)}


def load(path: str | os.PathLike) -> dict | None:
    """A results file's content, or None when there is none; ValueError naming the file when it holds no results
    (a run would fail on it after its first row, or replace the file)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with path.open() as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a results file: {exc}") from None
    if not isinstance(content, dict) or not {"meta", "records"} <= content.keys():
        raise ValueError(f'{path} is not a results file: no "meta" and "records"')
    return content


def write(path: str | os.PathLike, content: dict) -> None:
    """Write atomically, so that a run killed mid-way leaves the last complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    with tmp.open("w") as f:
        json.dump(content, f, indent=1)
        f.write("\n")
    tmp.replace(path)
