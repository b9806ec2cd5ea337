"""The blockwise head's two passes on tensors: row statistics of ``h W^T (+ b)`` and the
gradients ``dh``, ``dW``, ``db``, with no ``tokens x vocab`` buffer (kernels:
:mod:`~gft_kernels.backends.triton.head_stats`, :mod:`~gft_kernels.backends.triton.head_grad`).

The extra memory is O(N) vectors (the statistics of each vocabulary split) and the fp32
sums of the gradients; inputs are validated by the caller.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from gft_kernels.backends.base import PartialStats, RowParams
from gft_kernels.backends.token_terms import SEGMENTS, combine_partials
from gft_kernels.backends.triton.head_grad import head_grad_kernel
from gft_kernels.backends.triton.head_launch import (
    OWNER_ATOMIC,
    OWNER_COLUMNS,
    OWNER_ROWS,
    HeadOperands,
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
    """fp32 ``dh`` ``(N, H)``, ``dW`` ``(V, H)``, ``db`` ``(V,)`` (None where ``need`` says
    no) of ``sum_t c_t (log-softmax gradient of row t)``: ``coef`` is fp32 ``(N,)``
    (``w A dcr / T``, 0 for tokens without loss), ``row_max``/``sum_exp`` the row summary.

    ``deterministic``: sums in a fixed order (two launches, the logits recomputed in each)
    instead of fp32 atomics. ``filter_eps``: skip the gradient products of tiles whose
    softmax mass is below ``filter_eps`` per row over the whole vocabulary, which holds
    this block and ``vocab_elsewhere = (columns, blocks)`` on other ranks; None: exact.
    """
    ops = HeadOperands.of(hidden, weight, bias)
    tiles = head_tiles("grad", hidden.dtype, hidden.is_cuda)
    need_h, need_w, need_b = need
    need_b = need_b and bias is not None
    f32 = dict(dtype=torch.float32, device=hidden.device)
    grad_h = torch.zeros(ops.n_rows, ops.hidden_size, **f32) if need_h else None
    grad_w = torch.zeros(ops.n_cols, ops.hidden_size, **f32) if need_w else None
    grad_b = torch.zeros(ops.n_cols, **f32) if need_b else None
    if ops.n_rows == 0 or not (need_h or need_w or need_b):
        return grad_h, grad_w, grad_b
    filter_mass = None
    if filter_eps is not None:
        other_columns, other_blocks = vocab_elsewhere
        # Each other block may end in a partial tile: at most one tile more per block.
        vocab_tiles = triton.cdiv(ops.n_cols + other_columns, tiles.block_n) + other_blocks
        filter_mass = filter_eps / vocab_tiles
    row_max = row_max.to(torch.float32).contiguous()
    sum_exp = sum_exp.to(torch.float32).contiguous()
    coef = coef.to(torch.float32).contiguous()
    # coef stands in for a gradient a launch does not write (never read or written).
    grads = tuple(coef if g is None else g for g in (grad_h, grad_w, grad_b))
    if deterministic:
        launches = [(OWNER_ROWS, (need_h, False, False)), (OWNER_COLUMNS, (False, need_w, need_b))]
    else:
        launches = [(OWNER_ATOMIC, (need_h, need_w, need_b))]
    for owner, wanted in launches:
        if not any(wanted):
            continue
        grid, args, meta = head_grad_launch(
            ops,
            hidden.dtype,
            local_targets,
            row_max,
            sum_exp,
            coef,
            grads,
            wanted,
            owner,
            filter_mass,
            params,
            tiles,
        )
        head_grad_kernel[grid](*args, **meta)
    return grad_h, grad_w, grad_b
