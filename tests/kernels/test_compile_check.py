"""The triton path compiles for an H100 (sm_90) on a machine without a GPU (`benchmarks.compile_check`).

The interpreter runs the kernels' math but never builds them for a GPU: a kernel can pass every CPU test and
still fail to compile (a layout the NVIDIA backend rejects, a tile that overflows shared memory). These tests
compile every kernel of the triton path, in every dtype, with Triton's own NVIDIA backend and ptxas, in a
subprocess without TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SM90_REGISTERS = 255  # per thread
SM90_SHARED_BYTES = 227 * 1024  # per block, the opt-in maximum


def _run(args, tmp_path, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A fresh cache: the kernels are compiled here, not read back from an earlier run's binaries.
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compile-check")
    out = tmp_path / "sm90.json"
    proc = _run(["-m", "benchmarks.compile_check", "--arch", "90", "--shapes", "small", "--first-config",
                 "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_sm90_in_every_dtype(sm90):
    records = sm90["records"]
    assert sm90["meta"]["uncovered"] == []
    assert [r for r in records if r["error"]] == []
    assert {r["dtype"] for r in records} == {"bfloat16", "float16", "float32", "float64"}
    for r in records:
        assert 0 < r["registers"] <= SM90_REGISTERS, r
        assert 0 <= r["shared_bytes"] <= SM90_SHARED_BYTES, r


def test_both_conv_launch_forms_and_both_backward_modes_are_compiled(sm90):
    def variants(kernel, dtype, name):
        return {r["constexprs"][name] for r in sm90["records"] if r["kernel"] == kernel and r["dtype"] == dtype}

    for dtype in ("bfloat16", "float32", "float64"):
        assert variants("_fwd_kernel", dtype, "GROUPED") == {False, True}
        assert variants("_bwd_kernel", dtype, "GROUPED") == {False, True}
        assert variants("_bwd_kernel", dtype, "DETERMINISTIC") == {False, True}
        assert variants("_fwd_kernel", dtype, "FP64") == {dtype == "float64"}


def test_a_kernel_that_cannot_build_is_reported_and_the_run_goes_on(tmp_path):
    # tl.arange needs a power-of-two length: BLOCK=12 cannot build, BLOCK=16 can.
    script = textwrap.dedent("""
        import json, torch, triton, triton.language as tl
        from benchmarks.compile_check import Session, intercept_launches

        @triton.jit
        def _copy_kernel(a_ptr, out_ptr, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            tl.store(out_ptr + i, tl.load(a_ptr + i) * 2)

        @triton.autotune(configs=[triton.Config({}, num_warps=1), triton.Config({}, num_warps=2)], key=[])
        @triton.jit
        def _tuned_kernel(a_ptr, out_ptr, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            tl.store(out_ptr + i, tl.load(a_ptr + i))

        session = Session(arch=90, first_config=False, workload="probe", dtype="float32")
        with intercept_launches(session):
            a = torch.zeros(16)
            _copy_kernel[(1,)](a, torch.empty_like(a), BLOCK=12)
            for _ in range(2):  # one specialization, compiled and recorded once
                _copy_kernel[(1,)](a, torch.empty_like(a), BLOCK=16)
            _tuned_kernel[(1,)](a, torch.empty_like(a), BLOCK=16)
        print(json.dumps([[r.kernel, r.constexprs["BLOCK"], r.num_warps, r.error, r.registers]
                          for r in session.records]))
    """)
    probe = tmp_path / "probe.py"  # Triton reads a kernel's source from its file
    probe.write_text(script)
    proc = _run([str(probe)], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    block12, block16, *tuned = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (block12[:2], block16[:2]) == (["_copy_kernel", 12], ["_copy_kernel", 16])
    assert block12[3] and "power of 2" in block12[3]
    assert block16[3] is None and block16[4] > 0
    # without first_config every config of an autotuned kernel is compiled
    assert [(kernel, warps) for kernel, _, warps, _, _ in tuned] == [("_tuned_kernel", 1), ("_tuned_kernel", 2)]


def test_main_fails_when_a_kernel_fails_or_none_launched_it(tmp_path, monkeypatch):
    """The exit status a CI step reads: 1 for a failed compile and for a kernel the workloads never launched
    (listed in the JSON's meta), 0 otherwise."""
    from benchmarks import compile_check

    def check(arch, dtypes, shapes, first_config):
        return compile_check.Session(arch, first_config, records=[
            compile_check.Compiled(kernel, "dcn", "float32", {}, 4, 3, registers=32, stack_bytes=0, shared_bytes=0,
                                   error=error) for kernel, error in launched])

    monkeypatch.setattr(compile_check, "INTERPRET", False)
    monkeypatch.setattr(compile_check, "check", check)
    monkeypatch.setattr(compile_check, "defined_kernels", lambda: {"_fwd_kernel", "_bwd_kernel"})
    out = tmp_path / "out.json"
    for launched, status, uncovered in [([("_fwd_kernel", None), ("_bwd_kernel", None)], 0, []),
                                        ([("_fwd_kernel", None)], 1, ["_bwd_kernel"]),
                                        ([("_fwd_kernel", None), ("_bwd_kernel", "CompilationError")], 1, [])]:
        assert compile_check.main(["--json", str(out)]) == status
        assert json.loads(out.read_text())["meta"]["uncovered"] == uncovered


def test_the_conv_kernels_keep_their_wide_memory_accesses(sm90):
    """The DCN kernels' speed rests on vectorized global memory access (kernels/PERF_NOTES.md): the bilinear corner
    gathers as 16-byte cp.async into shared memory, grad input as 4-wide fp32 atomics, the one-level y as 16-byte
    stores. A change that loses an alignment proof makes Triton fall back to 2-byte accesses, still correct and
    several times slower (once: 224 ld.global.b16 per thread in the forward, under triton 3.6); only the PTX
    shows it."""
    def ops(kernel, **constexprs):
        (record,) = [r for r in sm90["records"] if r["kernel"] == kernel and r["dtype"] == "bfloat16"
                     and all(r["constexprs"][k] == v for k, v in constexprs.items())]
        return record["global_ops"]

    for grouped in (False, True):
        forward = ops("_fwd_kernel", GROUPED=grouped)
        backward = ops("_bwd_kernel", GROUPED=grouped, DETERMINISTIC=False)
        for kernel in (forward, backward):
            assert kernel.get("cp.async.cg.shared.global/16", 0) >= 16, kernel
            # The per-pixel offset and mask values of a tap are the only 2-byte loads.
            assert kernel.get("ld.global.b16", 0) <= 32, kernel
        assert backward.get("atom.global.gpu.relaxed.add.v4.f32", 0) >= 16, backward
    assert ops("_fwd_kernel", GROUPED=False).get("st.global.v4.b32", 0) >= 16


def test_global_ops_counts_the_ptxs_global_accesses_by_width():
    from benchmarks.compile_check import global_ops

    ptx = textwrap.dedent("""
        ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];
        @%p1 ld.global.b16 {%rs1}, [%rd2];
        @!%p2 st.global.v4.b32 [%rd3], {%r5, %r6, %r7, %r8};
        cp.async.cg.shared.global [ %r9 + 0 ], [ %rd4 + 0 ], 0x10, %r10;
        cp.async.cg.shared.global [ %r11 + 0 ], [ %rd5 + 0 ], 16;
        @%p3 cp.async.ca.shared.global [ %r12 + 0 ], [ %rd6 + 0 ], 4, %r13;
        atom.global.gpu.relaxed.add.v4.f32 {%f1, %f2, %f3, %f4}, [%rd7], {%f5, %f6, %f7, %f8};
        ld.shared.b32 %r14, [%r15];
        // ld.global.b32 in a comment
    """)
    assert global_ops(ptx) == {"atom.global.gpu.relaxed.add.v4.f32": 1, "cp.async.ca.shared.global/4": 1,
                               "cp.async.cg.shared.global/16": 2, "ld.global.b16": 1, "ld.global.v4.b32": 1,
                               "st.global.v4.b32": 1}


def test_table_rows_of_compiled_and_failed_kernels():
    from benchmarks.compile_check import Compiled, Session, table

    session = Session(arch=90, first_config=False, records=[
        Compiled("_fwd_kernel", "dcn", "bfloat16", {"ACC": "fp32", "BLOCK": 64}, 8, 3, registers=168, stack_bytes=0,
                 shared_bytes=49152, compile_s=2.5),
        Compiled("_bwd_kernel", "dcn", "float32", {"BLOCK": 128}, 4, 2, error="CompilationError: out of resource\nat")])
    lines = table(session).splitlines()
    assert lines[2] == "| _fwd_kernel | bfloat16 | BLOCK=64 | 8 | 3 | 168 | 0 | 48.0 | 2.5 |"
    assert lines[3] == "| _bwd_kernel | float32 | BLOCK=128 | 4 | 2 | FAILED: CompilationError: out of resource | | | |"

