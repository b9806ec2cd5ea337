"""The ahead-of-time check (``make aot``): SASS parsing, the bandwidth ceiling, and one
real compilation of the row-stats kernel for sm_90 with no GPU.

The parsing tests run on hand-written listings whose loop sizes are known by construction.
The compile tests run ``python -m benchmarks.static.aot`` in a subprocess: pytest sets
``TRITON_INTERPRET=1`` for the rest of the suite, under which ``triton.jit`` gives
interpreted functions that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.static import sass

ROOT = Path(__file__).resolve().parent.parent

# nvdisasm -c -g layout: a prologue, a 6-instruction loop (.L_x_1 .. backward BRA) holding
# one 128-bit load, the exit, and the self-branch trap that ends every kernel.
SASS_ONE_LOOP = """\
        .global         k
k:
\t//## File "/src/kern.py", line 10
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   MOV R2, RZ ;
.L_x_1:
\t//## File "/src/kern.py", line 13
        /*0020*/                   LDG.E.128 R4, desc[UR4][R8.64] ;
        /*0030*/                   FADD R2, R2, R4 ;
        /*0040*/                   MUFU.EX2 R5, R5 ;
        /*0050*/                   FADD R2, R2, R5 ;
\t//## File "/src/kern.py", line 12
        /*0060*/                   ISETP.GE.AND P0, PT, R3, R0, PT ;
        /*0070*/              @!P0 BRA `(.L_x_1) ;
        /*0080*/                   EXIT ;
.L_x_2:
        /*0090*/                   BRA `(.L_x_2);
        /*00a0*/                   NOP;
"""

# The same loop unrolled four times by ptxas: four loads per trip, and its PTX loop with one.
SASS_UNROLLED = """\
.L_x_3:
\t//## File "/src/kern.py", line 13
        /*0100*/                   LDG.E.128 R4, desc[UR4][R8.64] ;
        /*0110*/                   LDG.E.128 R8, desc[UR4][R8.64+0x10] ;
        /*0120*/                   LDG.E.128 R12, desc[UR4][R8.64+0x20] ;
        /*0130*/                   LDG.E.128 R16, desc[UR4][R8.64+0x30] ;
        /*0140*/                   FADD R2, R2, R4 ;
        /*0150*/                   FADD R2, R2, R8 ;
        /*0160*/                   FADD R2, R2, R12 ;
        /*0170*/                   FADD R2, R2, R16 ;
\t//## File "/src/kern.py", line 12
        /*0180*/              @!P0 BRA `(.L_x_3) ;
"""

PTX_ONE_LOOP = """\
\t.file\t1 "/src/kern.py"
$L__BB0_2:
\t.loc\t1 13 12
\tld.global.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd4 + 0 ];
\tadd.f32 \t%r2, %r2, %r5;
\t.loc\t1 12 5
\t@%p2 bra \t$L__BB0_2;
\tret;
"""

KERNEL_SOURCE = """\
@triton.jit
def k(x_ptr, n):
    acc = 0.0
    for start in range(0, n, 1024):
        acc += tl.load(x_ptr + start)
    tl.store(x_ptr, acc)
"""  # starts at line 9 of /src/kern.py: the `for` is line 12, its body line 13


def test_find_loops_counts_the_loop_body_and_skips_the_trap():
    loops = sass.find_loops(SASS_ONE_LOOP)
    assert len(loops) == 1
    loop = loops[0]
    assert (loop.start, loop.end) == (0x20, 0x70)
    assert loop.count() == 6
    assert loop.count_family("MUFU") == 1
    assert sass.global_memory_ops(loop) == 1


def test_loop_is_attributed_to_its_for_statement():
    declared = sass.source_loops("k", KERNEL_SOURCE, "/src/kern.py", 9)
    assert [(s.function, s.ordinal, s.first, s.last) for s in declared] == [("k", 0, 12, 13)]
    (loop,) = sass.find_loops(SASS_ONE_LOOP)
    assert sass.attribute_loop(loop, declared) == declared[0]
    # The same lines in another file are another function's loop.
    elsewhere = sass.source_loops("k", KERNEL_SOURCE, "/src/other.py", 9)
    assert sass.attribute_loop(loop, elsewhere) is None


def test_unroll_factor_from_memory_operations_of_sass_and_ptx():
    (ptx_loop,) = sass.find_ptx_loops(PTX_ONE_LOOP)
    assert sass.global_memory_ops(ptx_loop) == 1
    assert ptx_loop.back_edge.line == 12 and ptx_loop.back_edge.file == "/src/kern.py"
    (unrolled,) = sass.find_loops(SASS_UNROLLED)
    assert sass.unroll_factor(unrolled, [ptx_loop]) == 4
    (plain,) = sass.find_loops(SASS_ONE_LOOP)
    assert sass.unroll_factor(plain, [ptx_loop]) == 1


def test_raw_listing_of_two_kernels_is_split_and_rebased():
    # nvdisasm -b SM90a over two concatenated .text sections: kernel 1 starts at 0x40 and
    # its loop branches back to 0x50 (0x10 within the kernel).
    listing = """\
        /*0000*/                   MOV R2, RZ ;
        /*0010*/                   FADD R2, R2, R3 ;
        /*0020*/              @P0 BRA 0x10 ;
        /*0030*/                   EXIT ;
        /*0040*/                   MOV R2, RZ ;
        /*0050*/                   LDG.E R4, desc[UR4][R8.64] ;
        /*0060*/                   FADD R2, R2, R4 ;
        /*0070*/              @!P0 BRA 0x50 ;
        /*0080*/                   EXIT ;
"""
    first, second = sass.split_raw_sass(listing, [0x0, 0x40])
    assert [i.addr for i in second] == [0x0, 0x10, 0x20, 0x30, 0x40]
    (loop_a,) = sass.find_raw_loops(first)
    (loop_b,) = sass.find_raw_loops(second)
    assert (loop_a.start, loop_a.end, loop_a.count()) == (0x10, 0x20, 2)
    assert (loop_b.start, loop_b.end, loop_b.count()) == (0x10, 0x30, 3)
    assert sass.global_memory_ops(loop_b) == 1


def test_nested_loops_count_each_instruction_once():
    text = """\
.L_x_0:
        /*0000*/                   IADD3 R1, R1, 0x1, RZ ;
.L_x_1:
        /*0010*/                   FADD R2, R2, R3 ;
        /*0020*/                   FADD R2, R2, R4 ;
        /*0030*/              @P0 BRA `(.L_x_1) ;
        /*0040*/                   ISETP.GE.AND P1, PT, R1, R0, PT ;
        /*0050*/              @!P1 BRA `(.L_x_0) ;
"""
    outer, inner = sass.find_loops(text)
    assert inner.count() == 3 and not inner.nested
    assert outer.count() == 3 and outer.nested


def test_ptxas_report_and_resource_usage_are_parsed():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 24 bytes cumulative stack size\n"
    )
    assert sass.parse_ptxas_log(log) == {
        "registers": 255,
        "stack": 24,
        "spill_stores": 16,
        "spill_loads": 12,
        "static_smem": 0,
    }
    with pytest.raises(ValueError, match="registers"):
        sass.parse_ptxas_log("ptxas info    : Compile time = 1 ms")
    usage = (
        "Resource usage:\n Common:\n  GLOBAL:11\n Function k:\n"
        "  REG:27 STACK:0 SHARED:1024 LOCAL:8 CONSTANT[0]:600 TEXTURE:0\n"
    )
    fields = sass.parse_resource_usage(usage, "k")
    assert (fields["REG"], fields["SHARED"], fields["LOCAL"]) == (27, 1024, 8)


def test_ceiling_reproduces_the_issue_figures():
    # H100 SXM5: 132 SMs x 4 warp-instructions/clk x 1.98 GHz x 32 lanes, 3.35 TB/s, bf16
    # read-only (2 B per element), 8 elements per thread per trip. By hand: 28.2 instr per
    # element -> 132*4*1.98e9*32/28.2*2/3.35e12 = 0.708; 35.4 -> 0.564; 17.6 -> capped at 1.
    h100 = sass.MACHINES[90]
    assert sass.ceiling(17.6 * 8, 0, 8, 2, h100).ceiling == 1.0
    assert sass.ceiling(28.2 * 8, 0, 8, 2, h100).ceiling == pytest.approx(0.708, abs=0.002)
    assert sass.ceiling(35.4 * 8, 0, 8, 2, h100).ceiling == pytest.approx(0.564, abs=0.002)
    # MUFU: 16 results/clk/SM; 2 exp per element with a 4 B element is far from binding,
    # 8 per element of 2 B is 132*16*1.98e9/8*2/3.35e12 = 0.312.
    bound = sass.ceiling(8 * 8, 8 * 8, 8, 2, h100)
    assert bound.bound == "mufu" and bound.ceiling == pytest.approx(0.312, abs=0.002)


def _run_aot(tmp_path: Path, modules: str) -> tuple:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    args = [sys.executable, "-m", "benchmarks.static.aot", "--arch", "90", "--jobs", "1"]
    args += ["--modules", modules, "--json", str(out)]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    rows = json.loads(out.read_text()) if out.exists() else []
    return proc, {f"{r['kernel']}/{r['variant']}": r for r in rows}


def _cuda_compile_unavailable() -> str:
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as err:  # the wheel has no CUDA backend (e.g. a CPU-only build)
        return f"triton cannot compile for CUDA here: {err}"
    return ""


@pytest.mark.slow
@pytest.mark.skipif(bool(_cuda_compile_unavailable()), reason=_cuda_compile_unavailable())
def test_sample_kernels_compile_for_sm90_and_the_gate_says_why(tmp_path):
    """tests/aot_sample_kernels.py: loops whose content is known from their source."""
    proc, rows = _run_aot(tmp_path, "tests.aot_sample_kernels")
    assert set(rows) == {"sum_exp/bf16/exps=1", "sum_exp/bf16/exps=6", "wide/bf16/one-warp"}, (
        proc.stdout + proc.stderr
    )
    for row in rows.values():
        assert row["error"] is None
        # ptxas' report and cuobjdump's resource table are two readings of one binary.
        assert 0 < row["registers"] <= 255
        assert row["registers"] == row["registers_cuobjdump"]
    for exps in (1, 6):
        row = rows[f"sum_exp/bf16/exps={exps}"]
        assert row["spill_stores"] == row["spill_loads"] == row["local"] == row["stack"] == 0
        exp_sum, copy = row["loops"]
        # 4096 bf16 over 16 warps: 8 per thread per trip, one 16-byte load, `exps`
        # exponentials per element; the copy loop (in a called jit function) loads and
        # stores one vector per trip. Counts are per trip whatever ptxas unrolled.
        assert (exp_sum["name"], copy["name"]) == ("exp-sum", "copy")
        assert exp_sum["elements_per_thread"] == copy["elements_per_thread"] == 8
        assert exp_sum["histogram"]["LDG"] == 1
        assert exp_sum["histogram"]["MUFU"] == 8 * exps
        assert copy["histogram"]["LDG"] == copy["histogram"]["STG"] == 1
        assert copy["source"].startswith("_copy_row:")
    # One exp per bf16 element is far from any limit; six saturate the MUFU unit at
    # 132*16*1.98e9/6*2/3.35e12 = 41.6% of H100 bandwidth.
    assert rows["sum_exp/bf16/exps=1"]["loops"][0]["ceiling"] == 1.0
    heavy = rows["sum_exp/bf16/exps=6"]["loops"][0]
    assert heavy["bound"] == "mufu" and heavy["ceiling"] == pytest.approx(0.416, abs=0.002)
    # 8192 fp32 accumulators on one warp (256 per thread) cannot fit in 255 registers.
    wide = rows["wide/bf16/one-warp"]
    assert wide["spill_stores"] > 0 and wide["stack"] > 0
    assert proc.returncode == 1
    assert "ceiling: loop 'exp-sum'" in proc.stdout and "spills:" in proc.stdout
    assert "make aot: FAILED (2 of 3 compilations" in proc.stdout


GATES_SCRIPT = """
import json
from benchmarks.static.variants import WIDE_SOFTCAP_GATES, aot_variants
rows = [
    [r.kernel, r.variant, loop.name, loop.function, loop.bytes_per_element, loop.min_ceiling]
    for r in aot_variants()
    for loop in r.loops
]
gates = [[unit_t, entropy, gate] for (unit_t, entropy), gate in WIDE_SOFTCAP_GATES.items()]
print(json.dumps([rows, gates]))
"""


def test_every_streaming_loop_holds_the_default_gate():
    """No loop record lowers the 85% gate (the soft-capped statistics at T != 1 once
    needed 75%) but the wide soft-cap's 16-bit running-max statistics (caps above 64,
    whose accurate tanh costs a series per element: variants.WIDE_SOFTCAP_GATES), and only
    where it falls short: with entropy at T = 1, always at T != 1. The only loop left out
    of the gate is the running-max walk of the fixed-reference variants (16-bit,
    soft-capped, T != 1), which re-reads only rows that lost terms to underflow, and
    those variants' fixed-reference walk is gated."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", GATES_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    rows, gates = json.loads(proc.stdout)
    wide_gates = {(unit_t, entropy): gate for unit_t, entropy, gate in gates}
    assert set(wide_gates) == {(True, True), (False, False), (False, True)}
    assert all(0.5 <= gate < 0.85 for gate in wide_gates.values())
    ungated, fixed_walks, gated = set(), set(), set()
    for kernel, variant, loop, function, bytes_per_element, gate in rows:
        dtype, temperature, transform, what = variant.split("/")[:4]
        if gate is not None:
            entropy = what in ("stats", "entropy")
            assert transform == "softcap-wide" and dtype != "fp32", (kernel, variant, loop)
            assert function == "_summarize_running_max", (kernel, variant, loop)
            assert gate == wide_gates[(temperature == "T=1", entropy)], (kernel, variant)
            gated.add((kernel, dtype, temperature, entropy))
        fixed = dtype != "fp32" and temperature == "T!=1" and transform == "softcap"
        if bytes_per_element is None:
            ungated.add((kernel, loop, fixed))
        elif loop == "stats" and fixed:
            fixed_walks.add(kernel)
    assert ungated == {
        ("token_pass", "stats-fallback", True),
        ("partial_stats", "stats-fallback", True),
    }
    assert fixed_walks == {"token_pass", "partial_stats"}
    assert gated == {
        (kernel, dtype, temperature, entropy)
        for kernel in ("token_pass", "partial_stats")
        for dtype in ("bf16", "fp16")
        for temperature, entropy in [("T=1", True), ("T!=1", False), ("T!=1", True)]
    }


FUSION_SCRIPT = """
import json
from benchmarks.static.variants import aot_variants
kernels = {(r.kernel, repr(r.options().get("enable_fp_fusion"))) for r in aot_variants()}
print(json.dumps(sorted(kernels)))
"""


def test_every_launch_names_the_fp_fusion_switch():
    """The instruction counts assume fused multiply-adds; Triton 3.9 warns that its default
    turns them off in 3.10. Every variant ``make aot`` compiles (built from the same launch
    code as the wrappers' launches) passes ``enable_fp_fusion=True`` explicitly, so a
    change of the compiler's default cannot move the figures or the kernels' speed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", FUSION_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    kernels = json.loads(proc.stdout)
    assert {kernel for kernel, _ in kernels} == {"token_pass", "partial_stats", "row_grad"}
    assert {fusion for _, fusion in kernels} == {"True"}
