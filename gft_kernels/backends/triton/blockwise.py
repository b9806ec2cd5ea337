"""The blockwise head's two passes on tensors: row statistics of ``h W^T (+ b)`` and the
gradients ``dh``, ``dW``, ``db``, with no ``tokens x vocab`` buffer (kernels:
:mod:`~gft_kernels.backends.triton.head_stats`, :mod:`~gft_kernels.backends.triton.head_grad`).

The extra memory is O(N) vectors (the statistics of each vocabulary split), the fp32 sums
of ``dW`` and ``db``, and for 16-bit heads a bounded fp32 scratch for ``dh``
(:data:`DH_SCRATCH_BYTES`); inputs are validated by the caller.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton

from gft_kernels.backends.base import PartialStats, RowParams
from gft_kernels.backends.token_terms import SEGMENTS, combine_partials
from gft_kernels.backends.triton.head_grad import head_grad_kernel
from gft_kernels.backends.triton.head_launch import (
    GRAD_KERNELS,
    OWNER_ATOMIC,
    OWNER_COLUMNS,
    OWNER_ROWS,
    HeadOperands,
    HeadTiles,
    head_grad_launch,
    head_stats_launch,
    head_tiles,
    vocab_splits,
)
from gft_kernels.backends.triton.head_stats import head_stats_kernel


def blockwise_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    local_targets: torch.Tensor,
    params: RowParams,
    with_entropy: bool,
    splits: Optional[int] = None,
) -> PartialStats:
    """Statistics ``(N,)`` of the rows of ``h W^T (+ b)`` (``hidden`` ``(N, H)``,
    ``weight`` ``(V, H)``, any strides), as one block of columns; ``local_targets`` int64
    ``(N,)`` holds each target's row of ``weight`` or -1. ``splits``: vocabulary splits per
    token block (default: enough programs to fill the GPU)."""
    ops = HeadOperands.of(hidden, weight, bias)
    tiles = head_tiles("stats", hidden.dtype, hidden.is_cuda)
    n_tiles = triton.cdiv(ops.n_cols, tiles.block_n)
    if splits is None:
        n_blocks = triton.cdiv(ops.n_rows, tiles.block_m)
        splits = vocab_splits(n_blocks, n_tiles, hidden.device)
    splits = min(max(1, splits), n_tiles)
    splits = triton.cdiv(n_tiles, triton.cdiv(n_tiles, splits))  # no empty split
    stats = torch.empty(5, ops.n_rows, splits, dtype=torch.float32, device=hidden.device)
    if ops.n_rows:
        grid, args, meta = head_stats_launch(
            ops, hidden.dtype, local_targets, stats, splits, params, with_entropy, tiles
        )
        head_stats_kernel[grid](*args, **meta)
    if splits == 1:
        weighted = stats[3, :, 0] if with_entropy else None
        return PartialStats(
            stats[0, :, 0], stats[1, :, 0], stats[2, :, 0], weighted, stats[4, :, 0]
        )
    part = PartialStats(stats[0], stats[1], stats[2], stats[3] if with_entropy else None, stats[4])
    row_max, sum_exp, sum_exp_1, weighted, target_logit = combine_partials(
        part, params, reduce_max=SEGMENTS.max, reduce_sum=SEGMENTS.sum
    )
    return PartialStats(row_max.squeeze(1), sum_exp, sum_exp_1, weighted, target_logit)


# fp32 scratch for the sums of dh of 16-bit heads: tokens are taken in ranges whose fp32
# dh fits this budget (the weight is re-read per range, a few MB against a GEMM's work),
# so the head's extra memory stays O(N) + this, whatever N x H.
DH_SCRATCH_BYTES = 32 << 20


def token_ranges(n_rows: int, hidden_size: int, block_m: int, fp32_hidden: bool) -> List[slice]:
    """Token ranges of the gradient launches: all tokens when ``dh`` is summed in place (fp32
    hidden), else ranges of whole token blocks within :data:`DH_SCRATCH_BYTES`."""
    if fp32_hidden or n_rows == 0:
        return [slice(0, n_rows)]
    step = max(block_m, DH_SCRATCH_BYTES // (4 * hidden_size) // block_m * block_m)
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def blockwise_gradients(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    local_targets: torch.Tensor,
    row_max: torch.Tensor,
    sum_exp: torch.Tensor,
    coef: torch.Tensor,
    params: RowParams,
    need: Tuple[bool, bool, bool],
    *,
    deterministic: bool,
    filter_eps: Optional[float],
    vocab_elsewhere: Tuple[int, int] = (0, 0),
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``dh`` ``(N, H)`` in ``hidden``'s dtype, fp32 ``dW`` ``(V, H)`` and ``db`` ``(V,)``
    (None where ``need`` says no) of ``sum_t c_t (log-softmax gradient of row t)``: ``coef``
    is fp32 ``(N,)`` (``w A dcr / T``, 0 for tokens without loss), ``row_max``/``sum_exp``
    the row summary. Every sum runs in fp32.

    ``deterministic``: sums in a fixed order (two launches, the logits recomputed in each)
    instead of fp32 atomics. ``filter_eps``: skip the gradient products of tiles whose
    softmax mass is below ``filter_eps`` per row over the whole vocabulary, which holds
    this block and ``vocab_elsewhere = (columns, blocks)`` on other ranks; None: exact.
    """
    on_gpu = hidden.is_cuda
    n_rows, hidden_size = hidden.shape
    n_cols = weight.shape[0]
    need_h, need_w, need_b = need
    need_b = need_b and bias is not None
    f32 = dict(dtype=torch.float32, device=hidden.device)
    fp32_hidden = hidden.dtype == torch.float32
    grad_h = hidden.new_empty(n_rows, hidden_size) if need_h else None
    grad_w = torch.zeros(n_cols, hidden_size, **f32) if need_w else None
    grad_b = torch.zeros(n_cols, **f32) if need_b else None
    if deterministic:
        launches = [(OWNER_ROWS, (need_h, False, False)), (OWNER_COLUMNS, (False, need_w, need_b))]
    else:
        launches = [(OWNER_ATOMIC, (need_h, need_w, need_b))]
    launches = [
        (owner, wanted, head_tiles(GRAD_KERNELS[owner], hidden.dtype, on_gpu))
        for owner, wanted in launches
        if any(wanted)
    ]
    block_m = max((tiles.block_m for *_, tiles in launches), default=1)
    ranges = token_ranges(n_rows, hidden_size, block_m, fp32_hidden)
    scratch = None
    if need_h and not fp32_hidden:
        scratch = torch.empty(max(r.stop - r.start for r in ranges), hidden_size, **f32)
    if n_rows == 0 or not (need_h or need_w or need_b):
        return grad_h, grad_w, grad_b

    def filter_mass(tiles: HeadTiles) -> Optional[float]:
        if filter_eps is None:
            return None
        other_columns, other_blocks = vocab_elsewhere
        # Each other block may end in a partial tile: at most one tile more per block.
        vocab_tiles = triton.cdiv(n_cols + other_columns, tiles.block_n) + other_blocks
        return filter_eps / vocab_tiles

    row_max = row_max.to(torch.float32).contiguous()
    sum_exp = sum_exp.to(torch.float32).contiguous()
    coef = coef.to(torch.float32).contiguous()
    for rows in ranges:
        grad_h_rows = None
        if need_h:
            if scratch is None:
                grad_h_rows = grad_h[rows].zero_()
            else:
                grad_h_rows = scratch[: rows.stop - rows.start].zero_()
        # coef stands in for a gradient a launch does not write (never read or written).
        grads = tuple(coef if g is None else g for g in (grad_h_rows, grad_w, grad_b))
        ops = HeadOperands.of(hidden[rows], weight, bias)
        for owner, wanted, tiles in launches:
            grid, args, meta = head_grad_launch(
                ops,
                hidden.dtype,
                local_targets[rows],
                row_max[rows],
                sum_exp[rows],
                coef[rows],
                grads,
                wanted,
                owner,
                filter_mass(tiles),
                params,
                tiles,
            )
            head_grad_kernel[grid](*args, **meta)
        if scratch is not None:
            grad_h[rows] = grad_h_rows
    return grad_h, grad_w, grad_b
