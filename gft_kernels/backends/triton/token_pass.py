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

``FIXED_REF`` (16-bit soft-capped logits at T != 1): the statistics come from
``fixed_reference.summarize_fixed`` instead, which sums against a fixed reference (no running
max) for the special-function unit's sake.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gft_kernels.backends.triton.common import LN2, LOG2E, aligned_head, transform_logits
from gft_kernels.backends.triton.fixed_reference import summarize_fixed
from gft_kernels.backends.triton.row_grad import write_grad_row, zero_row

BAD_TARGET: tl.constexpr = tl.constexpr(1)
BAD_MASK: tl.constexpr = tl.constexpr(2)
BAD_ADVANTAGE: tl.constexpr = tl.constexpr(4)


@triton.jit
def _fold_slots(
    z, m, sum_t, sum_1, acc_w, scaled_inv_t, UNIT_T: tl.constexpr, WITH_ENTROPY: tl.constexpr
):
    """Fold a ``[SLOTS, VEC]`` block of transformed logits (``-inf`` padding) into the
    per-slot running state (each ``[SLOTS]``).

    Each slot is one 16-byte vector position held by one thread, with its own running max:
    the per-trip reductions run over ``VEC`` elements inside a thread, never across threads
    (the slots are combined once per row, in :func:`summarize_row`). Exponentials are
    ``exp2`` of ``(z' - m) * log2(e) / T``: the difference first, so no product is fused
    with a rounded offset.
    """
    new_m = tl.maximum(m, tl.max(z, axis=1))
    # Shift by 0 while a slot's max is not finite: after only -inf, exp2 gives 0 (not NaN)
    # and the old max's factor exp2(-inf) = 0 clears the (zero) sums; after a +inf, the
    # sums become +inf, not inf - inf = NaN, so that NaN in S means a NaN logit and
    # nothing else (the row's end tells the two apart by it). |m| is an operand modifier
    # of the compare: no instruction is added to the loop.
    shift = tl.where(tl.abs(new_m) == float("inf"), 0.0, new_m)
    delta = m - shift
    x = z - shift[:, None]
    x2_t = x * scaled_inv_t
    e_t = tl.math.exp2(x2_t)
    r_t = tl.math.exp2(delta * scaled_inv_t)
    if WITH_ENTROPY:
        # W' = r (W + d S) re-centres sum e * x2 on the new max (log2 units); the clamp
        # keeps e * x2 at 0, not 0 * -inf, for -inf logits.
        carried = tl.where(sum_t > 0.0, acc_w + delta * scaled_inv_t * sum_t, 0.0)
        acc_w = r_t * carried + tl.sum(e_t * tl.maximum(x2_t, -1.0e30), axis=1)
    sum_t = sum_t * r_t + tl.sum(e_t, axis=1)
    if UNIT_T:
        sum_1 = sum_t
    else:
        r_1 = tl.math.exp2(delta * LOG2E)
        sum_1 = sum_1 * r_1 + tl.sum(tl.math.exp2(x * LOG2E), axis=1)
    return new_m, sum_t, sum_1, acc_w


@triton.jit
def _load_slots(
    logits_ptr,
    offset,
    slots,
    mask,
    TRANSFORM: tl.constexpr,
    logit_scale,
    cap,
    tanh_slope,
    rcp_on_mufu,
    MASKED: tl.constexpr,
):
    if MASKED:
        z = tl.load(logits_ptr + offset + slots, mask=mask, other=0.0).to(tl.float32)
        z = transform_logits(z, TRANSFORM, logit_scale, cap, tanh_slope, rcp_on_mufu)
        return tl.where(mask, z, -float("inf"))  # padding after the transform (tanh(-inf))
    else:
        z = tl.load(logits_ptr + offset + slots).to(tl.float32)
        return transform_logits(z, TRANSFORM, logit_scale, cap, tanh_slope, rcp_on_mufu)


@triton.jit
def _summarize_running_max(
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
    tanh_slope,
):
    """:func:`summarize_row` with one running max per slot."""
    SLOTS: tl.constexpr = BLOCK_V // VEC
    slots = tl.arange(0, SLOTS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    m = tl.full([SLOTS], -float("inf"), tl.float32)
    sum_t = tl.zeros([SLOTS], tl.float32)
    sum_1 = tl.zeros([SLOTS], tl.float32)
    acc_w = tl.zeros([SLOTS], tl.float32)
    # Where a wide soft-cap's reciprocal is computed (common.wide_softcap): MUFU's
    # rcp costs one MUFU result and saves six issue slots (the FMA-pipe reciprocal and
    # its clamp). At T = 1 (2.1 MUFU results per element) three columns in four take
    # it, which leaves MUFU at 87% of HBM speed and issue at or above it (16-bit,
    # sm_90); at T != 1 (3.25) one in eight. Each register's column is known at compile
    # time: each element is computed one way only.
    column = tl.arange(0, VEC)[None, :]
    if UNIT_T:
        rcp_on_mufu = column % 4 != 0
    else:
        rcp_on_mufu = column % 8 == 0
    head = tl.minimum(aligned_head(logits_ptr + row_offset, VEC), n_cols)
    z = _load_slots(
        logits_ptr,
        row_offset,
        slots,
        slots < head,
        TRANSFORM,
        logit_scale,
        cap,
        tanh_slope,
        rcp_on_mufu,
        True,
    )
    m, sum_t, sum_1, acc_w = _fold_slots(
        z, m, sum_t, sum_1, acc_w, scaled_inv_t, UNIT_T, WITH_ENTROPY
    )
    n_full = (n_cols - head) // BLOCK_V
    for k in range(0, n_full):
        block_ptr = tl.multiple_of(logits_ptr + row_offset + head + k * BLOCK_V, 16)
        z = _load_slots(
            block_ptr, 0, slots, None, TRANSFORM, logit_scale, cap, tanh_slope, rcp_on_mufu, False
        )
        m, sum_t, sum_1, acc_w = _fold_slots(
            z, m, sum_t, sum_1, acc_w, scaled_inv_t, UNIT_T, WITH_ENTROPY
        )
    start = head + n_full * BLOCK_V
    z = _load_slots(
        logits_ptr,
        row_offset + start,
        slots,
        start + slots < n_cols,
        TRANSFORM,
        logit_scale,
        cap,
        tanh_slope,
        rcp_on_mufu,
        True,
    )
    m, sum_t, sum_1, acc_w = _fold_slots(
        z, m, sum_t, sum_1, acc_w, scaled_inv_t, UNIT_T, WITH_ENTROPY
    )
    # Combine the slots once per row (the same algebra as blocks on different ranks).
    row_max = tl.max(m, axis=0)
    shift = tl.where(tl.abs(row_max) == float("inf"), 0.0, row_max)  # as in _fold_slots
    delta = m - shift
    f_t = tl.math.exp2(delta * scaled_inv_t)
    total_t = tl.sum(sum_t * f_t, axis=0)
    if UNIT_T:
        total_1 = total_t
    else:
        total_1 = tl.sum(sum_1 * tl.math.exp2(delta * LOG2E), axis=0)
    weighted = 0.0
    if WITH_ENTROPY:
        slot_w = tl.where(sum_t > 0.0, f_t * (acc_w + delta * scaled_inv_t * sum_t), 0.0)
        weighted = tl.sum(slot_w, axis=0) * LN2
    return row_max, total_t, total_1, weighted


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
    FIXED_REF: tl.constexpr,
    logit_scale,
    cap,
    tanh_slope,
):
    """``(m, S_t, S_1, W)`` of one row: a reference ``m`` (the max of ``z'``, or with
    ``FIXED_REF`` a point within ``T log 2`` below ``T`` times the tempered logsumexp),
    ``sum exp((z' - m) / T)``, ``sum exp(z' - m)`` and ``sum e x`` with
    ``x = (z' - m) / T`` (natural units).

    The row is walked from its first 16-byte-aligned element in whole unmasked blocks
    (vector loads whatever the vocabulary size or row stride), with one masked block for
    the elements before that point and one for the tail.
    """
    if FIXED_REF:
        # fixed_reference forms its exponents from the fast tanh's reciprocal, which cancels
        # near 0 for a wide cap: launch.fixed_reference never pairs the two.
        tl.static_assert(TRANSFORM == 2, "fixed references need the fast soft-cap")
        row_max, total_t, total_1, weighted, lost = summarize_fixed(
            logits_ptr,
            row_offset,
            n_cols,
            scaled_inv_t,
            BLOCK_V,
            VEC,
            WITH_ENTROPY,
            cap,
            tanh_slope,
        )
        if lost:  # rare: see fixed_reference
            row_max, total_t, total_1, weighted = _summarize_running_max(
                logits_ptr,
                row_offset,
                n_cols,
                scaled_inv_t,
                BLOCK_V,
                VEC,
                UNIT_T,
                WITH_ENTROPY,
                TRANSFORM,
                logit_scale,
                cap,
                tanh_slope,
            )
    else:
        row_max, total_t, total_1, weighted = _summarize_running_max(
            logits_ptr,
            row_offset,
            n_cols,
            scaled_inv_t,
            BLOCK_V,
            VEC,
            UNIT_T,
            WITH_ENTROPY,
            TRANSFORM,
            logit_scale,
            cap,
            tanh_slope,
        )
    return row_max, total_t, total_1, weighted


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
    tanh_slope,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    UNIT_T: tl.constexpr,
    WITH_STATS: tl.constexpr,
    TRANSFORM: tl.constexpr,
    FIXED_REF: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SAME_SKEW: tl.constexpr,
    GRAD_BLOCK: tl.constexpr,
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
    # One row pointer serves every read of the row, and the gradient row's offset is
    # computed where it is written: each value kept live across the statistics loop costs
    # registers in the gradient phase.
    logits_row = logits_ptr + row * stride_row
    if WITH_STATS:
        active = flags == 0  # stats read every well-formed row, masked ones too
    else:
        active = valid & (adv != 0.0)
    if active:
        m, sum_t, sum_1, acc_w = summarize_row(
            logits_row,
            0,
            n_cols,
            scaled_inv_t,
            BLOCK_V,
            VEC,
            UNIT_T,
            WITH_STATS,
            TRANSFORM,
            FIXED_REF,
            logit_scale,
            cap,
            tanh_slope,
        )
        safe_target = tl.where(valid, target, 0)
        z_y = tl.load(logits_row + safe_target).to(tl.float32)
        z_y = transform_logits(z_y, TRANSFORM, logit_scale, cap, tanh_slope)
        finite = tl.abs(m) < float("inf")
        # A NaN logit makes S NaN (the max may skip it): the row stays live and a token
        # that carries loss gets a NaN loss and gradient (token_terms states the rule).
        live_row = finite | (sum_t != sum_t)
        shift = tl.where(finite, m, 0.0)
        log_sum = tl.log(sum_t)
        logp = (z_y - shift) * inv_t - log_sum
        q = tl.math.exp2((z_y - shift) * LOG2E) / sum_1
        # tau arrives as an fp32 argument: q is compared with tau rounded to fp32, as the
        # other backends compare it. NaN <= tau is false: c = 1, scale stays A c.
        dcr = tl.where(q <= tau, q, 1.0)
        live = valid & live_row
        scale = tl.where(live, adv * dcr, 0.0)
        tl.store(scale_ptr + row, scale)
        tl.store(loss_ptr + row, tl.where(scale != 0.0, -scale * logp, 0.0))
        tl.store(logprobs_ptr + row, tl.where(live, logp, tl.where(valid, -float("inf"), 0.0)))
        tl.store(probs_ptr + row, tl.where(live, q, 0.0))
        tl.store(row_max_ptr + row, m)
        tl.store(sum_exp_ptr + row, sum_t)
        if WITH_STATS:
            tl.store(entropy_ptr + row, tl.where(live_row, log_sum - acc_w / sum_t, 0.0))
        if WRITE_GRAD:
            # The gradient walk has its own, smaller block: with the statistics' block it
            # would need more registers than 512 threads can have.
            coef = tl.load(grad_weights_ptr + row).to(tl.float32) * scale * inv_t
            grad_offset = row * stride_grad
            if coef == 0.0:
                zero_row(grad_ptr + grad_offset, n_cols, GRAD_BLOCK)
            else:
                write_grad_row(
                    logits_row,
                    0,
                    grad_ptr,
                    grad_offset,
                    n_cols,
                    safe_target,
                    m,
                    sum_t,
                    coef,
                    scaled_inv_t,
                    GRAD_BLOCK,
                    VEC,
                    SAME_SKEW,
                    TRANSFORM,
                    logit_scale,
                    cap,
                    tanh_slope,
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
            zero_row(grad_ptr + row * stride_grad, n_cols, GRAD_BLOCK)


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
    tanh_slope,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    UNIT_T: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    TRANSFORM: tl.constexpr,
    FIXED_REF: tl.constexpr,
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
        FIXED_REF,
        logit_scale,
        cap,
        tanh_slope,
    )
    target = tl.load(local_targets_ptr + row) - seg_start
    here = (target >= 0) & (target < seg_cols)
    z_y = tl.load(logits_ptr + row_offset + tl.where(here, target, 0)).to(tl.float32)
    z_y = transform_logits(z_y, TRANSFORM, logit_scale, cap, tanh_slope)
    out = row * n_segs + seg
    tl.store(row_max_ptr + out, m)
    tl.store(sum_exp_ptr + out, sum_t)
    tl.store(sum_exp_1_ptr + out, sum_1)
    if WITH_ENTROPY:
        tl.store(weighted_ptr + out, acc_w)
    tl.store(target_logit_ptr + out, tl.where(here, z_y, 0.0))
