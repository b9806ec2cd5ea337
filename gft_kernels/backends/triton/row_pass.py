"""Triton token pass: every per-token quantity of the GFT loss in one launch.

Per row (one program), one streaming pass over the vocabulary keeps the online max ``m``
of the transformed logits and rescales three accumulators when it grows: the exp-sum at
temperature T, the exp-sum at temperature 1 (the DCR probability is read from the raw
logits) and, for stats, the entropy numerator ``sum e * x``. The row's end computes
``log p``, ``q``, the DCR coefficient ``c``, the loss ``-A c log p`` and the data checks;
with ``WRITE_GRAD`` a second walk over the (cache-warm) row writes the gradient
``w A c / T * (softmax - onehot) * dz'/dz`` in the same launch (the fused linear head).

All exponentials are ``exp2`` with ``log2(e) / T`` folded into one multiplier, and the
row is summarised by ``(m, S)``, never by a rounded ``lse``: see ``base.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gft_kernels.backends.triton.row_grad import (
    LOG2E,
    aligned_head,
    transform_logits,
    write_grad_row,
    zero_row,
)

LN2 = 0.6931471805599453
BAD_TARGET: tl.constexpr = tl.constexpr(1)
BAD_MASK: tl.constexpr = tl.constexpr(2)
BAD_ADVANTAGE: tl.constexpr = tl.constexpr(4)


@triton.jit
def _fold_block(
    z, m, sum_t, sum_1, acc_w, scaled_inv_t, UNIT_T: tl.constexpr, WITH_ENTROPY: tl.constexpr
):
    """Fold one block of transformed logits (``-inf`` padding) into the row state."""
    new_m = tl.maximum(m, tl.max(z, axis=0))
    # Shift by 0 while everything seen is -inf (exp2 then gives 0, not NaN).
    shift = tl.where(new_m == -float("inf"), 0.0, new_m)
    # log2-scaled offset of the old max: d2 = (old - new) log2(e) / T <= 0; -inf while
    # nothing finite was seen (then the sums are 0 and the factor exp2(-inf) = 0).
    d2_t = (m - shift) * scaled_inv_t
    x2 = (z - shift) * scaled_inv_t
    e_t = tl.exp2(x2)
    r_t = tl.exp2(d2_t)
    if WITH_ENTROPY:
        # W' = r (W + d S) re-centres sum e * x on the new max; x in natural units.
        carried = tl.where(sum_t > 0.0, acc_w + d2_t * LN2 * sum_t, 0.0)  # no -inf * 0
        acc_w = r_t * carried + tl.sum(tl.where(e_t > 0.0, e_t * (x2 * LN2), 0.0), axis=0)
    sum_t = sum_t * r_t + tl.sum(e_t, axis=0)
    if UNIT_T:
        sum_1 = sum_t
    else:
        sum_1 = sum_1 * tl.exp2((m - shift) * LOG2E) + tl.sum(tl.exp2((z - shift) * LOG2E), axis=0)
    return new_m, sum_t, sum_1, acc_w


@triton.jit
def summarize_row(
    logits_ptr,
    row_offset,
    n_cols,
    scaled_inv_t,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    UNIT_T: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    TRANSFORM: tl.constexpr,
    logit_scale,
    cap,
    slope,
):
    """``(m, S_t, S_1, W)`` of one row: max of ``z'``, ``sum exp((z' - m) / T)``,
    ``sum exp(z' - m)`` and ``sum e x`` with ``x = (z' - m) / T``."""
    cols = tl.arange(0, BLOCK_V)
    m = -float("inf")
    sum_t = 0.0
    sum_1 = 0.0
    acc_w = 0.0
    head = tl.minimum(aligned_head(row_offset, VEC), n_cols)
    z = tl.load(logits_ptr + row_offset + cols, mask=cols < head, other=-float("inf"))
    z = transform_logits(z.to(tl.float32), TRANSFORM, logit_scale, cap, slope)
    z = tl.where(cols < head, z, -float("inf"))
    m, sum_t, sum_1, acc_w = _fold_block(
        z, m, sum_t, sum_1, acc_w, scaled_inv_t, UNIT_T, WITH_ENTROPY
    )
    n_full = (n_cols - head) // BLOCK_V
    for k in range(0, n_full):
        offset = tl.multiple_of(row_offset + head + k * BLOCK_V, VEC)
        z = tl.load(logits_ptr + offset + cols).to(tl.float32)
        z = transform_logits(z, TRANSFORM, logit_scale, cap, slope)
        m, sum_t, sum_1, acc_w = _fold_block(
            z, m, sum_t, sum_1, acc_w, scaled_inv_t, UNIT_T, WITH_ENTROPY
        )
    offs = head + n_full * BLOCK_V + cols
    in_tail = offs < n_cols
    z = tl.load(logits_ptr + row_offset + offs, mask=in_tail, other=-float("inf"))
    z = transform_logits(z.to(tl.float32), TRANSFORM, logit_scale, cap, slope)
    z = tl.where(in_tail, z, -float("inf"))  # tanh(-inf) is -cap: pad after the transform
    m, sum_t, sum_1, acc_w = _fold_block(
        z, m, sum_t, sum_1, acc_w, scaled_inv_t, UNIT_T, WITH_ENTROPY
    )
    return m, sum_t, sum_1, acc_w


@triton.jit
def token_pass_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    advantages_ptr,
    tokens_per_advantage,
    mask_ptr,
    grad_weights_ptr,
    grad_ptr,
    stride_grad,
    loss_ptr,
    logprobs_ptr,
    probs_ptr,
    entropy_ptr,
    row_max_ptr,
    sum_exp_ptr,
    scale_ptr,
    flags_ptr,
    n_cols,
    ignore_index,
    tau,
    inv_t,
    scaled_inv_t,
    logit_scale,
    cap,
    slope,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    UNIT_T: tl.constexpr,
    WITH_STATS: tl.constexpr,
    TRANSFORM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SAME_SKEW: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row).to(tl.int64)
    adv = tl.load(advantages_ptr + row // tokens_per_advantage).to(tl.float32)
    valid = target != ignore_index
    flags = tl.where(valid & ((target < 0) | (target >= n_cols)), BAD_TARGET, 0)
    if HAS_MASK:
        mask_value = tl.load(mask_ptr + row).to(tl.float32)
        flags |= tl.where((mask_value != 0.0) & (mask_value != 1.0), BAD_MASK, 0)
        valid = valid & (mask_value != 0.0)
    flags |= tl.where(tl.abs(adv) < float("inf"), 0, BAD_ADVANTAGE)  # NaN fails as well
    tl.store(flags_ptr + row, flags)
    valid = valid & (flags == 0)  # a bad row is reported; never index with its target
    row_offset = row * stride_row
    grad_offset = row * stride_grad
    if WITH_STATS:
        active = flags == 0  # stats read every well-formed row, masked ones too
    else:
        active = valid & (adv != 0.0)
    if active:
        m, sum_t, sum_1, acc_w = summarize_row(
            logits_ptr,
            row_offset,
            n_cols,
            scaled_inv_t,
            BLOCK_V,
            VEC,
            UNIT_T,
            WITH_STATS,
            TRANSFORM,
            logit_scale,
            cap,
            slope,
        )
        safe_target = tl.where(valid, target, 0)
        z_y = tl.load(logits_ptr + row_offset + safe_target).to(tl.float32)
        z_y = transform_logits(z_y, TRANSFORM, logit_scale, cap, slope)
        finite = tl.abs(m) < float("inf")
        shift = tl.where(finite, m, 0.0)
        log_sum = tl.log(sum_t)
        logp = (z_y - shift) * inv_t - log_sum
        q = tl.exp2((z_y - shift) * LOG2E) / sum_1
        dcr = tl.where(q <= tau, q, 1.0)
        live = valid & finite
        scale = tl.where(live, adv * dcr, 0.0)
        tl.store(scale_ptr + row, scale)
        tl.store(loss_ptr + row, tl.where(scale != 0.0, -scale * logp, 0.0))
        tl.store(logprobs_ptr + row, tl.where(live, logp, tl.where(valid, -float("inf"), 0.0)))
        tl.store(probs_ptr + row, tl.where(live, q, 0.0))
        tl.store(row_max_ptr + row, m)
        tl.store(sum_exp_ptr + row, sum_t)
        if WITH_STATS:
            tl.store(entropy_ptr + row, tl.where(finite, log_sum - acc_w / sum_t, 0.0))
        if WRITE_GRAD:
            coef = tl.load(grad_weights_ptr + row).to(tl.float32) * scale * inv_t
            if coef == 0.0:
                zero_row(grad_ptr + grad_offset, n_cols, BLOCK_V)
            else:
                write_grad_row(
                    logits_ptr,
                    row_offset,
                    grad_ptr,
                    grad_offset,
                    n_cols,
                    safe_target,
                    m,
                    sum_t,
                    coef,
                    scaled_inv_t,
                    BLOCK_V,
                    VEC,
                    SAME_SKEW,
                    TRANSFORM,
                    logit_scale,
                    cap,
                    slope,
                )
    else:
        # Carries no loss: never read. Outputs as the other backends give them.
        tl.store(loss_ptr + row, 0.0)
        tl.store(logprobs_ptr + row, 0.0)
        tl.store(probs_ptr + row, 0.0)
        tl.store(row_max_ptr + row, 0.0)
        tl.store(sum_exp_ptr + row, 1.0)
        tl.store(scale_ptr + row, 0.0)
        if WITH_STATS:
            tl.store(entropy_ptr + row, 0.0)
        if WRITE_GRAD:
            zero_row(grad_ptr + grad_offset, n_cols, BLOCK_V)


@triton.jit
def partial_stats_kernel(
    logits_ptr,
    stride_row,
    local_targets_ptr,
    row_max_ptr,
    sum_exp_ptr,
    sum_exp_1_ptr,
    weighted_ptr,
    target_logit_ptr,
    n_cols,
    seg_len,
    scaled_inv_t,
    logit_scale,
    cap,
    slope,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    UNIT_T: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    TRANSFORM: tl.constexpr,
):
    """Statistics of segment ``program_id(1)`` (``seg_len`` columns, a multiple of
    ``BLOCK_V``) of each row; outputs are ``(N, segments)``, row-major."""
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    n_segs = tl.num_programs(1)
    seg_start = seg * seg_len
    seg_cols = tl.minimum(seg_len, n_cols - seg_start)
    row_offset = row * stride_row + seg_start
    m, sum_t, sum_1, acc_w = summarize_row(
        logits_ptr,
        row_offset,
        seg_cols,
        scaled_inv_t,
        BLOCK_V,
        VEC,
        UNIT_T,
        WITH_ENTROPY,
        TRANSFORM,
        logit_scale,
        cap,
        slope,
    )
    target = tl.load(local_targets_ptr + row) - seg_start
    here = (target >= 0) & (target < seg_cols)
    z_y = tl.load(logits_ptr + row_offset + tl.where(here, target, 0)).to(tl.float32)
    z_y = transform_logits(z_y, TRANSFORM, logit_scale, cap, slope)
    out = row * n_segs + seg
    tl.store(row_max_ptr + out, m)
    tl.store(sum_exp_ptr + out, sum_t)
    tl.store(sum_exp_1_ptr + out, sum_1)
    if WITH_ENTROPY:
        tl.store(weighted_ptr + out, acc_w)
    tl.store(target_logit_ptr + out, tl.where(here, z_y, 0.0))
