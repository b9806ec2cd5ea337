"""Tensor-core loops in the ahead-of-time check (``make aot``): MMA opcodes and their
multiply-adds, the GEMM model's arithmetic, loops that are no loops (a barrier's retry laid
out after the exit), and one real compilation of a ``tl.dot`` kernel for sm_80 and sm_90
(tests/aot_dot_kernels.py) with no GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.static import machines, report, sass

ROOT = Path(__file__).resolve().parent.parent


def _ins(opcode: str) -> sass.Instruction:
    return sass.Instruction(0, opcode, opcode, None, None)


def test_mma_opcodes_give_multiply_adds_per_warp_and_rate():
    assert sass.mma_shape(_ins("HMMA.16816.F32.BF16")) == (16 * 8 * 16, "16bit")
    assert sass.mma_shape(_ins("HMMA.16816.F32")) == (2048, "16bit")  # fp16 names no type
    assert sass.mma_shape(_ins("HMMA.1688.F32.TF32")) == (16 * 8 * 8, "tf32")
    # A warpgroup instruction, issued by each of its four warps: a quarter each.
    assert sass.mma_shape(_ins("HGMMA.64x256x16.F32.BF16")) == (64 * 256 * 16 // 4, "16bit")
    assert sass.mma_shape(_ins("HGMMA.64x64x8.F32.TF32")) == (64 * 64 * 8 // 4, "tf32")
    ptx = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
    assert sass.mma_shape(_ins(ptx)) == (2048, "16bit")
    wgmma = "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16"
    assert sass.mma_shape(_ins(wgmma)) == (64 * 128 * 16 // 4, "16bit")
    for other in ("FFMA", "IMAD.WIDE", "HADD2.F32", "LDSM.16.M88.4"):
        assert sass.mma_shape(_ins(other)) is None


def test_tensor_rates_derive_from_the_data_sheets():
    # 312 TFLOPS / (2 x 108 SMs x 1.41 GHz) = 1024.4 multiply-adds per SM per clock;
    # 989 / (2 x 132 x 1.98) = 1892.1 on Hopper (the clock the rest of the model uses).
    assert machines.A100.mma_per_clock("16bit") == pytest.approx(1024.4, abs=0.1)
    assert machines.A100.mma_per_clock("tf32") == pytest.approx(512.2, abs=0.1)
    for hopper in (machines.H100, machines.H200):
        assert hopper.mma_per_clock("16bit") == pytest.approx(1892.1, abs=0.1)
        assert hopper.mma_per_clock("tf32") == pytest.approx(946.0, abs=0.1)


def test_gemm_ceiling_against_hand_numbers():
    # One trip on 8 warps: 2 HGMMA.64x256x16 (1048576 multiply-adds) and 64 others.
    # Tensor pipe: 1048576 / 1892.1 = 554.2 clocks; issue: 66 x 8 / 4 = 132 clocks.
    hopper = {"HGMMA": 2, "IMAD": 60, "FFMA": 4}
    mma = {"HGMMA.64x256x16.F32.BF16": 2}
    trip = machines.mma_ceiling(hopper, mma, 8, machines.H100)
    assert (trip.ceiling, trip.bound) == (1.0, "tensor")
    assert trip.pipes["issue"] == pytest.approx(554.2 / 132, rel=1e-3)
    # 1000 other instructions: issue needs 1002 x 8 / 4 = 2004 clocks, 27.7% of peak.
    busy = machines.mma_ceiling({"HGMMA": 2, "IMAD": 1000}, mma, 8, machines.H100)
    assert busy.bound == "issue" and busy.ceiling == pytest.approx(554.2 / 2004, rel=1e-3)
    # sm_80: 64 HMMA.16816 (131072 x 8 warps... per warp 2048 each) and 512 MUFU per
    # thread: tensor 64 x 2048 x 8 / 1024.4 = 1023.6 clocks, MUFU 512 x 256 / 16 = 8192.
    ampere = machines.mma_ceiling(
        {"HMMA": 64, "MUFU": 512}, {"HMMA.16816.F32.BF16": 64}, 8, machines.A100
    )
    assert ampere.bound == "mufu"
    assert ampere.ceiling == pytest.approx(1023.6 / 8192, rel=1e-3)
    # No tensor-core opcode: an fp32 dot on the FMA pipe, held to the FP32 lanes. 64 FFMA
    # per thread on 256 threads are 16384 multiply-adds: 256 clocks on the A100's 64 lanes;
    # 64 more instructions make issue 128 x 256 / 128 = 256 clocks too.
    fma = machines.mma_ceiling({"FFMA": 64, "IMAD": 64}, {}, 8, machines.A100, 16384)
    assert fma.ceiling == pytest.approx(1.0) and fma.bound == "fp32-dot"
    fma = machines.mma_ceiling({"FFMA": 64, "IMAD": 192}, {}, 8, machines.A100, 16384)
    assert fma.bound == "issue" and fma.ceiling == pytest.approx(0.5)


# A Hopper K loop whose barrier wait retries out of line, after the EXIT, and jumps back
# into the loop: the jump back is a backward branch but no loop (its target does not
# dominate it); the retry itself is a loop of two instructions.
SASS_OUT_OF_LINE = """\
        /*0000*/                   MOV R1, RZ ;
.L_x_1:
\t//## File "/src/k.py", line 12
        /*0010*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P3, [UR4], R3 ;
        /*0020*/              @!P3 BRA `(.L_x_9) ;
.L_x_2:
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR20], R24 ;
        /*0040*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0050*/                   ISETP.GE.AND P0, PT, R0, R5, PT ;
        /*0060*/              @!P0 BRA `(.L_x_1) ;
        /*0070*/                   EXIT ;
.L_x_9:
        /*0080*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P3, [UR4], R3 ;
        /*0090*/              @!P3 BRA `(.L_x_9) ;
        /*00a0*/                   BRA `(.L_x_2) ;
.L_x_3:
        /*00b0*/                   BRA `(.L_x_3);
        /*00c0*/                   NOP;
"""


def test_a_jump_back_from_out_of_line_code_is_no_loop():
    loops = sass.find_loops(SASS_OUT_OF_LINE)
    assert [(lp.start, lp.end) for lp in loops] == [(0x10, 0x60), (0x80, 0x90)]
    k_loop = loops[0]
    assert not k_loop.nested and sass.mma_ops(k_loop.body) == {"HGMMA.64x64x16.F32.BF16": 1}
    # Outside the loops: the first MOV, the EXIT and the jump back (not the trap, the NOP).
    rest = sass.straight_line(SASS_OUT_OF_LINE)
    assert [i.addr for i in rest] == [0x0, 0x70, 0xA0]


def test_unroll_factor_counts_multiply_adds():
    # A SASS loop with two HMMA.16816 per trip compiles a PTX loop with one mma.
    text = """\
.L_x_1:
\t//## File "/src/k.py", line 13
        /*0100*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0110*/                   HMMA.16816.F32.BF16 R4, R16, R20, R4 ;
\t//## File "/src/k.py", line 12
        /*0120*/              @!P0 BRA `(.L_x_1) ;
"""
    ptx = """\
\t.file\t1 "/src/k.py"
$L__BB0_1:
\t.loc\t1 13 12
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%r1}, {%r2}, {%r3}, {%r1};
\t.loc\t1 12 5
\t@%p1 bra \t$L__BB0_1;
"""
    (loop,) = sass.find_loops(text)
    (ptx_loop,) = sass.find_ptx_loops(ptx)
    assert sass.unroll_factor(loop, [ptx_loop]) == 2


def _cuda_compile_unavailable() -> str:
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as err:  # the wheel has no CUDA backend (e.g. a CPU-only build)
        return f"triton cannot compile for CUDA here: {err}"
    return ""


@pytest.mark.slow
@pytest.mark.skipif(bool(_cuda_compile_unavailable()), reason=_cuda_compile_unavailable())
def test_dot_kernel_compiles_to_tensor_core_loops(tmp_path):
    """tests/aot_dot_kernels.py on sm_80 and sm_90: the K loop on the tensor cores, the
    copy loop without them, the multiply-adds checked against the record."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    args = [sys.executable, "-m", "benchmarks.static.aot", "--arch", "80,90", "--jobs", "1"]
    args += ["--modules", "tests.aot_dot_kernels", "--no-rows", "--json", str(out)]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    rows = {(r["variant"], r["arch"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {
        ("bf16/tile", 80),
        ("bf16/tile", 90),
        ("bf16/wrong-macs", 80),
        ("fp32/tf32", 80),
    }, proc.stdout + proc.stderr
    macs = 64 * 64 * 32
    for (variant, arch), row in rows.items():
        assert row["error"] is None and row["spill_stores"] == 0
        k_dot, copy = row["loops"]
        # The plain loop has no tensor-core instruction, and is held to HBM bandwidth.
        assert copy["mma_ops"] == {} and "HMMA" not in copy["histogram"]
        assert copy["models"] and "mma_models" not in copy
        assert k_dot["macs_sass"] == macs  # 4 warps x the per-warp multiply-adds
        ops = k_dot["mma_ops"]
        if arch == 80:
            kind = "HMMA.1688.F32.TF32" if variant == "fp32/tf32" else "HMMA.16816.F32.BF16"
            assert ops == {kind: macs / 4 / sass.mma_shape(_ins(kind))[0]}  # 32 or 16
        else:
            # Hopper: warpgroup MMAs (wgmma), one 64 x 64 x 16 per 16 of K.
            assert set(ops) == {"HGMMA.64x64x16.F32.BF16"} and ops[next(iter(ops))] == 2
        assert k_dot["mma_per_trip"] == sum(ops.values())
        assert k_dot["other_per_trip"] == k_dot["instructions"] - sum(ops.values())
        assert set(k_dot["mma_models"]) == {m.name for m in machines.MACHINES[arch]}
        # Per tile: 8 trips of the K loop, the code outside the loops once.
        assert row["tile"]["mma"] == 8 * sum(ops.values())
        assert row["tile"]["macs"] == 8 * macs
        why = report.failures(row, report.MIN_CEILING)
        if variant == "bf16/wrong-macs":
            assert why == [
                "mma: loop 'k-dot' (_dot_then_copy:48) runs 131072 multiply-adds per trip, "
                "its record 262144"
            ]
        else:
            assert why == []
    assert proc.returncode == 1 and "make aot: FAILED (1 of 4 compilations" in proc.stdout
    assert "Tensor-core loops" in proc.stdout and "HGMMA.64x64x16" in proc.stdout
