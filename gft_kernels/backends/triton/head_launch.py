"""Launches of the blockwise head's kernels: tiles, grids, arguments.

One source for the wrappers (:mod:`gft_kernels.backends.triton.blockwise`) and for the
ahead-of-time check (``make aot``), as :mod:`~gft_kernels.backends.triton.launch` is for
the row kernels. Tensors may be AOT stand-ins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import triton

from gft_kernels.backends.base import RowParams
from gft_kernels.backends.triton import launch
from gft_kernels.backends.triton.launch import Launch, compile_options, transform_args

# Owners of the backward's sums (head_grad.OWNER).
OWNER_ATOMIC = 0
OWNER_ROWS = 1
OWNER_COLUMNS = 2


@dataclass(frozen=True)
class HeadTiles:
    block_m: int  # tokens per tile
    block_n: int  # vocabulary rows per tile
    block_k: int  # hidden features per tl.dot step
    num_warps: int
    num_stages: int
    upcast_dot: bool = False  # tl.dot on 16-bit operands converted to fp32 first


# GPU tiles, per kernel (the gradient kernel per owner of its sums) and operand size,
# each the largest that compiles without spills for sm_80 and sm_90 (``make aot``).
# 16-bit operands take K steps of 64 or 32 (the statistics kernel holds one fp32 logits
# tile and the running statistics; the gradient kernel also G and a product per K step).
# The atomic gradient takes 128 tokens: at 64 on 8 warps, sm_80's mma layout computed the
# dh product twice. fp32 operands (FFMA, no tensor cores) take small tiles; the dW owner's
# 64 x 64 needs K steps of 16 to fit Triton 3.6's registers on sm_90.
_GPU_TILES = {
    ("stats", 2): HeadTiles(128, 64, 64, 8, 3),
    ("stats", 4): HeadTiles(64, 128, 32, 8, 3),
    ("grad-atomic", 2): HeadTiles(128, 128, 32, 8, 2),
    ("grad-rows", 2): HeadTiles(64, 128, 32, 8, 2),
    ("grad-columns", 2): HeadTiles(64, 128, 32, 8, 2),
    ("grad-atomic", 4): HeadTiles(32, 32, 32, 4, 2),
    ("grad-rows", 4): HeadTiles(32, 64, 32, 4, 2),
    ("grad-columns", 4): HeadTiles(64, 64, 16, 8, 2),
}
INTERPRETER_TILES = HeadTiles(16, 32, 16, 1, 1, upcast_dot=True)


GRAD_KERNELS = {OWNER_ATOMIC: "grad-atomic", OWNER_ROWS: "grad-rows", OWNER_COLUMNS: "grad-columns"}


def head_tiles(kernel: str, dtype: torch.dtype, on_gpu: bool = True) -> HeadTiles:
    """Tiles of ``kernel`` (``"stats"``, or a value of :data:`GRAD_KERNELS`) for inputs of
    ``dtype``."""
    if not on_gpu:
        return INTERPRETER_TILES
    return _GPU_TILES[(kernel, torch.finfo(dtype).bits // 8)]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands multiply in full fp32 (``ieee``), as the chunked head's GEMM does by
    default (no TF32); 16-bit operands ignore the switch."""
    return "ieee"


@dataclass(frozen=True)
class HeadOperands:
    """The head's matrices: ``hidden`` ``(n_rows, H)``, ``weight`` ``(n_cols, H)``, any
    strides (``(row, col)`` pairs), ``bias`` ``(n_cols,)`` or None."""

    hidden: Any
    hidden_stride: Tuple[int, int]
    weight: Any
    weight_stride: Tuple[int, int]
    bias: Any
    n_rows: int
    n_cols: int
    hidden_size: int

    @classmethod
    def of(cls, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        return cls(
            hidden,
            tuple(hidden.stride()),
            weight,
            tuple(weight.stride()),
            bias,
            hidden.shape[0],
            weight.shape[0],
            hidden.shape[1],
        )


def vocab_splits(n_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Vocabulary splits of the statistics launch: 1, or more when the token blocks alone
    cannot fill the GPU (as :func:`launch.row_segments` splits rows). A tile is a GEMM
    tile over all of ``H``, work enough for a program: a split may hold a single tile."""
    wanted = launch.MIN_PROGRAMS
    if wanted is None:
        if device.type != "cuda":
            return 1
        wanted = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    if n_blocks == 0 or n_blocks >= wanted:
        return 1
    return max(1, min(triton.cdiv(wanted, n_blocks), n_tiles))


def _common(ops: HeadOperands, params: RowParams, tiles: HeadTiles, dtype: torch.dtype):
    kind, logit_scale, cap, tanh_slope = transform_args(params)
    meta = dict(
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        HAS_BIAS=ops.bias is not None,
        TRANSFORM=kind,
        DOT_PRECISION=dot_precision(dtype),
        UPCAST_DOT=tiles.upcast_dot,
    )
    return (logit_scale, cap, tanh_slope), meta


def head_stats_launch(
    ops: HeadOperands,
    dtype: torch.dtype,
    local_targets: Any,
    stats: Any,
    splits: int,
    params: RowParams,
    with_entropy: bool,
    tiles: HeadTiles,
) -> Launch:
    """One ``head_stats_kernel`` launch; ``stats`` is fp32 ``(5, n_rows, splits)`` (see the
    kernel), ``local_targets`` int64 ``(n_rows,)``."""
    transform, meta = _common(ops, params, tiles, dtype)
    n_tiles = triton.cdiv(ops.n_cols, tiles.block_n)
    tiles_per_split = triton.cdiv(n_tiles, splits)
    args = (
        ops.hidden,
        ops.weight,
        ops.bias if ops.bias is not None else ops.weight,
        local_targets,
        stats,
        ops.n_rows,
        ops.n_cols,
        ops.hidden_size,
        *ops.hidden_stride,
        *ops.weight_stride,
        tiles_per_split,
        params.inv_temperature,
        *transform,
    )
    meta.update(UNIT_T=params.unit_temperature, WITH_ENTROPY=with_entropy)
    meta.update(compile_options(tiles.num_warps, num_stages=tiles.num_stages))
    return (triton.cdiv(ops.n_rows, tiles.block_m), splits), args, meta


def head_grad_launch(
    ops: HeadOperands,
    dtype: torch.dtype,
    local_targets: Any,
    row_max: Any,
    sum_exp: Any,
    coef: Any,
    grads: Tuple[Any, Any, Any],
    need: Tuple[bool, bool, bool],
    owner: int,
    filter_mass: Optional[float],
    params: RowParams,
    tiles: HeadTiles,
) -> Launch:
    """One ``head_grad_kernel`` launch adding into ``grads = (dh, dW, db)`` (fp32,
    contiguous, zero-filled; an unneeded one may be any fp32 tensor) the gradients
    ``need`` names; ``owner`` picks the grid (see the kernel); ``filter_mass`` None turns
    gradient filtering off."""
    transform, meta = _common(ops, params, tiles, dtype)
    grad_hidden, grad_weight, grad_bias = grads
    args = (
        ops.hidden,
        ops.weight,
        ops.bias if ops.bias is not None else ops.weight,
        local_targets,
        row_max,
        sum_exp,
        coef,
        grad_hidden,
        grad_weight,
        grad_bias,
        ops.n_rows,
        ops.n_cols,
        ops.hidden_size,
        *ops.hidden_stride,
        *ops.weight_stride,
        params.inv_temperature,
        *transform,
        filter_mass if filter_mass is not None else 0.0,
    )
    need_h, need_w, need_b = need
    meta.update(
        OWNER=owner,
        NEED_DH=need_h,
        NEED_DW=need_w,
        NEED_DB=need_b and ops.bias is not None,
        FILTER=filter_mass is not None,
    )
    meta.update(compile_options(tiles.num_warps, num_stages=tiles.num_stages))
    blocks = triton.cdiv(ops.n_rows, tiles.block_m)
    n_tiles = triton.cdiv(ops.n_cols, tiles.block_n)
    grid = {OWNER_ATOMIC: (blocks, n_tiles), OWNER_ROWS: (blocks,), OWNER_COLUMNS: (n_tiles,)}
    return grid[owner], args, meta
