"""The benchmark runner's machinery on the CPU: records file, table, statistics, FLOP counts, error handling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import ops, profile, records, report, run, timing
from benchmarks.flops import block_flops, dcn_flops, op_flops, peak_tflops
from benchmarks.shapes import COCO, SHAPE_SETS, SMALL
from benchmarks.timing import Policy, Timing, percentile, summarize
from dyhead import DyHead
from kernels.runtime import INTERPRET

FAST = ["--device", "cpu", "--shapes", "small", "--quick", "--threads", "1", "--no-profile"]


@pytest.fixture(autouse=True)
def keep_threads():
    """The runner's --threads sets torch's global thread count: give it back to the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_main(tmp_path, *args):
    assert run.main([*FAST, "--out", str(tmp_path), *args]) == 0
    (path,) = tmp_path.glob("cpu-*.json")
    assert not list(tmp_path.glob("*.tmp"))  # each write replaced the file with its complete temporary
    with path.open() as f:
        return path, json.load(f)


def test_records_file_of_a_cpu_run(tmp_path, capsys):
    path, content = run_main(tmp_path, "--ops", "dcn_fwd,dcn_fwd_bwd,dyhead_block_fwd", "--impls",
                             "torchvision,sampled", "--dtypes", "float32")
    assert set(content) == {"meta", "records"}
    assert set(content["meta"]) == set(records.META_KEYS)
    assert content["meta"]["command"].startswith("python -m benchmarks.run --device cpu")
    assert path.name == f"cpu-{content['meta']['date']}.json"
    rows = content["records"]
    assert [(r["op"], r["impl"]) for r in rows] == [
        (op, impl) for op in ("dcn_fwd", "dcn_fwd_bwd", "dyhead_block_fwd") for impl in ("torchvision", "sampled")]
    for r in rows:
        assert set(records.RECORD_KEYS) <= set(r), r
        assert "error" not in r, r
        assert (r["dtype"], r["device"], r["check"]) == ("float32", "cpu", "pass")
        assert r["max_rel_err"] < 1e-4
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["tflops"] == pytest.approx(r["gflop"] / r["median_ms"])  # GFLOP / ms = TFLOP/s
        assert r["pct_of_peak"] is None and r["peak_mem_mb"] is None  # no peak table or memory stats on CPU
        assert r["first_call_s"] > 0
    assert rows[0]["shape"] == "1x32x16x24"
    conv = dcn_flops(1, 32, 32, 16, 24)  # at P3 of SMALL; a block adds the finer and coarser convs of P4-P7
    block = conv + 3 * sum(dcn_flops(1, 32, 32, h, w) for h, w in SMALL.levels[1:])
    assert [r["gflop"] * 1e9 for r in rows] == pytest.approx([conv, conv, 3 * conv, 3 * conv, block, block])
    assert rows[-1]["shape"] == "1x32x[16x24,8x12,4x6,2x3,1x2]"

    out = capsys.readouterr().out
    assert "| dcn_fwd | float32 | sampled |" in out and "1.00x" in out
    assert path.with_suffix(".md").read_text().count("| dcn_fwd |") == 2
    pytest.importorskip("matplotlib")
    assert path.with_suffix(".png").stat().st_size > 0


def test_a_failing_impl_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    real = ops.dcn_function

    def dcn_function(impl):
        if impl == "triton":
            raise RuntimeError("CompilationError: out of shared memory")
        return real(impl)

    monkeypatch.setattr(ops, "dcn_function", dcn_function)
    _, content = run_main(tmp_path, "--ops", "dcn_fwd", "--impls", "triton,torchvision", "--dtypes", "float32")
    failed, ok = content["records"]
    assert failed["impl"] == "triton" and failed["median_ms"] is None
    assert failed["error"] == "RuntimeError: CompilationError: out of shared memory"
    assert ok["impl"] == "torchvision" and ok["median_ms"] > 0


def test_a_failing_reference_is_computed_once(tmp_path, monkeypatch):
    calls = []

    def reference(self):
        calls.append(self.spec.name)
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(ops.DcnProblem, "reference", reference)
    _, content = run_main(tmp_path, "--ops", "dcn_fwd", "--impls", "torchvision,sampled", "--dtypes", "float32")
    assert calls == ["dcn_fwd"]
    assert [r["error"] for r in content["records"]] == ["RuntimeError: reference failed: OutOfMemoryError: CUDA out "
                                                        "of memory"] * 2


def test_spent_budget_skips_rows_and_a_later_run_merges(tmp_path):
    _, content = run_main(tmp_path, "--ops", "dcn_fwd", "--impls", "torchvision,sampled", "--dtypes", "float32",
                          "--budget", "0")
    assert all(r["error"].startswith("skipped: time budget") for r in content["records"])
    _, content = run_main(tmp_path, "--ops", "dcn_fwd", "--impls", "sampled", "--dtypes", "float32")
    by_impl = {r["impl"]: r for r in content["records"]}
    assert by_impl["sampled"]["median_ms"] > 0 and "error" in by_impl["torchvision"]
    assert " ; " in content["meta"]["command"]


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 on the CPU")
def test_triton_under_the_interpreter_is_checked_not_timed(tmp_path):
    _, content = run_main(tmp_path, "--ops", "dcn_fwd", "--impls", "triton", "--dtypes", "float32")
    (r,) = content["records"]
    assert r["check"] == "pass", r
    assert r["median_ms"] is None and "not timed" in r["note"]


def test_percentiles_interpolate_like_numpy():
    samples = [float(x) for x in range(10, 0, -1)]
    assert percentile(samples, 0.2) == pytest.approx(2.8)
    unordered = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    for q in (0.0, 0.1, 0.5, 0.95, 1.0):  # the ends included: no order statistic past the last
        assert percentile(unordered, q) == pytest.approx(np.percentile(unordered, 100 * q))
    assert percentile([7.0], 0.8) == 7.0
    t = summarize(samples)
    assert (t.p20_ms, t.median_ms, t.p80_ms, t.reps) == (pytest.approx(2.8), 5.5, pytest.approx(8.2), 10)


class FakeClock:
    """perf_counter for `benchmarks.timing`: each call of `step` advances it by the next of `durations` seconds."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, iter(durations), 0

    def perf_counter(self):
        return self.now

    def step(self):
        self.now += next(self.durations)
        self.calls += 1


@pytest.mark.parametrize("policy, warmup, timed", [
    # warm-up of min_warmup calls, the last one's 125 ms the estimate: 0.5 s of target is 4 repetitions
    (Policy(warmup_s=0.0, min_warmup=2, target_s=0.5, min_reps=1, max_reps=100), [0.125] * 2,
     [0.25, 0.125, 0.5, 0.375]),
    # warm-up until warmup_s has passed; repetitions up to max_reps however short the step
    (Policy(warmup_s=1.0, min_warmup=1, target_s=10.0, min_reps=1, max_reps=3), [0.125] * 8, [0.5, 0.25, 0.75]),
    # at least min_reps however long the step
    (Policy(warmup_s=0.0, min_warmup=1, target_s=0.5, min_reps=3, max_reps=100), [1.0], [2.0, 1.0, 3.0]),
])
def test_cpu_timing_warms_up_then_times_each_repetition_in_ms(monkeypatch, policy, warmup, timed):
    clock = FakeClock(warmup + timed)
    monkeypatch.setattr(timing, "time", clock)
    result = timing.measure(clock.step, "cpu", policy)
    ms = np.array(timed) * 1e3
    assert clock.calls == len(warmup) + len(timed)
    assert (result.median_ms, result.p20_ms, result.p80_ms, result.reps) == pytest.approx(
        (np.median(ms), np.percentile(ms, 20), np.percentile(ms, 80), len(timed)))


def test_quick_is_a_fifth_of_the_timing_effort():
    for policy in (timing.GPU_POLICY, timing.CPU_POLICY):
        quick = policy.quick()
        assert quick.warmup_s == pytest.approx(policy.warmup_s / 5)
        assert quick.target_s == pytest.approx(policy.target_s / 5)
        assert quick.max_reps == policy.max_reps // 5 and 3 <= quick.min_reps <= policy.min_reps
    assert run.Runner(run.parse_args(["--device", "cpu"])).policy == timing.CPU_POLICY
    assert run.Runner(run.parse_args(["--device", "cpu", "--quick"])).policy == timing.CPU_POLICY.quick()


class FakeCuda:
    """What `benchmarks.timing` calls of torch.cuda, as a log of calls and an allocator's counters in bytes."""

    def __init__(self, monkeypatch, allocated=0, peak=0):
        self.log, self.flushes, self.allocated, self.peak, self.elapsed = [], [], allocated, peak, iter([])
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing

            def record(self):
                fake.log.append("record")

            def elapsed_time(self, end):
                return next(fake.elapsed)

        class Flush:
            def zero_(self):
                fake.log.append("flush")

        for name, value in [("Event", Event), ("synchronize", lambda device=None: self.log.append("sync")),
                            ("reset_peak_memory_stats", self.reset), ("memory_allocated", lambda d: self.allocated),
                            ("max_memory_allocated", lambda d: self.peak)]:
            monkeypatch.setattr(torch.cuda, name, value)
        monkeypatch.setattr(torch, "empty", lambda n, dtype, device: self.flushes.append(n) or Flush())

    def reset(self, device):
        self.peak = self.allocated

    def step(self, nbytes=0):
        self.log.append("step")
        self.peak = max(self.peak, self.allocated + nbytes)


def test_gpu_repetitions_are_cuda_event_pairs_each_after_an_l2_flush(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    cuda.elapsed = iter([3.0, 1.0, 2.0])
    policy = Policy(warmup_s=0.0, min_warmup=1, target_s=0.0, min_reps=3, max_reps=3)
    result = timing.measure(cuda.step, "cuda", policy)
    assert cuda.log == ["step", "sync"] + ["flush", "record", "step", "record"] * 3 + ["sync"]
    assert cuda.flushes[0] > 50 * 2**20  # more than an H100's L2
    assert (result.median_ms, result.reps) == (2.0, 3)


def test_peak_memory_is_the_steps_own_peak_after_a_reset(monkeypatch):
    """Neither an earlier peak (the reset) nor what was allocated before the step (inputs, weights) counts."""
    cuda = FakeCuda(monkeypatch, allocated=100 * 2**20, peak=900 * 2**20)
    assert timing.peak_memory_mb(lambda: cuda.step(3 * 2**20), "cuda") == 3.0
    assert timing.peak_memory_mb(cuda.step, "cpu") is None


def test_flop_counts():
    assert dcn_flops(2, 256, 256, 100, 168) == 2 * 2 * 256 * 256 * 9 * 100 * 168
    # 13 convs per block: every level's own, and twice (finer, coarser) the grids of P4-P7.
    per_level = [dcn_flops(2, 256, 256, h, w) for h, w in COCO.levels]
    assert block_flops(COCO) == per_level[0] + 3 * sum(per_level[1:])
    assert op_flops(0, False, COCO) == dcn_flops(2, 256, 256, 100, 168)  # the single conv runs at P3
    assert op_flops(0, True, COCO) == 3 * op_flops(0, False, COCO)
    assert op_flops(6, False, SMALL) == 6 * op_flops(1, False, SMALL)
    assert ops.OPS["dyhead_6block_fwd_bwd"].flops(COCO) == 18 * block_flops(COCO)


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16", tf32=False) == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "float16", tf32=False) == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", "float32", tf32=False) == 67.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", "float32", tf32=True) == 494.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16", tf32=True) == 989.0  # TF32 is float32's alone
    assert peak_tflops("NVIDIA H100 NVL", "bfloat16", tf32=False) == 835.0
    assert peak_tflops("NVIDIA GeForce RTX 2080", "bfloat16", tf32=False) is None


def test_shape_sets_are_pyramids_of_the_strides_dyhead_needs():
    """Five levels, each ceil(previous / 2) (DyHead's stride-2 branch lands on the next level's grid); COCO is
    the issue's batch of two 800x1344 images at 256 channels."""
    for shapes in SHAPE_SETS.values():
        assert len(shapes.levels) == 5, shapes
        for (h, w), (h2, w2) in zip(shapes.levels, shapes.levels[1:]):
            assert (h2, w2) == (math.ceil(h / 2), math.ceil(w / 2)), shapes
    assert (COCO.batch, COCO.channels, COCO.levels[0]) == (2, 256, (800 // 8, 1344 // 8))


def record(impl, median, **values):
    return records.make_record("dcn_fwd", impl, "bfloat16", "cuda", "2x256x100x168", median_ms=median,
                               p20_ms=median, p80_ms=median, **values)


def test_table_speedups_and_notes():
    rows = [record("sampled", 20.0), record("torchvision", 10.0), record("triton", 2.0, check="fail",
                                                                          max_rel_err=0.5, worst="grad offset"),
            records.make_record("dcn_fwd", "triton", "float16", "cuda", "2x256x100x168", error="OutOfMemoryError: x")]
    lines = report.table(rows).splitlines()
    assert lines[0].startswith("| op | dtype | impl | median ms")
    assert [line.split(" | ")[2] for line in lines[2:]] == ["triton", "torchvision", "sampled", "triton"]
    triton, torchvision, sampled, failed = lines[2:]
    assert "| 5.00x |" in triton and "CHECK FAILED (worst: grad offset)" in triton
    assert "| 1.00x |" in torchvision and "| 0.50x |" in sampled
    assert failed.endswith("| OutOfMemoryError: x |")


def test_targets():
    def six_blocks(shapes, impl, ms, mb, **values):
        return records.make_record("dyhead_6block_fwd_bwd", impl, "bfloat16", "cuda", shapes.describe(pyramid=True),
                                   median_ms=ms, peak_mem_mb=mb, **values)

    # rows of a smaller shape set of the same day, listed first, must not stand in for the COCO ones
    small = [six_blocks(SMALL, "torchvision", 1.0, 10.0), six_blocks(SMALL, "triton", 0.1, 1.0),
             records.make_record("dcn_fwd", "triton", "bfloat16", "cuda", SMALL.describe(pyramid=False),
                                 median_ms=0.01, pct_of_peak=90.0)]
    gpu = small + [six_blocks(COCO, "torchvision", 40.0, 9000.0), six_blocks(COCO, "triton", 8.0, 3000.0),
                   record("triton", 1.0, pct_of_peak=30.0)]
    lines = report.targets(gpu).splitlines()
    assert lines[1] == "- dyhead_6block_fwd_bwd at least 3x faster (aim 10x): 5.00x, met"
    assert lines[2] == "- dcn_fwd at least 35% of the dense bf16 peak: 30.0%, NOT met"
    assert lines[3] == "- dyhead_6block_fwd_bwd peak memory at most half of torchvision's: 0.33x, met"
    assert report.targets(gpu[:4]).splitlines()[1].endswith(": not measured")
    failed = gpu[:4] + [six_blocks(COCO, "triton", 8.0, 3000.0, check="fail")]
    assert report.targets(failed).splitlines()[1].endswith(": not measured")
    assert report.targets([{**r, "device": "cpu"} for r in gpu]) == ""


def test_table_names_the_shapes_where_a_file_holds_several():
    assert "shape" not in report.table([record("torchvision", 10.0)]).splitlines()[0]
    rows = [record("torchvision", 10.0), {**record("torchvision", 1.0), "shape": "1x32x16x24"}]
    lines = report.table(rows).splitlines()
    assert lines[0].startswith("| op | dtype | impl | shape | median ms")
    assert {line.split(" | ")[3] for line in lines[2:]} == {"2x256x100x168", "1x32x16x24"}


def test_speedups_are_against_the_baseline_of_the_same_dtype_and_shape():
    rows = [record("torchvision", 10.0), record("triton", 2.0), {**record("triton", 1.0), "dtype": "float16"},
            {**record("triton", 1.0), "shape": "1x32x16x24"}]
    ups = report.speedups(rows)
    assert [ups.get(id(r)) for r in rows] == [1.0, 5.0, None, None]


def table_row(rows):
    """The cells of the table's first row (in table order) by column name."""
    lines = report.table(rows).splitlines()
    return dict(zip(lines[0][2:-2].split(" | "), lines[2][2:-2].split(" | ")))


def test_table_cells_under_their_columns():
    row = {**record("triton", 1.5), "p20_ms": 1.25, "p80_ms": 1.75, "tflops": 123.4, "pct_of_peak": 12.44,
           "peak_mem_mb": 512.4, "max_rel_err": 0.003, "check": "pass"}
    assert table_row([record("torchvision", 3.0), row]) == {
        "op": "dcn_fwd", "dtype": "bfloat16", "impl": "triton", "median ms": "1.5", "p20-p80 ms": "1.25-1.75",
        "TFLOP/s": "123", "% peak": "12.4", "peak MiB": "512", "vs torchvision": "2.00x", "max rel err": "3.0e-03",
        "note": ""}


@pytest.mark.parametrize("values, note", [
    (dict(check="fail", max_rel_err=None, worst="grad mask"), "CHECK FAILED (non-finite: grad mask)"),
    (dict(check="floor", max_rel_err=0.3, worst="grad bias"), "noise floor of the check (grad bias)"),
    (dict(error="RuntimeError: a | b\nTraceback (most recent call last):"), "RuntimeError: a / b"),
    (dict(error="E" * 200), "E" * 77 + "..."),
])
def test_table_notes_fit_one_markdown_cell(values, note):
    """One line without pipes (a pipe would open a column), at most NOTE_CHARS, and what a check's status means."""
    assert table_row([record("sampled", 1.0, **values)])["note"] == note


def test_targets_are_met_at_their_bounds():
    """At least 3x, at least 35 %, at most half: each met exactly at its bound. Rows of another dtype at the COCO
    shapes, listed first, do not stand in for the bfloat16 ones."""
    def six_blocks(dtype, impl, ms, mb):
        return records.make_record("dyhead_6block_fwd_bwd", impl, dtype, "cuda", COCO.describe(pyramid=True),
                                   median_ms=ms, peak_mem_mb=mb)

    float16 = [six_blocks("float16", "triton", 1.0, 100.0),
               {**record("triton", 1.0, pct_of_peak=90.0), "dtype": "float16"}]
    rows = float16 + [six_blocks("bfloat16", "torchvision", 30.0, 9000.0),
                      six_blocks("bfloat16", "triton", 10.0, 4500.0), record("triton", 1.0, pct_of_peak=35.0)]
    assert report.targets(rows).splitlines()[1:] == [
        "- dyhead_6block_fwd_bwd at least 3x faster (aim 10x): 3.00x, met",
        "- dcn_fwd at least 35% of the dense bf16 peak: 35.0%, met",
        "- dyhead_6block_fwd_bwd peak memory at most half of torchvision's: 0.50x, met"]


def test_chart_panels_per_dtype_log_scale_and_speedup_labels(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    rows = [record("torchvision", 10.0), record("triton", 2.0), {**record("sampled", 4.0), "dtype": "float32"},
            record("sampled", None, error="x")]
    path = report.chart(rows, "title", tmp_path / "chart.png")
    assert path == tmp_path / "chart.png" and path.stat().st_size > 0
    (fig,) = figures
    bf16, fp32 = fig.axes
    assert (bf16.get_title(), fp32.get_title()) == ("bfloat16", "float32")
    assert bf16.get_xscale() == "log"
    # the speedup of each impl against torchvision, none on torchvision's own bar
    assert [t.get_text() for t in bf16.texts] == [" 5.0x"] and not fp32.texts
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["triton", "torchvision", "sampled"]
    close(fig)
    assert report.chart([record("sampled", None, error="x")], "title", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


@pytest.mark.parametrize("argv, message", [(["--ops", ","], "no names given"), (["--impls", ""], "no names given"),
                                           (["--dtypes", "float32,float8"], "unknown ['float8']"),
                                           (["--device", "gpu"], "'gpu' is not a device"),
                                           (["--device", "meta"], "'meta' is not a device"),
                                           (["--threads", "0"], "'0' is not a positive integer"),
                                           (["--threads", "-2"], "'-2' is not a positive integer"),
                                           (["--budget", "nan"], "'nan' is not a number of seconds >= 0"),
                                           (["--budget", "-5"], "'-5' is not a number of seconds >= 0"),
                                           (["--budget", "10m"], "'10m' is not a number of seconds >= 0")])
def test_bad_options_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("count, device", [(0, "cuda"), (0, "cuda:0"), (2, "cuda:2")])
def test_a_cuda_device_torch_does_not_find_is_an_argparse_error(monkeypatch, capsys, count, device):
    """Not torch's "no NVIDIA driver" or "invalid device ordinal" traceback when the results file is named."""
    _gpus(monkeypatch, count)
    with pytest.raises(SystemExit):
        run.parse_args(["--device", device])
    assert f"argument --device: '{device}', but torch finds {count or 'no'} CUDA device(s)" in capsys.readouterr().err
    _gpus(monkeypatch, 3)
    assert run.parse_args(["--device", device]).device == torch.device(device)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"meta": {}}'])
def test_a_results_file_that_is_not_one_stops_the_run_before_its_first_row(tmp_path, capsys, monkeypatch, content):
    """Today's file in --out that is not JSON, or not a results file: named in one line (exit status 2) before
    anything is measured, and left as it was, not a traceback after the first row."""
    monkeypatch.setattr(run.Runner, "row", lambda *a: pytest.fail("a row ran"))
    meta = records.make_meta(torch.device("cpu"), "x")
    path = records.results_path(tmp_path, meta, torch.device("cpu"))
    path.write_text(content)
    assert run.main([*FAST, "--out", str(tmp_path), "--ops", "dcn_fwd"]) == 2
    assert f"error: --out {tmp_path}: {path} is not a results file: " in capsys.readouterr().err
    assert path.read_text() == content


def test_an_out_folder_that_cannot_be_made_stops_the_run_before_its_first_row(tmp_path, capsys, monkeypatch):
    """--out that is a file or lies under one: one line, not mkdir's traceback after the first row was measured."""
    monkeypatch.setattr(run.Runner, "row", lambda *a: pytest.fail("a row ran"))
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "results"):
        assert run.main([*FAST, "--out", str(out), "--ops", "dcn_fwd"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"python -m benchmarks.run: error: --out {out}: ") and err.count("\n") == 1


def test_cuda_graph_runs_need_a_gpu_and_get_their_own_file(tmp_path):
    with pytest.raises(SystemExit):
        run.parse_args(["--device", "cpu", "--cuda-graphs"])
    meta = records.make_meta(torch.device("cpu"), "x", cuda_graphs=True)
    eager = records.make_meta(torch.device("cpu"), "x")
    assert records.results_path(tmp_path, meta, torch.device("cpu")).name == f"cpu-{meta['date']}-graphs.json"
    assert records.results_path(tmp_path, eager, torch.device("cpu")).name == f"cpu-{meta['date']}.json"


def test_merge_replaces_rows_of_the_same_key():
    meta = {"command": "first"}
    previous = {"meta": meta, "records": [record("torchvision", 10.0), record("triton", 5.0)]}
    merged = records.merge(previous, {"command": "second"}, [record("triton", 2.0)])
    assert [(r["impl"], r["median_ms"]) for r in merged["records"]] == [("triton", 2.0), ("torchvision", 10.0)]
    assert merged["meta"]["command"] == "first ; second"
    # a row the budget skipped keeps the day's measurement; an error replaces it (it says what the code does now)
    skipped = record("triton", None, error=records.SKIPPED + "time budget of 0 s spent")
    broken = record("torchvision", None, error="RuntimeError: x")
    merged = records.merge(previous, {"command": "third"}, [skipped, broken])
    assert [(r["impl"], r["median_ms"]) for r in merged["records"]] == [("triton", 5.0), ("torchvision", None)]


def test_gpu_results_file_is_named_after_the_device():
    meta = {"device_name": "NVIDIA H100 80GB HBM3", "date": "2026-11-25"}
    gpu = torch.device("cuda")
    assert records.results_path("out", meta, gpu).name == "nvidia-h100-80gb-hbm3-2026-11-25.json"
    # no dash doubled or left at either end by the name's punctuation
    meta = {"device_name": " NVIDIA A100-SXM4-80GB (MIG 1g.10gb)", "date": "2026-11-25"}
    assert records.results_path("out", meta, gpu).name == "nvidia-a100-sxm4-80gb-mig-1g-10gb-2026-11-25.json"


def test_merge_keys_on_the_shape_and_keeps_only_measurements():
    small = {**record("triton", 1.0), "shape": "1x32x16x24"}
    previous = {"meta": {"command": "coco"}, "records": [record("triton", 5.0), small,
                                                         record("torchvision", None, error="RuntimeError: x")]}
    merged = records.merge(previous, {"command": "small"}, [{**small, "median_ms": 0.5}])
    assert sorted((r["shape"], r["median_ms"]) for r in merged["records"] if r["impl"] == "triton") == [
        ("1x32x16x24", 0.5), ("2x256x100x168", 5.0)]
    # a skipped row has no earlier measurement to keep in an earlier error
    skipped = record("torchvision", None, error=records.SKIPPED + "time budget of 0 s spent")
    merged = records.merge(previous, {"command": "coco"}, [skipped])
    assert [r["error"] for r in merged["records"] if r["impl"] == "torchvision"] == [skipped["error"]]


def test_a_run_that_replaces_every_row_keeps_only_its_command():
    previous = {"meta": {"command": "first"}, "records": [record("triton", 5.0)]}
    assert records.merge(previous, {"command": "second"}, [record("triton", 2.0)])["meta"]["command"] == "second"


def test_rel_errors():
    ref = (torch.ones(3), torch.zeros(2), None)
    assert ops.rel_errors((torch.ones(3), None, None), ref) == [0.0, 0.0, 0.0]
    errors = ops.rel_errors((torch.full((3,), 1.5), torch.zeros(2), torch.ones(1)), ref)
    assert errors[0] == pytest.approx(0.5) and errors[2] > 1e100
    assert ops.rel_errors((torch.tensor([math.nan, 1, 1]), None, None), ref)[0] == math.inf
    # relative to the reference's norm however small
    assert ops.rel_errors((torch.full((3,), 2e-3),), (torch.full((3,), 1e-3),)) == [pytest.approx(1.0)]
    with pytest.raises(ValueError, match="1 results where the reference has 3"):
        ops.rel_errors((torch.ones(3),), ref)
    with pytest.raises(ValueError, match=r"shape \(1, 3\) where the reference has \(3,\)"):
        ops.rel_errors((torch.ones(1, 3), None, None), ref)


def test_cpu_profile_ranks_operators():
    a = torch.randn(64, 64)
    result = profile.breakdown(lambda: (a @ a).relu(), "cpu", iters=2, top=1)
    assert result["kind"] == "CPU operators, self time" and result["iters"] == 2
    top, other = result["entries"]
    assert other["name"].startswith("(other ")
    assert sum(e["pct"] for e in result["entries"]) == pytest.approx(100.0)
    assert top["calls_per_iter"] >= 1
    b = torch.randn(128, 128)
    ranked = profile.breakdown(lambda: b @ b, "cpu", iters=1)["entries"]
    assert ranked[0]["name"] == "aten::mm"  # by self time: matmul, which calls it, only dispatches
    text = profile.markdown([{"op": "dcn_fwd", "impl": "sampled", "dtype": "float32", "device": "cpu",
                              "shape": "s", **result}])
    assert "| 1 |" in text and "| 2 | `(other" in text


class Event:
    """The part of a kineto event that `profile.self_times` reads."""

    def __init__(self, name, start, end, thread=1):
        self._name, self._start, self._end, self._thread = name, start, end, thread

    def name(self):
        return self._name

    def start_ns(self):
        return self._start

    def end_ns(self):
        return self._end

    def duration_ns(self):
        return self._end - self._start

    def start_thread_id(self):
        return self._thread


def test_self_time_is_an_events_duration_less_its_direct_children():
    events = [
        Event("conv", 0, 10_000), Event("im2col", 0, 4_000), Event("mm", 4_000, 9_000), Event("gemm", 5_000, 8_000),
        Event("add", 10_000, 12_000),  # starts where conv ends: a sibling, not a child
        Event("backward", 1_000, 6_000, thread=2),  # autograd's thread, overlapping conv: not nested in it
    ]
    assert sorted(profile.self_times(events)) == [("add", 2.0), ("backward", 5.0), ("conv", 1.0), ("gemm", 3.0),
                                                    ("im2col", 4.0), ("mm", 2.0)]


def test_rank_sums_per_name_per_step():
    kernel = "void at::native::" + "x" * 200  # C++ template names run to kilobytes
    durations = [("mm", 300.0), ("add", 50.0), ("mm", 500.0), ("relu", 100.0), ("add", 50.0), (kernel, 1000.0)]
    result = profile.rank(durations, iters=2, top=2)
    assert result["total_ms_per_iter"] == pytest.approx(1.0)
    assert result["entries"] == [
        {"name": kernel[:profile.NAME_CHARS], "calls_per_iter": 0.5, "ms_per_iter": pytest.approx(0.5),
         "pct": pytest.approx(50.0)},
        {"name": "mm", "calls_per_iter": 1.0, "ms_per_iter": pytest.approx(0.4), "pct": pytest.approx(40.0)},
        {"name": "(other 2)", "calls_per_iter": 1.5, "ms_per_iter": pytest.approx(0.1), "pct": pytest.approx(10.0)}]


def test_profile_markdown_says_why_a_step_was_not_profiled():
    base = {"op": "dyhead_6block_fwd_bwd", "impl": "triton", "dtype": "bfloat16", "device": "cuda", "shape": "s"}
    entry = {"name": "void at::native::kernel<a|b>", "calls_per_iter": 1.0, "ms_per_iter": 0.5, "pct": 100.0}
    text = profile.markdown([{**base, "error": "skipped: time budget of 480 s spent"},
                             {**base, "impl": "sampled", "kind": "k", "iters": 3, "total_ms_per_iter": 0.5,
                              "entries": [entry]}])
    assert "## dyhead_6block_fwd_bwd / triton / bfloat16 (cuda, s)\n\nNot profiled: skipped: time budget" in text
    assert "| 1 | `void at::native::kernel<a/b>` | 1 | 0.5 | 100.0 |" in text


def test_check_bound_is_the_tolerance_or_twice_the_baselines_own_error():
    assert ops.first_failure([1e-5, 2e-5], 1e-4) is None
    assert ops.first_failure([1e-4], 1e-4) is None  # at the bound: within it
    assert ops.first_failure([1e-5, 3e-4], 1e-4) == 1
    assert ops.first_failure([1e-5, 3e-4], 1e-4, noise=[1e-6, 2e-4]) is None  # within 2x the baseline's 2e-4
    assert ops.first_failure([1e-5, 5e-4], 1e-4, noise=[1e-6, 2e-4]) == 1
    assert ops.first_failure([math.nan, 0.0], 1e-4, noise=[1e-6, 1e-6]) == 0


def test_check_of_rows_against_the_baselines_noise_floor(tmp_path, monkeypatch):
    """With a bound below float32 rounding, torchvision's row is the noise floor and sampled (float32 too,
    errors of the same order) passes against it, while an impl that adds 10x the baseline's error fails."""
    monkeypatch.setitem(ops.REL_ERR_TOL, "dcn", {"float32": 1e-20, "float16": 0.2, "bfloat16": 0.2})
    _, content = run_main(tmp_path, "--ops", "dcn_fwd", "--impls", "torchvision,sampled", "--dtypes", "float32")
    baseline, sampled = content["records"]
    assert baseline["check"] == "floor" and baseline["max_rel_err"] > 1e-20
    assert sampled["check"] == ("pass" if sampled["max_rel_err"] <= 2 * baseline["max_rel_err"] else "fail")

    problem = ops.make_problem("dcn_fwd", SMALL, "cpu")
    runner = run.Runner(run.parse_args([*FAST]))
    noise = problem.noise_floor(torch.float32)
    assert runner.check(problem, "sampled", torch.float32, [10 * e for e in noise])["check"] == "fail"
    assert runner.check(problem, "sampled", torch.float32, noise)["check"] == "pass"


def test_results_are_named_by_what_they_are():
    """Each name of result_names matches its result's shape, outputs and gradients in step order."""
    problem = ops.make_problem("dcn_fwd_bwd", SMALL, "cpu")
    n, c, h, w = SMALL.dcn_shape()
    shapes = {name: tuple(t.shape) for name, t in zip(problem.result_names(), problem.step("sampled", torch.float32)())}
    assert shapes == {"output": (n, c, h, w), "grad input": (n, c, h, w), "grad offset": (n, 18, h, w),
                      "grad mask": (n, 9, h, w), "grad weight": (c, c, 3, 3), "grad bias": (c,)}

    problem = ops.make_problem("dyhead_block_fwd_bwd", SMALL, "cpu")
    results = problem.step("torchvision", torch.float32)()
    levels = {f"P{3 + i}": shape for i, shape in enumerate(SMALL.level_shapes())}
    params = {name: tuple(p.shape) for name, p in DyHead(c, c, 1).named_parameters()}
    assert len(results) == len(problem.result_names())
    assert {name: tuple(t.shape) for name, t in zip(problem.result_names(), results)} == {
        **{f"output {level}": shape for level, shape in levels.items()},
        **{f"grad {level}": shape for level, shape in levels.items()},
        **{f"grad {name}": shape for name, shape in params.items()}}


def test_reference_is_torchvisions_op_in_float64_and_a_forward_step_builds_no_graph():
    from torchvision.ops import deform_conv2d

    problem = ops.make_problem("dcn_fwd", SMALL, "cpu")
    x, offset, mask, weight, bias = problem.inputs
    (reference,) = problem.reference()
    assert torch.equal(reference, deform_conv2d(x, offset, weight, bias, padding=1, mask=mask))
    outputs = ops.make_problem("dyhead_block_fwd", SMALL, "cpu").step("sampled", torch.float32)()
    assert not any(y.requires_grad for y in outputs)  # timed as inference runs: under no_grad, parameters and all


def test_problems_sample_offsets_of_a_few_pixels():
    """Zero offsets would read a plain 3x3 window and flatter the gathers (the issue's "realistic offsets"): the DCN's
    and the offsets DyHead's first block computes are of ~2 px, and the masks in (0, 1)."""
    problem = ops.make_problem("dcn_fwd", SMALL, "cpu")
    _, offset, mask, _, _ = problem.inputs
    assert 1.0 < offset.std().item() < 4.0
    assert 0 < mask.min().item() and mask.max().item() < 1

    problem = ops.make_problem("dyhead_block_fwd", SMALL, "cpu")
    module = problem.module("torchvision", torch.float64)
    module.load_state_dict(problem.state)
    with torch.no_grad():
        offsets = module.blocks[0].spatial.offset(problem.levels[0])[:, :18]
    assert 1.0 < offsets.std().item() < 4.0
    # the same seed, the same problem: weights too (DyHead draws them from the global generator)
    again = ops.make_problem("dyhead_block_fwd", SMALL, "cpu")
    assert all(torch.equal(again.state[k], v) for k, v in problem.state.items())


def test_bfloat16_noise_floor_on_cpu_is_float16s_scaled_by_the_unit_roundoffs():
    """torchvision has no bfloat16 CPU kernel: its float16 errors x 2**-8 / 2**-11 stand in."""
    problem = ops.make_problem("dcn_fwd", SMALL, "cpu")
    half = problem.noise_floor(torch.float16)
    assert problem.noise_floor(torch.bfloat16) == pytest.approx([8 * e for e in half])


def test_check_names_the_failing_or_worst_result():
    problem = ops.make_problem("dcn_fwd_bwd", SMALL, "cpu")
    runner = run.Runner(run.parse_args([*FAST]))

    def check(*errors):
        return runner.check(problem, "torchvision", torch.float32, list(errors))

    assert check(1e-6, 0.0, 3e-5, 2e-6, 0.0, 0.0) == dict(max_rel_err=3e-5, worst="grad offset", check="pass")
    # the first result past the bound, not the largest
    assert check(1e-6, 1e-3, 1e-2, 0.0, 0.0, 0.0)["worst"] == "grad input"
    # non-finite: no largest error to show, and a failure even for the baseline (no noise floor)
    assert check(1e-6, 0.0, math.inf, 0.0, 0.0, 0.0) == dict(max_rel_err=None, worst="grad offset", check="fail")


def test_a_cuda_graph_row_times_the_captured_step(monkeypatch):
    """The runner's graph mode on the CPU, with the capture stood in: the row checks and times what the capture
    returns, and its peak memory is the capture's."""
    captured, replays = [], []

    def fake_cuda_graph(step, device):
        captured.append(step)

        def replay():
            replays.append(1)
            return step()
        return replay

    def fake_peak(step, device):
        step()
        return 123.0

    monkeypatch.setattr(run, "cuda_graph", fake_cuda_graph)
    monkeypatch.setattr(run, "peak_memory_mb", fake_peak)
    args = run.parse_args([*FAST])
    args.cuda_graphs = True  # parse_args refuses it without a GPU
    record = run.Runner(args).row("dcn_fwd", "sampled", "float32")
    assert len(captured) == 1 and record["check"] == "pass"
    assert record["peak_mem_mb"] == 123.0
    assert len(replays) >= 1 + record["reps"]  # the check's call and every timed one replay the capture


def test_a_row_records_the_timing_of_its_step(monkeypatch):
    policies = []

    def measure(step, device, policy):
        policies.append(policy)
        return Timing(median_ms=2.0, p20_ms=1.0, p80_ms=4.0, reps=7)

    monkeypatch.setattr(run, "measure", measure)
    runner = run.Runner(run.parse_args([*FAST]))
    record = runner.row("dcn_fwd_bwd", "sampled", "float32")
    assert policies == [runner.policy]
    assert (record["median_ms"], record["p20_ms"], record["p80_ms"], record["reps"]) == (2.0, 1.0, 4.0, 7)
    assert record["tflops"] == pytest.approx(3 * dcn_flops(1, 32, 32, 16, 24) / 2e-3 / 1e12)


def test_triton_in_bfloat16_on_cpu_notes_the_interpreters_broken_bfloat16(monkeypatch):
    real = ops.dcn_function
    monkeypatch.setattr(ops, "dcn_function", lambda impl: real("sampled"))  # the interpreter's run is not the point
    record = run.Runner(run.parse_args([*FAST])).row("dcn_fwd", "triton", "bfloat16")
    assert record["median_ms"] is None
    assert record["note"] == ("Triton interpreter: checked, not timed (the interpreter's bfloat16 is broken: expect a "
                              "failed check)")


def test_profile_of_a_step_after_its_warm_up(monkeypatch):
    """Compilation and autotuning stay out of the profile; one profiled step on the CPU, whose profiler costs
    seconds a step; a spent budget skips it."""
    calls = []

    class Problem:
        def step(self, impl, dtype):
            return lambda: calls.append((impl, dtype))

    monkeypatch.setattr(run.profile, "breakdown", lambda step, device, iters: {"before": list(calls), "iters": iters})
    runner = run.Runner(run.parse_args([*FAST]))
    runner.problems[run.PROFILE_OP] = Problem()
    assert runner.profile("sampled", "float16") == {
        "op": run.PROFILE_OP, "impl": "sampled", "dtype": "float16", "device": "cpu",
        "shape": SMALL.describe(pyramid=True), "before": [("sampled", torch.float16)], "iters": 1}
    runner.args.budget = 0
    assert runner.profile("sampled", "float16")["error"].startswith(records.SKIPPED)


def test_main_profiles_the_first_dtype_and_charts_this_runs_shapes(tmp_path, monkeypatch):
    """Rows, profiles and the chart stood in. The file of the day may hold rows of other shape sets: the chart
    shows this run's."""
    def row(self, op, impl, dtype):
        return records.make_record(op, impl, dtype, "cpu", SMALL.describe(pyramid=True), median_ms=1.0)

    profiled, charted = [], []
    monkeypatch.setattr(run.Runner, "row", row)
    monkeypatch.setattr(run.Runner, "profile", lambda self, impl, dtype: profiled.append((impl, dtype)) or {
        "op": run.PROFILE_OP, "impl": impl, "dtype": dtype, "device": "cpu", "shape": "s", "error": "stood in"})
    monkeypatch.setattr(report, "can_chart", lambda: True)
    monkeypatch.setattr(report, "chart", lambda rows, title, path: charted.append(rows) or Path(path))
    meta = records.make_meta(torch.device("cpu"), "earlier")
    path = records.results_path(tmp_path, meta, torch.device("cpu"))
    earlier = records.make_record(run.PROFILE_OP, "sampled", "float32", "cpu", "2x64x[...]", median_ms=9.0)
    records.write(path, {"meta": meta, "records": [earlier]})
    torch.set_num_threads(2)
    argv = ["--device", "cpu", "--shapes", "small", "--out", str(tmp_path), "--ops", run.PROFILE_OP,
            "--impls", "torchvision,sampled", "--dtypes", "float16,float32", "--threads", "1"]
    assert run.main(argv) == 0
    assert torch.get_num_threads() == 1
    assert profiled == [("torchvision", "float16"), ("sampled", "float16")]
    assert "Not profiled: stood in" in Path(f"{path.with_suffix('')}-profile.md").read_text()
    (rows,) = charted
    assert len(rows) == 4 and {r["shape"] for r in rows} == {SMALL.describe(pyramid=True)}
    assert run.main([*argv, "--no-profile"]) == 0
    assert len(profiled) == 2


@pytest.mark.parametrize("interpret", [False, True])
def test_default_impls_on_cpu_leave_out_triton_without_the_interpreter(monkeypatch, interpret):
    monkeypatch.setattr(run.runtime, "INTERPRET", interpret)
    assert run.parse_args(["--device", "cpu"]).impls == ["triton", "torchvision", "sampled"][not interpret:]
    assert run.parse_args(["--device", "cpu", "--impls", "triton"]).impls == ["triton"]


def _gpus(monkeypatch, count):
    """torch finds `count` CUDA devices."""
    monkeypatch.setattr(run.torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(run.torch.cuda, "device_count", lambda: count)


def test_defaults_follow_the_device(monkeypatch):
    monkeypatch.setattr(run.runtime, "INTERPRET", False)
    _gpus(monkeypatch, 1)
    gpu = run.parse_args(["--device", "cuda"])
    assert (gpu.shapes, gpu.budget, gpu.impls) == (COCO, run.GPU_BUDGET_S, list(ops.IMPLS))
    cpu = run.parse_args(["--device", "cpu"])
    assert (cpu.shapes, cpu.budget) == (SMALL, math.inf)
    assert run.parse_args(["--shapes", "medium"]).shapes.levels[0] == (32, 48)  # as --help describes it


def test_a_long_error_is_cut_in_the_record():
    text = run._error_text(RuntimeError("x" * 1000))
    assert len(text) == run.ERROR_CHARS and text.startswith("RuntimeError: xxx") and text.endswith("x...")


def test_torchvision_in_bfloat16_on_cpu_says_why_it_has_no_row(tmp_path, capsys):
    """It has neither a bfloat16 CPU kernel nor CPU autocast: the table's note says so, where torchvision's own
    error left room for no more than a C++ source path."""
    _, content = run_main(tmp_path, "--ops", "dcn_fwd", "--impls", "torchvision", "--dtypes", "bfloat16")
    (r,) = content["records"]
    assert r["median_ms"] is None
    assert r["error"] == "NotImplementedError: torchvision has no bfloat16 CPU kernel nor CPU autocast"
    assert "| NotImplementedError: torchvision has no bfloat16 CPU kernel nor CPU autocast |" in capsys.readouterr().out


def test_results_file_is_written_after_every_row(tmp_path, monkeypatch, capsys):
    """A run cut short keeps the rows it measured; Ctrl-C ends it with exit status 130 and one line naming the
    file, not a traceback."""
    rows = []

    def row(self, op, impl, dtype):
        if rows:
            raise KeyboardInterrupt
        rows.append(records.make_record(op, impl, dtype, "cpu", "s", median_ms=1.0))
        return rows[-1]

    monkeypatch.setattr(run.Runner, "row", row)
    assert run.main([*FAST, "--out", str(tmp_path), "--ops", "dcn_fwd", "--impls", "torchvision,sampled"]) == 130
    (path,) = tmp_path.glob("cpu-*.json")
    assert json.loads(path.read_text())["records"] == rows
    assert capsys.readouterr().err.endswith(f"\npython -m benchmarks.run: interrupted by SIGINT; {path} holds the rows "
                                            "measured before\n")
