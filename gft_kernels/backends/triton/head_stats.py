"""Blockwise head, forward: per-token row statistics of ``z' = transform(h W^T (+ b))``
without the logits ever reaching memory.

A program takes ``BLOCK_M`` tokens and one split of the vocabulary (a run of
``tiles_per_split`` tiles of ``BLOCK_N`` rows of ``W``); per tile it forms the logits with
``tl.dot`` (:func:`~gft_kernels.backends.triton.head_tile.logits_tile`) and folds them
into running statistics held in registers: ``m`` (the max), ``S = sum exp((z' - m) / T)``,
``S_1 = sum exp(z' - m)`` (T != 1 only), ``W = sum e x`` (entropy only) and the target's
``z'_y``. Each split writes its :class:`~gft_kernels.backends.base.PartialStats`; the
splits of a row are combined exactly on the device afterwards
(``token_terms.combine_partials``), so a vocabulary split across programs (to fill the
GPU when tokens are few) costs no host synchronisation.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gft_kernels.backends.triton.common import LOG2E
from gft_kernels.backends.triton.head_tile import finite_or_zero, logits_tile

# A token's target column that says its statistics are not needed (see head_stats_kernel).
NOT_NEEDED_VALUE = -2
NOT_NEEDED: tl.constexpr = tl.constexpr(NOT_NEEDED_VALUE)


@triton.jit
def _rescaled(total, factor):
    """``total * factor`` where ``total`` is nonzero (an empty sum stays 0 even when the
    factor overflows; a NaN sum stays NaN)."""
    return tl.where(total == 0.0, 0.0, total * factor)


@triton.jit
def head_stats_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    local_targets_ptr,
    stats_ptr,
    n_rows,
    n_cols,
    hidden_size,
    stride_hidden_row,
    stride_hidden_col,
    stride_weight_row,
    stride_weight_col,
    tiles_per_split,
    inv_temperature,
    logit_scale,
    cap,
    tanh_slope,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    TRANSFORM: tl.constexpr,
    UNIT_T: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """``stats_ptr``: fp32 ``(5, n_rows, splits)``, the split's ``row_max``, ``sum_exp``,
    ``sum_exp_1``, ``weighted`` (0 without entropy) and ``target_logit`` (0 where the
    target lies in another split). ``local_targets_ptr``: int64 ``(n_rows,)``, the target's
    column, -1 (in no column here) or :data:`NOT_NEEDED` (a token whose statistics nobody
    reads: it gets ``m = 0``, ``S = 1``, and a block of such tokens forms no tile)."""
    block = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n_rows
    target = tl.load(local_targets_ptr + rows, mask=row_ok, other=NOT_NEEDED)
    needed = target != NOT_NEEDED

    row_max = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    sum_t = tl.zeros((BLOCK_M,), tl.float32)
    sum_1 = tl.zeros((BLOCK_M,), tl.float32)
    weighted = tl.zeros((BLOCK_M,), tl.float32)
    target_logit = tl.zeros((BLOCK_M,), tl.float32)
    exp2_t = inv_temperature * LOG2E

    n_tiles = tl.cdiv(n_cols, BLOCK_N)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, n_tiles)
    if tl.max(needed.to(tl.int32), axis=0) == 0:
        last = first  # masked, ignored or zero-advantage tokens only (a sync-free call)
    for tile in range(first, last):
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        z = logits_tile(
            hidden_ptr,
            weight_ptr,
            bias_ptr,
            rows,
            cols,
            n_rows,
            n_cols,
            hidden_size,
            stride_hidden_row,
            stride_hidden_col,
            stride_weight_row,
            stride_weight_col,
            logit_scale,
            cap,
            tanh_slope,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            HAS_BIAS,
            TRANSFORM,
            DOT_PRECISION,
            UPCAST_DOT,
        )
        target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        new_max = tl.maximum(row_max, tl.max(z, axis=1))
        shift = finite_or_zero(new_max)
        # How far the reference moved, in units of the exponent (<= 0 unless the old
        # reference was the 0 of a row without a finite max).
        moved = finite_or_zero(row_max) - shift
        x = (z - shift[:, None]) * inv_temperature
        e = tl.math.exp2(x * LOG2E)
        if WITH_ENTROPY:
            # W = sum e x relative to the new reference: each old term gains x's shift.
            moved_t = moved * inv_temperature
            old = _rescaled(weighted + moved_t * sum_t, tl.math.exp2(moved * exp2_t))
            weighted = old + tl.sum(tl.where(e > 0.0, e * x, 0.0), axis=1)
        sum_t = _rescaled(sum_t, tl.math.exp2(moved * exp2_t)) + tl.sum(e, axis=1)
        if not UNIT_T:
            e_1 = tl.math.exp2((z - shift[:, None]) * LOG2E)
            sum_1 = _rescaled(sum_1, tl.math.exp2(moved * LOG2E)) + tl.sum(e_1, axis=1)
        row_max = new_max
    if UNIT_T:
        sum_1 = sum_t
    row_max = tl.where(needed, row_max, 0.0)
    sum_t = tl.where(needed, sum_t, 1.0)
    sum_1 = tl.where(needed, sum_1, 1.0)

    plane = n_rows * splits
    out = stats_ptr + rows * splits + split
    tl.store(out, row_max, mask=row_ok)
    tl.store(out + plane, sum_t, mask=row_ok)
    tl.store(out + 2 * plane, sum_1, mask=row_ok)
    tl.store(out + 3 * plane, weighted, mask=row_ok)
    tl.store(out + 4 * plane, target_logit, mask=row_ok)
