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

from benchmarks.static import machines, report, sass, worker
from benchmarks.static.records import HotLoop

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


def test_ceiling_reproduces_published_rates_per_architecture():
    # Rates from the data sheets, worked by hand (not from the tool): SMs x clock x lanes.
    # H100 SXM5 and H200: 132 SMs, 1.98 GHz, 128 issue lanes (4 warp-instructions x 32),
    # 128 FP32 lanes, 16 MUFU; 3.35 and 4.8 TB/s. A100 SXM4: 108 SMs, 1.41 GHz, 128 issue
    # lanes, 64 FP32 lanes, 16 MUFU; 2.039 TB/s.
    h100, h200, a100 = machines.H100, machines.H200, machines.A100
    assert machines.MACHINES == {80: (a100,), 90: (h100, h200)}

    def issue_only(per_element, bytes_per_element, machine):
        counts = {"issue": per_element * 8}
        return machines.loop_ceiling(counts, 8, bytes_per_element, machine)

    # 28.2 instructions per bf16 element (2 B, read once): 132*1.98e9*128/28.2*2 = 2.373e12
    # B/s, 0.708 of 3.35e12 and 0.494 of 4.8e12; 17.6 per element reaches HBM on the H100
    # (1.135) but not on the H200 (0.792).
    assert issue_only(28.2, 2, h100).ceiling == pytest.approx(0.708, abs=0.002)
    assert issue_only(28.2, 2, h200).ceiling == pytest.approx(0.494, abs=0.002)
    assert issue_only(17.6, 2, h100).ceiling == 1.0
    low = issue_only(17.6, 2, h200)
    assert low.bound == "issue" and low.ceiling == pytest.approx(0.792, abs=0.002)
    # A loop of 16 instructions per element, 12 of them FP32 (FFMA/FADD/FMUL): on the A100
    # issue allows 108*1.41e9*128/16*2 = 2.437e12 B/s (1.195 of 2.039e12) but the FP32
    # pipe 108*1.41e9*64/12*2 = 1.624e12 (0.797); on the H100 the FP32 pipe runs at the
    # issue rate (128 lanes) and the loop reaches HBM.
    mixed = {"issue": 16 * 8, "fp32": 12 * 8}
    on_a100 = machines.loop_ceiling(mixed, 8, 2, a100)
    assert on_a100.bound == "fp32" and on_a100.ceiling == pytest.approx(0.797, abs=0.002)
    assert on_a100.pipes["issue"] == pytest.approx(1.195, abs=0.002)
    assert machines.loop_ceiling(mixed, 8, 2, h100).bound == "hbm"
    # MUFU, 16 results per SM per clock: 8 per 2-byte element is 132*16*1.98e9/8*2 =
    # 1.045e12 B/s, 0.312 of the H100's HBM and 0.218 of the H200's.
    mufu = {"issue": 8 * 8, "mufu": 8 * 8}
    assert machines.loop_ceiling(mufu, 8, 2, h100).ceiling == pytest.approx(0.312, abs=0.002)
    on_h200 = machines.loop_ceiling(mufu, 8, 2, h200)
    assert on_h200.bound == "mufu" and on_h200.ceiling == pytest.approx(0.218, abs=0.002)


def test_opcodes_are_classed_into_pipes():
    histogram = {
        "FFMA": 3, "FADD": 2, "FMUL": 1,  # fp32
        "MUFU": 2,  # special functions
        "FMNMX": 4, "FSETP": 1, "ISETP": 1,  # compare, minimum, maximum
        "FSEL": 5, "IMAD": 7, "F2FP": 1, "LDG": 1, "BRA": 1,  # issue only
    }  # fmt: skip
    assert machines.pipe_counts(histogram) == {
        "issue": 29.0,
        "fp32": 6.0,
        "mufu": 2.0,
        "compare": 6.0,
    }


def test_whole_row_pays_for_head_and_tail_blocks():
    # A walk of 8192-element blocks with an aligned head and a tail outside its loop: at
    # V = 50257 it runs 6 whole blocks + 2 = 8 blocks' work for 6.13 blocks of data, so a
    # loop that allows 2x HBM bandwidth allows 2 * 50257 / 65536 = 1.534x over the row,
    # and one at 1x loses 23%. A masked loop without edges runs ceil(V / 8192) = 7 blocks.
    assert machines.blocks_per_row(50257, 8192, 2) == 8
    assert machines.blocks_per_row(50257, 8192, 0) == 7
    assert machines.blocks_per_row(262144, 8192, 2) == 34  # the empty tail still runs
    h100 = machines.H100
    lanes = h100.sms * h100.clock_hz * 128
    # Instructions per thread per trip (512 threads, 16 elements each) for exactly 2x.
    per_trip = lanes * 16 * 2 / (2 * h100.hbm_bytes_per_s)
    walk = machines.Phase({"issue": per_trip}, 512, 8192, 2, 2)
    loop = machines.loop_ceiling(walk.counts, 16, 2, h100)
    assert loop.pipes["issue"] == pytest.approx(2.0)
    row = machines.row_ceiling([walk], 50257, h100)
    assert row.pipes["issue"] == pytest.approx(2 * 50257 / 65536)
    at_one = machines.Phase({"issue": per_trip * 2}, 512, 8192, 2, 2)
    assert machines.row_ceiling([at_one], 50257, h100).ceiling == pytest.approx(0.767, abs=0.001)
    # Two walks of one row (statistics, then the gradient): pipe times add, bytes add.
    both = machines.row_ceiling([walk, walk], 50257, h100)
    assert both.pipes["issue"] == pytest.approx(row.pipes["issue"])
    slower = machines.row_ceiling([walk, at_one], 50257, h100)
    assert slower.pipes["issue"] == pytest.approx(2 * (2 * 50257 / 65536) / 3)


# A planted pair of loops in /src/plant.py: the kernel's loop (lines 28-29: load, exp,
# store) and, inlined from `zero`, a zero-fill loop (lines 22-23). ptxas lays the zero-fill
# loop out first and unrolls it twice, so its two stores per trip match the kernel loop's
# two memory operations in the PTX, which lists the kernel's loop first: pairing by
# position would give the kernel's loop the zero-fill's counts.
PLANT_ZERO = """\
@triton.jit
def zero(p, n):
    for s in range(0, n, 32):
        tl.store(p + s, 0.0)
"""  # lines 20-23
PLANT_KERNEL = """\
@triton.jit
def k(x, y, n):
    for s in range(0, n, 32):
        tl.store(y + s, tl.exp2(tl.load(x + s)))
    zero(y, n)
"""  # lines 26-30

PLANT_ZERO_SASS = """\
.L_x_0:
\t//## File "/src/plant.py", line 23
        /*0020*/                   STG.E desc[UR4][R2.64], RZ ;
        /*0030*/                   STG.E desc[UR4][R2.64+0x80], RZ ;
\t//## File "/src/plant.py", line 22
        /*0040*/                   IADD3 R0, R0, 0x40, RZ ;
        /*0050*/                   ISETP.GE.AND P0, PT, R0, R5, PT ;
        /*0060*/              @!P0 BRA `(.L_x_0) ;
"""
PLANT_KERNEL_SASS = """\
.L_x_1:
\t//## File "/src/plant.py", line 29
        /*0100*/                   LDG.E R4, desc[UR4][R8.64] ;
        /*0110*/                   FMUL R4, R4, 1 ;
        /*0120*/                   MUFU.EX2 R4, R4 ;
        /*0130*/                   STG.E desc[UR4][R10.64], R4 ;
\t//## File "/src/plant.py", line 28
        /*0140*/                   IADD3 R0, R0, 0x20, RZ ;
        /*0150*/                   ISETP.GE.AND P0, PT, R0, R5, PT ;
        /*0160*/              @!P0 BRA `(.L_x_1) ;
        /*0170*/                   EXIT ;
"""
PLANT_PTX = """\
\t.file\t1 "/src/plant.py"
$L__BB0_1:
\t.loc\t1 29 12
\tld.global.b32 %r1, [%rd1];
\tex2.approx.f32 %r2, %r1;
\tst.global.b32 [%rd2], %r2;
\t.loc\t1 28 5
\t@%p1 bra \t$L__BB0_1;
$L__BB0_2:
\t.loc\t1 23 9
\tst.global.b32 [%rd3], %r0;
\t.loc\t1 22 5
\t@%p2 bra \t$L__BB0_2;
\tret;
"""


def _plant(kernel_block: int = 32) -> list:
    """(HotLoop, source loop) pairs of the planted kernel, as declared_loops gives them."""
    kernel_loop = sass.source_loops("k", PLANT_KERNEL, "/src/plant.py", 26)[0]
    zero_loop = sass.source_loops("zero", PLANT_ZERO, "/src/plant.py", 20)[0]
    return [
        (HotLoop("exp", 8, kernel_block), kernel_loop),
        (HotLoop("zero-fill", 4, 32, "zero"), zero_loop),
    ]


def _row(entries: list) -> dict:
    row = {"error": None, "spill_stores": 0, "spill_loads": 0, "local": 0, "stack": 0}
    row.update(kernel="k", variant="plant", arch=90, dtype="bf16", loops=entries)
    machines.evaluate([row], machines.GATE_MACHINES)
    return row


def test_planted_loops_are_paired_by_source_line_not_position():
    text = PLANT_ZERO_SASS + PLANT_KERNEL_SASS
    zero_sass, kernel_sass = sass.find_loops(text)
    kernel_ptx, zero_ptx = sass.find_ptx_loops(PLANT_PTX)
    # The trap positional pairing falls into: the old total of memory operations matches.
    assert sass.global_memory_ops(zero_sass) == sass.global_memory_ops(kernel_ptx) == 2
    assert sass.unroll_factor(zero_sass, [kernel_ptx]) is None  # loads 0 vs 1
    assert sass.unroll_factor(zero_sass, [zero_ptx]) == 2
    exp, zero = worker.measure_loops(_plant(), 32, text, PLANT_PTX)
    assert (exp["name"], exp["source"], exp["unroll"]) == ("exp", "k:28", 1)
    assert exp["histogram"]["MUFU"] == 1 and exp["histogram"]["LDG"] == 1
    assert exp["instructions"] == 7 and exp["memory_bytes"] == 8
    assert (zero["name"], zero["source"], zero["unroll"]) == ("zero-fill", "zero:22", 2)
    assert zero["instructions"] == 2.5 and "LDG" not in zero["histogram"]
    assert report.failures(_row([exp, zero]), 0.85) == []


def test_a_recorded_loop_missing_from_the_sass_fails_the_gate():
    # The zero-fill loop compiled out (or never reached): its record names a loop the
    # SASS does not have. Before, such an entry carried no ceiling and passed.
    exp, zero = worker.measure_loops(_plant(), 32, PLANT_KERNEL_SASS, PLANT_PTX)
    assert zero["sass_loops"] == 0 and "instructions" not in zero
    why = report.failures(_row([exp, zero]), 0.85)
    assert why == ["missing loop: 'zero-fill' (zero:22) is not in the SASS"]
    # Recorded as compiled out, the same SASS passes; a compiled-out record whose loop
    # is there fails.
    pairs = _plant()
    pairs[1] = (HotLoop("zero-fill", 4, 32, "zero", compiled=False), pairs[1][1])
    assert (
        report.failures(_row(worker.measure_loops(pairs, 32, PLANT_KERNEL_SASS, PLANT_PTX)), 0.85)
        == []
    )
    both = PLANT_ZERO_SASS + PLANT_KERNEL_SASS
    why = report.failures(_row(worker.measure_loops(pairs, 32, both, PLANT_PTX)), 0.85)
    assert len(why) == 1 and "recorded as compiled out" in why[0]


def test_a_record_with_the_wrong_block_fails_on_its_traffic():
    # Twice the elements per trip (a 2-warp block on a 1-warp launch): the record says
    # 8 B x 2 elements per thread, the SASS moves 4 B in and 4 B out per trip.
    exp, zero = worker.measure_loops(
        _plant(kernel_block=64), 32, PLANT_ZERO_SASS + PLANT_KERNEL_SASS, PLANT_PTX
    )
    assert exp["instructions_per_element"] == 3.5  # half the true 7: the wrong figure
    why = report.failures(_row([exp, zero]), 0.85)
    assert why == [
        "traffic: loop 'exp' (k:28) moves 8 B per thread per trip, its record 8 B x "
        "2 elements = 16 B"
    ]


def test_the_sm90_gate_uses_the_h100_model_and_can_use_the_h200():
    # 20 instructions per bf16 element: 132*1.98e9*128/20*2 = 3.345e12 B/s, 99.9% of the
    # H100's 3.35 TB/s but 69.7% of the H200's 4.8 TB/s.
    entry = {
        "name": "walk", "source": "k:28", "bytes_per_element": 2, "elements_per_thread": 8,
        "compiled": True, "sass_loops": 1, "histogram": {"IMAD": 160},
        "instructions_per_element": 20.0, "min_ceiling": None,
    }  # fmt: skip
    row = _row([entry])
    assert machines.GATE_MACHINES[90] is machines.H100
    assert entry["models"]["H100"]["ceiling"] == pytest.approx(0.999, abs=0.001)
    assert entry["models"]["H200"]["ceiling"] == pytest.approx(0.697, abs=0.001)
    assert report.failures(row, 0.85) == []
    machines.evaluate([row], {90: machines.H200})
    assert report.failures(row, 0.85) == [
        "ceiling: loop 'walk', 20.0 instr/elem, caps H200 at 70% of HBM (issue-bound) < 85%"
    ]
    # A loop's own gate of 0 (a peer's kernel, reported only) never fails.
    entry["min_ceiling"] = 0.0
    assert report.failures(row, 0.85) == []


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
    assert set(rows) == {
        "sum_exp/bf16/exps=1",
        "sum_exp/bf16/exps=6",
        "sum_exp/bf16/copy-compiled-out",
        "sum_exp/bf16/wrong-block",
        "wide/bf16/one-warp",
    }, proc.stdout + proc.stderr
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
        assert exp_sum["memory_bytes"] == 16 and copy["memory_bytes"] == 32
        assert copy["histogram"]["LDG"] == copy["histogram"]["STG"] == 1
        assert copy["source"].startswith("_copy_row:")
    # One exp per bf16 element is far from any limit; six saturate the MUFU unit at
    # 132*16*1.98e9/6*2 = 1.394e12 B/s: 41.6% of the H100's 3.35 TB/s, 29.0% of the
    # H200's 4.8 TB/s (the H100 is the gate's model).
    light = rows["sum_exp/bf16/exps=1"]["loops"][0]
    assert light["models"]["H100"]["ceiling"] == light["models"]["H200"]["ceiling"] == 1.0
    heavy = rows["sum_exp/bf16/exps=6"]["loops"][0]
    assert heavy["models"]["H100"]["bound"] == heavy["models"]["H200"]["bound"] == "mufu"
    assert heavy["models"]["H100"]["ceiling"] == pytest.approx(0.416, abs=0.002)
    assert heavy["models"]["H200"]["ceiling"] == pytest.approx(0.290, abs=0.002)
    assert heavy["gate_machine"] == "H100"
    assert heavy["bound"] == "mufu" and heavy["ceiling"] == pytest.approx(0.416, abs=0.002)
    # The planted records: a loop recorded as compiled that COPY=False removed, and a
    # block twice the one launched (its loops move half the bytes the record says).
    missing = rows["sum_exp/bf16/copy-compiled-out"]["loops"][1]
    assert missing["name"] == "copy" and missing["sass_loops"] == 0
    wrong = rows["sum_exp/bf16/wrong-block"]["loops"][0]
    assert wrong["elements_per_thread"] == 16 and wrong["memory_bytes"] == 16
    # 8192 fp32 accumulators on one warp (256 per thread) cannot fit in 255 registers.
    wide = rows["wide/bf16/one-warp"]
    assert wide["spill_stores"] > 0 and wide["stack"] > 0
    assert proc.returncode == 1
    assert "ceiling: loop 'exp-sum'" in proc.stdout and "spills:" in proc.stdout
    assert "missing loop: 'copy' (_copy_row:" in proc.stdout
    assert "traffic: loop 'exp-sum'" in proc.stdout
    assert "make aot: FAILED (4 of 5 compilations" in proc.stdout


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


def test_row_table_combines_the_fused_pass_walks():
    # A fused pass (statistics then gradient) and the standalone gradient kernel, each walk
    # at exactly 1x the H200's bandwidth over its loop alone: over a row of 50257 the
    # statistics pay 8 blocks of 8192 for 6.13 (76.7%), the gradient 14 of 4096 for 12.27
    # (87.6%), the two together (2 + 4 bytes per element) 76.7% x 2/6 + 87.6% x 4/6
    # averaged by time: 6 / (2/0.767 + 4/0.876) = 83.7%.
    h200 = machines.H200
    lanes = h200.sms * h200.clock_hz * 128

    def walk(name, bytes_per_element, block, threads):
        per_thread = block / threads
        per_trip = lanes * per_thread * bytes_per_element / h200.hbm_bytes_per_s
        return {
            "name": name, "source": f"f:{block}", "bytes_per_element": bytes_per_element,
            "elements_per_iteration": block, "elements_per_thread": per_thread,
            "threads": threads, "edge_blocks": 2, "compiled": True, "sass_loops": 1,
            "histogram": {"IMAD": per_trip}, "instructions_per_element": per_trip / per_thread,
        }  # fmt: skip

    fused = {"kernel": "token_pass", "variant": "bf16/T=1/stats/grad-in-pass", "arch": 90}
    fused.update(dtype="bf16", error=None)
    fused["loops"] = [walk("stats", 2, 8192, 512), walk("gradient", 4, 4096, 512)]
    text = report.row_table([fused], vocabs=(50257, 262144))
    lines = {
        line.split()[0] + " " + line.split()[3]: line.split() for line in text.splitlines()[4:]
    }
    assert lines["token_pass/stats H200"][4:8] == ["100%", "hbm", "77%", "issue"]
    assert lines["token_pass/gradient H200"][6:8] == ["88%", "issue"]
    assert lines["token_pass/stats+gradient H200"][4:7] == ["-", "84%", "issue"]
    # 262144 = 32 whole blocks: the head and the empty tail still cost 2 (94.1%).
    assert lines["token_pass/stats H200"][8:10] == ["94%", "issue"]
    assert lines["token_pass/stats H100"][6:8] == ["100%", "hbm"]


def test_a_function_inlined_twice_keeps_its_unroll_factor():
    # `zero` inlined at two call sites: two PTX loops (one store each) and two SASS loops
    # unrolled twice (two stores each). Each SASS copy compiles one PTX copy: against both
    # summed its factor would read 1 and double its counts per trip.
    second_copy = PLANT_ZERO_SASS.replace(".L_x_0", ".L_x_9").replace("/*00", "/*02")
    text = PLANT_ZERO_SASS + second_copy + PLANT_KERNEL_SASS
    ptx = PLANT_PTX.replace(
        "\tret;\n",
        "$L__BB0_3:\n\t.loc\t1 23 9\n\tst.global.b32 [%rd4], %r0;\n"
        "\t.loc\t1 22 5\n\t@%p3 bra \t$L__BB0_3;\n\tret;\n",
    )
    assert len(sass.find_loops(text)) == 3 and len(sass.find_ptx_loops(ptx)) == 3
    exp, zero = worker.measure_loops(_plant(), 32, text, ptx)
    assert zero["sass_loops"] == 2 and zero["unroll"] == 2
    assert zero["instructions"] == 2.5 and zero["memory_bytes"] == 4
    assert report.failures(_row([exp, zero]), 0.85) == []
