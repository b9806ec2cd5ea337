"""Small Triton kernels whose compiled loops are known by construction, for tests/test_aot.py.

Compiled by ``python -m benchmarks.static.aot --modules tests.aot_sample_kernels`` in a subprocess
(never under the interpreter). Each loop handles 4096 bf16 elements per trip over 16 warps,
so 8 per thread: one 16-byte load per trip.

Two records are planted wrong and must fail the check: ``sum_exp/bf16/copy-compiled-out``
records the helper's copy loop as compiled while ``COPY=False`` removes it (a loop that
goes missing), and ``sum_exp/bf16/wrong-block`` records twice the elements per trip its
loops handle (as a record with another launch's warp count would).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from benchmarks.static.records import AotTensor, HotLoop, launch_variant

BLOCK = 4096
WARPS = 16


@triton.jit
def _copy_row(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    """A loop in a called jit function: read and write every element."""
    cols = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        tl.store(dst_ptr + start + cols, tl.load(src_ptr + start + cols))


@triton.jit
def _sum_exp_then_copy(
    x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr, EXPS: tl.constexpr, COPY: tl.constexpr
):
    """Loop 0: ``EXPS`` exponentials per element (one MUFU each); then, with ``COPY``, the
    helper's loop."""
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        z = tl.load(x_ptr + start + cols).to(tl.float32)
        for k in tl.static_range(EXPS):
            acc += tl.math.exp2(z * (k + 1.0))
    tl.store(out_ptr + cols, acc)
    if COPY:
        _copy_row(x_ptr, y_ptr, n, BLOCK)


@triton.jit
def _wide_accumulator(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """BLOCK fp32 accumulators on one warp: far more than 255 registers per thread."""
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        acc = acc * 0.5 + tl.load(x_ptr + start + cols).to(tl.float32)
    tl.store(out_ptr + cols, acc)


def aot_variants() -> list:
    x = AotTensor(torch.bfloat16)
    out = AotTensor(torch.float32)
    records = []
    for label, exps, copy, block in [
        ("exps=1", 1, True, BLOCK),
        ("exps=6", 6, True, BLOCK),
        ("copy-compiled-out", 1, False, BLOCK),
        ("wrong-block", 2, True, 2 * BLOCK),  # EXPS=2: not the binary of exps=1
    ]:
        records.append(
            launch_variant(
                "sum_exp",
                f"bf16/{label}",
                "bf16",
                _sum_exp_then_copy,
                (x, x, out, 4096 * 37),
                dict(BLOCK=BLOCK, EXPS=exps, COPY=copy, num_warps=WARPS),
                [
                    HotLoop("exp-sum", 2, block),
                    HotLoop("copy", 4, block, function="_copy_row"),
                ],
            )
        )
    records.append(
        launch_variant(
            "wide",
            "bf16/one-warp",
            "bf16",
            _wide_accumulator,
            (x, out, 8192 * 37),
            dict(BLOCK=8192, num_warps=1),
            [HotLoop("accumulate", 2, 8192)],
        )
    )
    return records
