"""The results as a markdown table with speedups against torchvision, and as a PNG chart."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .ops import BASELINE, IMPLS, OPS
from .records import sort_key
from .shapes import COCO

COLUMNS = ("op", "dtype", "impl", "median ms", "p20-p80 ms", "TFLOP/s", "% peak", "peak MiB",
           f"vs {BASELINE}", "max rel err", "note")
NOTE_CHARS = 80


def speedups(records: list[dict]) -> dict[int, float]:
    """id(record) -> torchvision's median / the record's median, for records whose baseline ran in the same file
    (same op, dtype, device and shape)."""
    base = {(r["op"], r["dtype"], r["device"], r["shape"]): r["median_ms"]
            for r in records if r["impl"] == BASELINE and r["median_ms"]}
    out = {}
    for r in records:
        b = base.get((r["op"], r["dtype"], r["device"], r["shape"]))
        if b and r["median_ms"]:
            out[id(r)] = b / r["median_ms"]
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _note(record: dict) -> str:
    text = record.get("error") or record.get("note") or ""
    if record.get("check") == "fail":
        what = "non-finite" if record.get("max_rel_err") is None else "worst"
        text = f"CHECK FAILED ({what}: {record.get('worst')}) {text}".strip()
    elif record.get("check") == "floor":
        text = f"noise floor of the check ({record.get('worst')}) {text}".strip()
    text = text.splitlines()[0] if text else ""
    text = text if len(text) <= NOTE_CHARS else text[:NOTE_CHARS - 3] + "..."
    return text.replace("|", "/")


def table(records: list[dict]) -> str:
    """A markdown table of the records, sorted by op, dtype and impl; with a shape column where the records
    hold several shape sets (runs of the day at other sizes)."""
    ups = speedups(records)
    ops_shapes = {(r["op"], r["shape"]) for r in records}
    with_shape = len(ops_shapes) > len({op for op, _ in ops_shapes})
    columns = COLUMNS[:3] + ("shape",) * with_shape + COLUMNS[3:]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in sorted(records, key=sort_key):
        spread = "" if r["p20_ms"] is None else f"{r['p20_ms']:.4g}-{r['p80_ms']:.4g}"
        up = ups.get(id(r))
        cells = (r["op"], r["dtype"], r["impl"], *((r["shape"],) * with_shape), _fmt(r["median_ms"], ".4g"), spread,
                 _fmt(r["tflops"], ".3g"), _fmt(r["pct_of_peak"], ".1f"), _fmt(r["peak_mem_mb"], ".0f"),
                 "" if up is None else f"{up:.2f}x", _fmt(r.get("max_rel_err"), ".1e"), _note(r))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def targets(records: list[dict]) -> str:
    """The project's targets on a GPU in bfloat16 at the COCO shapes, and what these records reach (markdown
    list; "" without GPU records). A row whose check failed measures nothing."""
    if not any(r["device"] == "cuda" for r in records):
        return ""

    def find(op: str, impl: str) -> dict:
        shape = COCO.describe(pyramid=OPS[op].num_blocks > 0)
        for r in records:
            if (r["op"], r["impl"], r["dtype"], r["device"], r["shape"]) == (op, impl, "bfloat16", "cuda", shape):
                return {} if r.get("check") == "fail" else r
        return {}

    def line(goal: str, value: float | None, shown: str, ok: bool) -> str:
        return f"- {goal}: " + ("not measured" if value is None else f"{shown}, {'met' if ok else 'NOT met'}")

    triton, base = find("dyhead_6block_fwd_bwd", "triton"), find("dyhead_6block_fwd_bwd", BASELINE)
    speedup = speedups(records).get(id(triton))
    pct = find("dcn_fwd", "triton").get("pct_of_peak")
    mem = triton["peak_mem_mb"] / base["peak_mem_mb"] if triton.get("peak_mem_mb") and base.get("peak_mem_mb") else None
    return "\n".join([
        "Targets (GPU, bfloat16, triton against torchvision):",
        line("dyhead_6block_fwd_bwd at least 3x faster (aim 10x)", speedup, f"{speedup or 0:.2f}x",
             speedup is not None and speedup >= 3),
        line("dcn_fwd at least 35% of the dense bf16 peak", pct, f"{pct or 0:.1f}%", pct is not None and pct >= 35),
        line("dyhead_6block_fwd_bwd peak memory at most half of torchvision's", mem, f"{mem or 0:.2f}x",
             mem is not None and mem <= 0.5),
    ]) + "\n"


def can_chart() -> bool:
    """Whether matplotlib (the `plot` extra) is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def chart(records: list[dict], title: str, path: str | os.PathLike) -> Path | None:
    """A PNG of median times (log scale), one panel per dtype, one group of bars per op, annotated with the
    speedup against torchvision; records of one shape set. None when matplotlib is not installed (the `plot`
    extra) or no record was timed."""
    if not can_chart():
        return None
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on a benchmark machine
    import matplotlib.pyplot as plt

    timed = sorted((r for r in records if r["median_ms"]), key=sort_key)
    if not timed:
        return None
    ups = speedups(timed)
    dtypes = list(dict.fromkeys(r["dtype"] for r in timed))
    ops = list(dict.fromkeys(r["op"] for r in timed))
    impls = [impl for impl in IMPLS if any(r["impl"] == impl for r in timed)]
    height = 1.0 / (len(impls) + 1)
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5.5 * len(dtypes), 0.9 + 0.55 * len(ops) * len(impls) ** 0.5),
                             sharey=True, squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        for k, impl in enumerate(impls):
            rows = [(ops.index(r["op"]), r) for r in timed if r["dtype"] == dtype and r["impl"] == impl]
            ys = [i + (k - (len(impls) - 1) / 2) * height for i, _ in rows]
            ax.barh(ys, [r["median_ms"] for _, r in rows], height=height, label=impl, color=f"C{k}")
            for y, (_, r) in zip(ys, rows):
                if r["impl"] != BASELINE and id(r) in ups:
                    ax.annotate(f" {ups[id(r)]:.1f}x", (r["median_ms"], y), va="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_title(dtype)
        ax.set_xlabel("median ms per step (log)")
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0][0].set_yticks(range(len(ops)), ops)
    axes[0][0].invert_yaxis()
    handles, labels = [], []
    for ax in axes[0]:  # a panel may lack an impl: collect the legend over all of them
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    # Legend below the panels: above them it collides with the title on a one-panel chart.
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle(title, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
