"""The blockwise head's Triton kernels (tensor-core loops) as records for ``make aot``.

Every record is built by the library's own launch builders
(:mod:`gft_kernels.backends.triton.head_launch`: ``head_stats_launch``,
``head_grad_launch`` with the GPU tiles of ``head_tiles``), so the check compiles what
the blockwise head launches on a GPU: inputs fp32 / bf16 / fp16, no transform or a
soft-cap; the statistics at T = 1 and T != 1, with and without entropy; the gradient in
each owner mode as ``blockwise_gradients`` launches them (``OWNER_ATOMIC`` with dh and dW,
the deterministic pair ``OWNER_ROWS`` with dh and ``OWNER_COLUMNS`` with dW), with and
without gradient filtering for 16-bit inputs (fp32 never filters). No bias (a language
model's head has none). The temperature is a runtime argument of the gradient kernel:
its T = 1 and T != 1 launches are one binary.

The loops are tensor-core records (``macs_per_trip``): each K loop must run the
multiply-adds of its ``tl.dot`` products (on the tensor cores for 16-bit inputs; fp32
multiplies in full precision, ``input_precision="ieee"``, on the FMA pipe), and its
instructions per trip and per output tile are reported against the GEMM's peak
(:func:`benchmarks.static.machines.mma_ceiling`, the tensor-core table of ``make aot``),
not gated. Gated like every other record: compile failures, spills, local memory and a
loop missing from the SASS. Shape: the Qwen2.5-1.5B head (H = 1536, V = 151936), 4096
tokens.
"""

from __future__ import annotations

from typing import Any, List

import torch
import triton

from benchmarks.static.records import AotTensor, HotLoop, dedupe, launch_variant
from gft_kernels.backends.base import RowParams
from gft_kernels.backends.triton import launch
from gft_kernels.backends.triton.head_grad import head_grad_kernel
from gft_kernels.backends.triton.head_launch import (
    GRAD_KERNELS,
    OWNER_ATOMIC,
    OWNER_COLUMNS,
    OWNER_ROWS,
    HeadOperands,
    head_grad_launch,
    head_stats_launch,
    head_tiles,
)
from gft_kernels.backends.triton.head_stats import head_stats_kernel

HIDDEN = 1536
VOCAB = 151936
TOKENS = 4096
# Programs that fill an H100 / H200 (two per SM), as head_launch.vocab_splits asks a GPU.
_PROGRAMS = 2 * 132

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_PARAMS = {
    "T=1": RowParams(tau=0.1, temperature=1.0),
    "T!=1": RowParams(tau=0.1, temperature=0.7),
    "T=1/softcap": RowParams(tau=0.1, temperature=1.0, logit_softcap=30.0),
    "T!=1/softcap": RowParams(tau=0.1, temperature=0.7, logit_softcap=30.0),
}
# (label, owner, (dh, dW, db) wanted): blockwise_gradients' launches.
_OWNERS = (
    ("atomic", OWNER_ATOMIC, (True, True, False)),
    ("rows-dh", OWNER_ROWS, (True, False, False)),
    ("columns-dW", OWNER_COLUMNS, (False, True, False)),
)


def _operands(dtype: torch.dtype) -> HeadOperands:
    return HeadOperands(
        AotTensor(dtype), (HIDDEN, 1), AotTensor(dtype), (HIDDEN, 1), None, TOKENS, VOCAB, HIDDEN
    )


def _stats_records() -> List[Any]:
    records = []
    for dtype, name in _DTYPES.items():
        tiles = head_tiles("stats", dtype)
        n_tiles = triton.cdiv(VOCAB, tiles.block_n)
        n_blocks = triton.cdiv(TOKENS, tiles.block_m)
        splits = max(1, min(triton.cdiv(_PROGRAMS, n_blocks), n_tiles // launch.MIN_SEGMENT_BLOCKS))
        tile_macs = tiles.block_m * tiles.block_n * tiles.block_k
        loops = [
            HotLoop("tiles", None, tiles.block_m * tiles.block_n, per_tile=1),
            HotLoop(
                "k-dot",
                None,
                tiles.block_m * tiles.block_n,
                "logits_tile",
                macs_per_trip=tile_macs,
                per_tile=HIDDEN / tiles.block_k,
            ),
        ]
        for label, params in _PARAMS.items():
            for entropy in (False, True):
                grid, args, meta = head_stats_launch(
                    _operands(dtype),
                    dtype,
                    AotTensor(torch.int64),
                    AotTensor(torch.float32),
                    splits,
                    params,
                    entropy,
                    tiles,
                )
                variant = (
                    f"{name}/{label}/{'entropy' if entropy else 'loss'}/"
                    f"{tiles.block_m}x{tiles.block_n}x{tiles.block_k}"
                )
                records.append(
                    launch_variant(
                        "head_stats",
                        variant,
                        name,
                        head_stats_kernel,
                        args,
                        meta,
                        loops,
                        tiles_per_program=triton.cdiv(n_tiles, splits),
                    )
                )
    return records


def _grad_records() -> List[Any]:
    records = []
    f32 = AotTensor(torch.float32)
    for dtype, name in _DTYPES.items():
        for label, params in _PARAMS.items():
            if not params.unit_temperature:
                continue  # the temperature is a runtime float: the same binary
            for owner_name, owner, need in _OWNERS:
                tiles = head_tiles(GRAD_KERNELS[owner], dtype)
                n_tiles = triton.cdiv(VOCAB, tiles.block_n)
                n_blocks = triton.cdiv(TOKENS, tiles.block_m)
                tile_macs = tiles.block_m * tiles.block_n * tiles.block_k
                k_trips = HIDDEN / tiles.block_k
                filters = (None,)
                if dtype != torch.float32:
                    filters = (None, torch.finfo(dtype).eps / 2 / n_tiles)
                # The atomic owner forms its one tile pair without a loop; the rows owner
                # walks the tiles of its block, the columns owner the blocks of its tile.
                per_program = {OWNER_ATOMIC: 1, OWNER_ROWS: n_tiles, OWNER_COLUMNS: n_blocks}
                loops = [
                    HotLoop(
                        "tiles",
                        None,
                        tiles.block_m * tiles.block_n,
                        per_tile=1,
                        compiled=owner == OWNER_ROWS,
                    ),
                    HotLoop(
                        "blocks",
                        None,
                        tiles.block_m * tiles.block_n,
                        ordinal=1,
                        per_tile=1,
                        compiled=owner == OWNER_COLUMNS,
                    ),
                    HotLoop(
                        "k-dot",
                        None,
                        tiles.block_m * tiles.block_n,
                        "logits_tile",
                        macs_per_trip=tile_macs,
                        per_tile=k_trips,
                    ),
                    HotLoop(
                        "grad-dot",
                        None,
                        tiles.block_m * tiles.block_n,
                        "_grad_tile",
                        macs_per_trip=tile_macs * (need[0] + need[1]),
                        per_tile=k_trips,
                    ),
                ]
                for filter_mass in filters:
                    grid, args, meta = head_grad_launch(
                        _operands(dtype),
                        dtype,
                        AotTensor(torch.int64),
                        f32,
                        f32,
                        f32,
                        (f32, f32, f32),
                        need,
                        owner,
                        filter_mass,
                        params,
                        tiles,
                    )
                    variant = (
                        f"{name}/{label.replace('T=1', 'any-T')}/{owner_name}/"
                        f"{'filter' if filter_mass is not None else 'exact'}/"
                        f"{tiles.block_m}x{tiles.block_n}x{tiles.block_k}"
                    )
                    records.append(
                        launch_variant(
                            "head_grad",
                            variant,
                            name,
                            head_grad_kernel,
                            args,
                            meta,
                            loops,
                            tiles_per_program=per_program[owner],
                        )
                    )
    return records


def aot_variants() -> List[Any]:
    return dedupe(_stats_records() + _grad_records())
