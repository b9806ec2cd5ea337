"""Triton gradient rows: ``coef * (exp((z' - m) / T) / S - onehot(y)) * dz'/dz``.

One read and one write per element. :func:`write_grad_row` is shared with the fused
token pass (which writes the gradient in the same launch); :func:`row_grad_kernel` is the
backward of the logits-level loss, with the coefficient ``g_t * A_t c_t / T`` formed
in-kernel from the upstream gradient, so the backward is a single launch with no host
synchronisation. Rows whose coefficient is 0 only write zeros and never read the logits.

Loads: the row is walked from its first 16-byte-aligned element in whole blocks without a
mask (vector loads for any vocabulary size and row stride); the few elements before that
point and the tail after the last whole block go through one masked block each.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gft_kernels.backends.triton.common import aligned_head, transform_logits, transform_slope


@triton.jit
def _grad_block(
    z_raw,
    offs,
    target,
    row_max,
    scaled_inv_t,
    coef_over_sum,
    coef,
    TRANSFORM: tl.constexpr,
    logit_scale,
    cap,
    tanh_slope,
):
    zt = transform_logits(z_raw, TRANSFORM, logit_scale, cap, tanh_slope)
    g = tl.math.exp2((zt - row_max) * scaled_inv_t) * coef_over_sum
    g = tl.where(offs == target, g - coef, g)
    if TRANSFORM != 0:
        g = g * transform_slope(zt, TRANSFORM, logit_scale, cap)
    return g


@triton.jit
def write_grad_row(
    logits_ptr,
    row_offset,
    grad_ptr,
    grad_offset,
    n_cols,
    target,
    row_max,
    sum_exp,
    coef,
    scaled_inv_t,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    SAME_SKEW: tl.constexpr,
    TRANSFORM: tl.constexpr,
    logit_scale,
    cap,
    tanh_slope,
):
    """Write one gradient row, reading ``logits_ptr[row_offset:]`` and writing
    ``grad_ptr[grad_offset:]``. Whole blocks start at the row's first element whose offset
    is a multiple of ``VEC`` (16 bytes), so their loads are unmasked vector loads; stores
    are too when ``SAME_SKEW`` (both offsets agree modulo ``VEC``)."""
    cols = tl.arange(0, BLOCK_V)
    coef_over_sum = coef / sum_exp
    out_ty = grad_ptr.dtype.element_ty
    head = tl.minimum(aligned_head(logits_ptr + row_offset, VEC), n_cols)
    # The (< VEC) elements before the first aligned one.
    in_head = cols < head
    z = tl.load(logits_ptr + row_offset + cols, mask=in_head, other=0.0).to(tl.float32)
    g = _grad_block(
        z,
        cols,
        target,
        row_max,
        scaled_inv_t,
        coef_over_sum,
        coef,
        TRANSFORM,
        logit_scale,
        cap,
        tanh_slope,
    )
    tl.store(grad_ptr + grad_offset + cols, g.to(out_ty), mask=in_head)
    n_full = (n_cols - head) // BLOCK_V
    # The block pointers are carried through the loop and reused by the tail: recomputing
    # the tail's addresses from the row's base kept a 64-bit address live across the loop,
    # which ptxas spilled in the 16-warp fused pass.
    start = head
    z_block = logits_ptr + row_offset + head
    g_block = grad_ptr + grad_offset + head
    for _ in range(0, n_full):
        z = tl.load(tl.multiple_of(z_block, 16) + cols).to(tl.float32)
        g = _grad_block(
            z,
            start + cols,
            target,
            row_max,
            scaled_inv_t,
            coef_over_sum,
            coef,
            TRANSFORM,
            logit_scale,
            cap,
            tanh_slope,
        )
        if SAME_SKEW:
            tl.store(tl.multiple_of(g_block, 16) + cols, g.to(out_ty))
        else:
            tl.store(g_block + cols, g.to(out_ty))
        start += BLOCK_V
        z_block += BLOCK_V
        g_block += BLOCK_V
    offs = start + cols
    in_tail = offs < n_cols
    z = tl.load(z_block + cols, mask=in_tail, other=0.0).to(tl.float32)
    g = _grad_block(
        z,
        offs,
        target,
        row_max,
        scaled_inv_t,
        coef_over_sum,
        coef,
        TRANSFORM,
        logit_scale,
        cap,
        tanh_slope,
    )
    tl.store(g_block + cols, g.to(out_ty), mask=in_tail)


@triton.jit
def zero_row(grad_row_ptr, n_cols, BLOCK_V: tl.constexpr):
    zeros = tl.zeros([BLOCK_V], dtype=grad_row_ptr.dtype.element_ty)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        tl.store(grad_row_ptr + offs, zeros, mask=offs < n_cols)


@triton.jit
def row_grad_kernel(
    logits_ptr,
    stride_row,
    grad_ptr,
    stride_grad,
    targets_ptr,
    row_max_ptr,
    sum_exp_ptr,
    grad_rows_ptr,
    scale_ptr,
    n_cols,
    seg_len,
    inv_t,
    scaled_inv_t,
    logit_scale,
    cap,
    tanh_slope,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    SAME_SKEW: tl.constexpr,
    TRANSFORM: tl.constexpr,
):
    """Gradient of segment ``program_id(1)`` (``seg_len`` columns) of each row: few rows
    still fill the GPU when their columns are split across programs."""
    row = tl.program_id(0).to(tl.int64)
    seg_start = tl.program_id(1) * seg_len
    seg_cols = tl.minimum(seg_len, n_cols - seg_start)
    grad_offset = row * stride_grad + seg_start
    coef = tl.load(grad_rows_ptr + row).to(tl.float32) * tl.load(scale_ptr + row) * inv_t
    if coef == 0.0:
        zero_row(grad_ptr + grad_offset, seg_cols, BLOCK_V)
    else:
        target = tl.load(targets_ptr + row) - seg_start
        target = tl.where((target >= 0) & (target < seg_cols), target, -1)
        write_grad_row(
            logits_ptr,
            row * stride_row + seg_start,
            grad_ptr,
            grad_offset,
            seg_cols,
            target,
            tl.load(row_max_ptr + row),
            tl.load(sum_exp_ptr + row),
            coef,
            scaled_inv_t,
            BLOCK_V,
            VEC,
            SAME_SKEW,
            TRANSFORM,
            logit_scale,
            cap,
            tanh_slope,
        )
