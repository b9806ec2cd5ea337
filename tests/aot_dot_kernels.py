"""A small Triton kernel with a ``tl.dot`` loop and a plain loop, for tests/test_aot_tensor.py.

Compiled by ``python -m benchmarks.static.aot --modules tests.aot_dot_kernels`` in a
subprocess (never under the interpreter). A program forms one ``64 x 64`` tile of
``A @ B`` over ``K = 256`` in steps of 32 (8 trips, 4 warps), then copies a row of
``n`` bf16 values in blocks of 1024 (no dot).

Per trip of the K loop the tile takes ``64 * 64 * 32 = 131072`` multiply-adds: on sm_80
``HMMA.16816`` (2048 per warp instruction) 16 per warp, as bf16 and, from fp32 operands
with ``input_precision="tf32"``, ``HMMA.1688`` (1024) 32 per warp. One record is planted
wrong: ``dot/bf16/wrong-macs`` claims twice the multiply-adds its loop runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from benchmarks.static.records import AotTensor, HotLoop, launch_variant

BM = BN = 64
BK = 32
K = 256
WARPS = 4
COPY_BLOCK = 1024


@triton.jit
def _dot_then_copy(
    a_ptr,
    b_ptr,
    c_ptr,
    src_ptr,
    dst_ptr,
    n,
    K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    COPY_BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.arange(0, BM)
    cols = tl.arange(0, BN)
    ks = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + rows[:, None] * K + (k0 + ks)[None, :])
        b = tl.load(b_ptr + (k0 + ks)[:, None] * BN + cols[None, :])
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(c_ptr + rows[:, None] * BN + cols[None, :], acc)
    offs = tl.arange(0, COPY_BLOCK)
    for start in range(0, n, COPY_BLOCK):
        tl.store(dst_ptr + start + offs, tl.load(src_ptr + start + offs))


def _record(label: str, dtype: torch.dtype, macs: int, archs=None, copy: int = COPY_BLOCK):
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    x = AotTensor(torch.bfloat16)
    return launch_variant(
        "dot",
        f"{name}/{label}",
        name,
        _dot_then_copy,
        (AotTensor(dtype), AotTensor(dtype), AotTensor(torch.float32), x, x, copy * 37),
        dict(
            K=K,
            BM=BM,
            BN=BN,
            BK=BK,
            COPY_BLOCK=copy,
            PRECISION="tf32",
            num_warps=WARPS,
            num_stages=2,
        ),
        [
            HotLoop("k-dot", None, BM * BN, macs_per_trip=macs, per_tile=K // BK),
            HotLoop("copy", 4, copy, ordinal=1, per_tile=1),
        ],
        archs=archs,
        tiles_per_program=1,
    )


def aot_variants() -> list:
    macs = BM * BN * BK
    return [
        _record("tile", torch.bfloat16, macs),
        # Another copy block: not the binary of "tile" (a worker compiles each once).
        _record("wrong-macs", torch.bfloat16, 2 * macs, archs=(80,), copy=2048),
        _record("tf32", torch.float32, macs, archs=(80,)),
    ]
