"""python -m benchmarks.run: time every (op, impl, dtype) after checking it against the reference, and write the
records (JSON), the table (markdown), the chart (PNG) and the profile of the 6-block forward+backward.

    python -m benchmarks.run                                   # everything, on the GPU if there is one
    python -m benchmarks.run --dtypes bfloat16 --ops dcn_fwd,dcn_fwd_bwd --quick
    python -m benchmarks.run --device cpu                      # the small shape set, in seconds
    python -m benchmarks.run --cuda-graphs                     # every step replayed from a CUDA graph

A row that fails (missing impl, compile error, out of memory) is recorded with its "error" and the run goes on.
The results file is rewritten after every row, so a run that is cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

from kernels import runtime

from . import profile, records, report
from .flops import peak_tflops
from .ops import DTYPES, IMPLS, OPS, Problem, make_problem, rel_errors
from .shapes import SHAPE_SETS
from .timing import CPU_POLICY, GPU_POLICY, Policy, cuda_graph, measure, peak_memory_mb, synchronize

PROFILE_OP = "dyhead_6block_fwd_bwd"
DEFAULT_OUT = Path(__file__).parent / "results"
ERROR_CHARS = 500
GPU_BUDGET_S = 480.0  # leaves ~2 minutes of a 10-minute slot for start-up, the profiles and the chart


def name_list(text: str, known) -> list[str]:
    """A comma-separated option as a list of names, each one of ``known`` (else argparse's type error)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {unknown}, expected some of {list(known)}" if unknown else
                                         f"no names given, expected some of {list(known)}")
    return names


def device_arg(text: str) -> torch.device:
    """--device: a CUDA or CPU device (else argparse's type error)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device, expected cuda, cuda:N or cpu")
    if device.type == "cuda":
        # else torch's "no NVIDIA driver" (or invalid device ordinal) traceback when the results file is named
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text!r}, but torch finds {count or 'no'} CUDA device(s)")
    return device


def positive_int(text: str) -> int:
    """--threads: a count of at least 1 (else argparse's type error; torch.set_num_threads raises on 0 or less)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def seconds(text: str) -> float:
    """--budget: seconds, 0 or more (else argparse's type error): NaN compares false with the clock, so it would
    quietly be no budget at all."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", type=device_arg, default="cuda" if cuda else "cpu",
                   help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--shapes", choices=sorted(SHAPE_SETS),
                   help="coco: batch 2 of 800x1333 at P3-P7, 256 ch (default on cuda); medium: 2x64 ch from 32x48, "
                        "for CPU figures (minutes); small: seconds on a CPU (default on cpu)")
    p.add_argument("--ops", type=lambda t: name_list(t, OPS), default=list(OPS), help="comma-separated, default all")
    p.add_argument("--impls", type=lambda t: name_list(t, IMPLS),
                   help="comma-separated, default all (on cpu without TRITON_INTERPRET=1: all but triton)")
    p.add_argument("--dtypes", type=lambda t: name_list(t, DTYPES), default=list(DTYPES),
                   help="comma-separated, run in this order (the first is also the profile's)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="a fifth of the timing effort")
    p.add_argument("--no-profile", action="store_true", help=f"skip the torch.profiler breakdown of {PROFILE_OP}")
    p.add_argument("--budget", type=seconds,
                   help="seconds after which the remaining rows (and profiles) are recorded as skipped; default "
                        f"{GPU_BUDGET_S:.0f} on cuda, so that a run fits a 10-minute slot, none on cpu")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture each step in a CUDA graph and time its replays (no host launch cost; every impl "
                        "alike); written to <gpu>-<date>-graphs.json, without the profile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    on_gpu = args.device.type == "cuda"
    if args.cuda_graphs and not on_gpu:
        p.error("--cuda-graphs needs --device cuda")
    args.shapes = SHAPE_SETS[args.shapes or ("coco" if on_gpu else "small")]
    if args.impls is None:
        runs_triton = on_gpu or runtime.INTERPRET
        args.impls = [impl for impl in IMPLS if runs_triton or impl != "triton"]
    if args.budget is None:
        args.budget = GPU_BUDGET_S if on_gpu else math.inf
    return args


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS - 3] + "..."


class Runner:
    """Runs the rows of one invocation, keeping one Problem (inputs + reference) per op."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = args.device
        policy: Policy = GPU_POLICY if self.device.type == "cuda" else CPU_POLICY
        self.policy = policy.quick() if args.quick else policy
        self.problems: dict[str, Problem] = {}
        self.reference_errors: dict[str, str] = {}
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the runner started (the --budget clock)."""
        return time.perf_counter() - self.start

    def problem(self, op: str) -> Problem:
        """The op's inputs and reference, made once per run and shared by its impls and dtypes."""
        if op not in self.problems:
            self.problems[op] = make_problem(op, self.args.shapes, self.device, self.args.seed)
        return self.problems[op]

    def reference(self, op: str) -> tuple:
        """The op's reference results; a failure (e.g. out of memory in float64) is kept, not retried per row."""
        if op not in self.reference_errors:
            try:
                return self.problem(op).reference()
            except Exception as exc:
                self.reference_errors[op] = f"reference failed: {_error_text(exc)}"
        raise RuntimeError(self.reference_errors[op])

    def row(self, op: str, impl: str, dtype_name: str) -> dict:
        """Check one (op, impl, dtype) against the reference, then time it; errors go into the record."""
        shapes = self.args.shapes
        spec = OPS[op]
        base = dict(op=op, impl=impl, dtype=dtype_name, device=self.device.type,
                    shape=shapes.describe(pyramid=spec.num_blocks > 0))
        if self.elapsed() > self.args.budget:
            return records.make_record(**base, error=f"{records.SKIPPED}time budget of {self.args.budget:.0f} s spent")
        dtype = getattr(torch, dtype_name)
        try:
            reference = self.reference(op)
            problem = self.problem(op)
            step = problem.step(impl, dtype)
            start = time.perf_counter()
            graph_mem = None
            if self.args.cuda_graphs:
                # The graph's memory is allocated at the capture (warm-up calls included): that is its peak.
                captured = []
                graph_mem = peak_memory_mb(lambda: captured.append(cuda_graph(step, self.device)), self.device)
                step = captured[0]
            results = step()  # the first call also compiles and autotunes Triton kernels: worth knowing its cost
            synchronize(self.device)
            first_call_s = time.perf_counter() - start
            errors = rel_errors(results, reference)
            results = None
            values = dict(**self.check(problem, impl, dtype, errors), first_call_s=first_call_s)
            if impl == "triton" and self.device.type == "cpu":
                # Only the Triton interpreter runs on a CPU: a correctness smoke, its speed means nothing.
                note = "Triton interpreter: checked, not timed"
                if dtype == torch.bfloat16:
                    note += " (the interpreter's bfloat16 is broken: expect a failed check)"
                return records.make_record(**base, **values, note=note)
            timing = measure(step, self.device, self.policy)
            flops = spec.flops(shapes)
            tflops = flops / (timing.median_ms * 1e-3) / 1e12
            peak = peak_tflops(records.device_name(self.device), dtype_name,
                               tf32=runtime.matmul_allows_tf32()) if self.device.type == "cuda" else None
            return records.make_record(
                **base, median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, tflops=tflops,
                pct_of_peak=None if peak is None else 100.0 * tflops / peak,
                peak_mem_mb=graph_mem if self.args.cuda_graphs else peak_memory_mb(step, self.device), **values,
                reps=timing.reps, gflop=flops / 1e9)
        except Exception as exc:  # one impl failing (compile error, OOM, missing op) must not stop the others
            return records.make_record(**base, error=_error_text(exc))
        finally:
            step = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def check(self, problem: Problem, impl: str, dtype: torch.dtype, errors: list[float]) -> dict:
        """The record's check fields: "pass", "fail", or for the baseline beyond the fixed bound "floor" (its
        errors are then the others' bound, see `first_failure`); "worst" names the failing or largest error."""
        check, bad = problem.check(impl, dtype, errors)
        worst = max(range(len(errors)), key=errors.__getitem__) if bad is None else bad
        finite = all(math.isfinite(e) for e in errors)
        return dict(max_rel_err=max(errors) if finite else None, worst=problem.result_names()[worst], check=check)

    def profile(self, impl: str, dtype_name: str) -> dict:
        """The profiler breakdown of PROFILE_OP for one impl, or its error."""
        shapes = self.args.shapes
        base = dict(op=PROFILE_OP, impl=impl, dtype=dtype_name, device=self.device.type,
                    shape=shapes.describe(pyramid=True))
        if self.elapsed() > self.args.budget:
            return {**base, "error": f"{records.SKIPPED}time budget of {self.args.budget:.0f} s spent"}
        try:
            step = self.problem(PROFILE_OP).step(impl, getattr(torch, dtype_name))
            step()  # warm-up: compilation and autotuning stay out of the profile
            iters = 3 if self.device.type == "cuda" else 1  # the CPU profiler's own overhead is seconds per step
            return {**base, **profile.breakdown(step, self.device, iters)}
        except Exception as exc:
            return {**base, "error": _error_text(exc)}
        finally:
            step = None
            gc.collect()


def _command(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", "benchmarks.run", *args])


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks of `argv` (the command line when None); returns the exit status (0: results written; 2:
    the results folder cannot be written, or today's results file there is not one; 130: stopped by SIGINT, with
    one line naming the file that holds the rows measured before)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = records.make_meta(args.device, _command(argv), args.cuda_graphs)
    path = records.results_path(args.out, meta, args.device)
    try:  # before the first row is measured: its results would be lost at the first write
        previous = records.load(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except (OSError, ValueError) as exc:
        _log(f"python -m benchmarks.run: error: --out {args.out}: {exc}")
        return 2
    try:
        _run(args, meta, path, previous)
    except KeyboardInterrupt:
        _log(f"python -m benchmarks.run: interrupted by SIGINT; {path} holds the rows measured before")
        return 128 + signal.SIGINT
    return 0


def _run(args: argparse.Namespace, meta: dict, path: Path, previous: dict | None) -> None:
    """Measures the rows, writing `path` after each, then the table, the chart and the profiles."""
    runner = Runner(args)
    rows = [(op, impl, dtype) for dtype in args.dtypes for op in args.ops for impl in args.impls]
    done: list[dict] = []
    for i, (op, impl, dtype) in enumerate(rows, 1):
        record = runner.row(op, impl, dtype)
        done.append(record)
        records.write(path, records.merge(previous, meta, done))
        result = record.get("error") or (f"{record['median_ms']:.4g} ms" if record["median_ms"] else record.get("note"))
        if "first_call_s" in record:
            result += f" (check {record.get('check')}, first call {record['first_call_s']:.1f} s)"
        _log(f"[{i}/{len(rows)} {runner.elapsed():.0f}s] {op} {impl} {dtype}: {result}")

    content = records.merge(previous, meta, done)
    stem = path.with_suffix("")
    graphs = ", every step a CUDA graph replay" if args.cuda_graphs else ""
    header = (f"{meta['device_name']}, torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
              f"{meta['date']}{graphs}\n\n`{content['meta']['command']}`\n\n")
    table = "\n".join(filter(None, [report.table(content["records"]), report.targets(content["records"])]))
    Path(f"{stem}.md").write_text(header + table)
    print(header + table)
    outputs = [path, Path(f"{stem}.md")]

    # the chart shows this run's shape set (a file can hold others, from earlier runs of the day)
    shapes = {args.shapes.describe(pyramid=False), args.shapes.describe(pyramid=True)}
    charted = [r for r in content["records"] if r["shape"] in shapes]
    if not any(r["median_ms"] for r in charted):
        _log("chart skipped: no row was timed")
    elif not report.can_chart():
        _log("chart skipped: matplotlib is not installed (pip install dyhead-triton[plot])")
    else:
        outputs.append(report.chart(charted, f"{meta['device_name']} ({meta['date']})", f"{stem}.png"))

    if not args.no_profile and not args.cuda_graphs and PROFILE_OP in args.ops:
        profiles = [runner.profile(impl, args.dtypes[0]) for impl in args.impls]
        records.write(f"{stem}-profile.json", {"meta": meta, "profiles": profiles})
        Path(f"{stem}-profile.md").write_text(header + profile.markdown(profiles))
        outputs += [Path(f"{stem}-profile.json"), Path(f"{stem}-profile.md")]

    print("wrote " + ", ".join(os.fspath(p) for p in outputs))


if __name__ == "__main__":
    sys.exit(main())
