"""Soft-capped row statistics against a fixed reference (16-bit logits, T != 1).

The running-max loop of ``token_pass`` needs, per element of a soft-capped row at T != 1,
three exponentials (tanh's and the sums' at T and at 1) plus two per slot and trip for
its rescales: more than the special-function unit (MUFU, 16 results per SM per clock)
delivers at HBM speed for 16-bit logits (6.4 elements per SM per clock on an H100).

A soft-capped logit lies in ``[-cap, cap]``, so every exponent ``x = z' log2(e) / T`` is
known to lie in ``[-c, c]`` with ``c = cap log2(e) / T`` before the row is read. The sums
are taken against a fixed reference ``R = max(0, ceil(c) - HEADROOM)``: no term exceeds
``2^HEADROOM`` (no overflow for up to 2^31 terms), no running max, no rescales. Where
``c <= HEADROOM`` (cap 30 at T >= 0.45) ``R = 0`` and no term can fall below ``2^-96``,
and up to ``c = 111`` (cap 30 at T >= 0.39) none below ``2^-126``: the walk is exact to
fp32 rounding. Wider rows can lose terms to underflow; a row whose sum comes out below
``TINY`` is walked again by the running-max loop. That takes a row whose every exponent
lies more than ``HEADROOM + 80`` below ``c``: with cap 30 at T = 0.25, every soft-capped
logit below -0.5.

MUFU then serves three exponentials per element; a quarter of tanh's are computed on the
FMA pipe instead (``fma_math.exp2_poly``), which leaves 2.75. Each exponent is one FMA
from tanh's reciprocal ``r``: ``x - R = (c - R) - 2 c r``. The price of the fixed
reference is that ``x`` is formed and rounded at its full size (up to ``HEADROOM``)
instead of next to the max: about 1e-5 relative per term, the order of the soft-cap's own
tanh (its exponential is good to 2^-22), against ``2^-8`` for the 16-bit logits
themselves. The row is re-based once at its end to the ``(m, S)`` summary the rest of the
pass and the backward read (:func:`rebase`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from gft_kernels.backends.triton.common import LN2, LOG2E, aligned_head
from gft_kernels.backends.triton.fma_math import exp2_poly, reciprocal

HEADROOM: tl.constexpr = tl.constexpr(96.0)
# A walk whose sum is below 2^-80 may have lost terms to underflow (each below 2^-126):
# up to V 2^-126, which 2^-80 keeps under 2^-24 of the sum for V up to 2^22.
TINY: tl.constexpr = tl.constexpr(8.271806125530277e-25)
# Exponents of a walk's terms reach below 2^-126 only when c + R exceeds this.
FLUSH_FREE: tl.constexpr = tl.constexpr(126.0)
# One column in EMULATED_EVERY takes tanh's exponential from the FMA pipe.
EMULATED_EVERY: tl.constexpr = tl.constexpr(4)


@triton.jit
def tanh_reciprocal(z, VEC: tl.constexpr, tanh_slope):
    """``r = 1 / (1 + 2^(z tanh_slope))`` of a ``[SLOTS, VEC]`` block, so that the
    soft-capped logit is ``cap - 2 cap r`` as ``common.transform_logits`` computes it,
    with a quarter of the exponentials on the FMA pipe (the column of each register is
    known at compile time, so each element is computed one way only). Clamped to
    ``[-64, 64]``, the polynomial's exponent stays in its range; below -64, ``1 + 2^a``
    is 1 in fp32 either way."""
    a = tl.minimum(z * tanh_slope, 64.0, propagate_nan=tl.PropagateNan.ALL)
    column = tl.arange(0, VEC)[None, :]
    emulated = column % EMULATED_EVERY == 0
    bounded = tl.maximum(a, -64.0, propagate_nan=tl.PropagateNan.ALL)
    e = tl.where(emulated, exp2_poly(bounded), tl.math.exp2(a))
    return reciprocal(1.0 + e)


@triton.jit
def _fold(
    r,
    mask,
    sum_t,
    sum_1,
    acc_w,
    base_t,
    slope_t,
    base_1,
    slope_1,
    WITH_ENTROPY: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Add a ``[SLOTS, VEC]`` block to the sums. The exponents against the references,
    ``x = (cap - 2 cap r) log2(e) / T - R``, are one FMA each from ``r``
    (``base = c - R``, ``slope = -2 c``): ``z'`` itself is never formed. Masked blocks
    pad with ``-inf`` exponents."""
    x2_t = tl.fma(r, slope_t, base_t)
    x2_1 = tl.fma(r, slope_1, base_1)
    if MASKED:
        x2_t = tl.where(mask, x2_t, -float("inf"))
        x2_1 = tl.where(mask, x2_1, -float("inf"))
    e_t = tl.math.exp2(x2_t)
    if WITH_ENTROPY:
        if MASKED:
            x2_t = tl.maximum(x2_t, -1.0e30)  # e * x2 = 0, not 0 * -inf, on the padding
        # One accumulator per element: an FMA each, where a sum per trip would take a
        # multiply and an add.
        acc_w += e_t * x2_t
    sum_t += tl.sum(e_t, axis=1)
    sum_1 += tl.sum(tl.math.exp2(x2_1), axis=1)
    return sum_t, sum_1, acc_w


@triton.jit
def _walk(
    logits_ptr,
    row_offset,
    n_cols,
    ref_t,
    ref_1,
    c_t,
    c_1,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    tanh_slope,
):
    """``(S_t, S_1, W)``: the row's sums against the references (``W = sum e x2`` in log2
    units), walked as ``token_pass.summarize_row`` walks it."""
    SLOTS: tl.constexpr = BLOCK_V // VEC
    slots = tl.arange(0, SLOTS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    sum_t = tl.zeros([SLOTS], tl.float32)
    sum_1 = tl.zeros([SLOTS], tl.float32)
    acc_w = tl.zeros([SLOTS, VEC], tl.float32)
    base_t, slope_t = c_t - ref_t, -2.0 * c_t
    base_1, slope_1 = c_1 - ref_1, -2.0 * c_1
    head = tl.minimum(aligned_head(logits_ptr + row_offset, VEC), n_cols)
    in_head = slots < head
    z = tl.load(logits_ptr + row_offset + slots, mask=in_head, other=0.0).to(tl.float32)
    sum_t, sum_1, acc_w = _fold(
        tanh_reciprocal(z, VEC, tanh_slope),
        in_head,
        sum_t,
        sum_1,
        acc_w,
        base_t,
        slope_t,
        base_1,
        slope_1,
        WITH_ENTROPY,
        True,
    )
    n_full = (n_cols - head) // BLOCK_V
    for k in range(0, n_full):
        block_ptr = tl.multiple_of(logits_ptr + row_offset + head + k * BLOCK_V, 16)
        z = tl.load(block_ptr + slots).to(tl.float32)
        sum_t, sum_1, acc_w = _fold(
            tanh_reciprocal(z, VEC, tanh_slope),
            None,
            sum_t,
            sum_1,
            acc_w,
            base_t,
            slope_t,
            base_1,
            slope_1,
            WITH_ENTROPY,
            False,
        )
    start = head + n_full * BLOCK_V
    in_tail = start + slots < n_cols
    z = tl.load(logits_ptr + row_offset + start + slots, mask=in_tail, other=0.0)
    sum_t, sum_1, acc_w = _fold(
        tanh_reciprocal(z.to(tl.float32), VEC, tanh_slope),
        in_tail,
        sum_t,
        sum_1,
        acc_w,
        base_t,
        slope_t,
        base_1,
        slope_1,
        WITH_ENTROPY,
        True,
    )
    return tl.sum(sum_t, axis=0), tl.sum(sum_1, axis=0), tl.sum(tl.sum(acc_w, axis=1), axis=0)


@triton.jit
def _floor_log2(total):
    """``floor(log2 total)`` of a normal ``total > 0`` from its exponent field (exact; a
    rounded ``log2`` could land on the wrong side of a power of two); 0 for 0 and NaN."""
    k = (total.to(tl.int32, bitcast=True) >> 23) - 127
    return tl.where((total > 0.0) & (total < float("inf")), k, 0)


@triton.jit
def _may_have_lost(total, ref, c):
    """Whether a walk may have lost terms to underflow."""
    return (total < TINY) & (c + ref > FLUSH_FREE)


@triton.jit
def rebase(total_t, total_1, weighted2, ref_t, ref_1, scaled_inv_t):
    """``(m, S_t, S_1, W)`` of ``token_pass.summarize_row`` from sums against ``ref_t`` /
    ``ref_1`` (``W`` natural units).

    ``m = (k + ref_t) T ln 2`` with ``k = floor(log2 S_t)``: ``S_t 2^-k`` is exact and in
    ``[1, 2)``, so the backward's ``coef / S`` stays a normal number. ``S_1`` is re-based
    by ``2^(ref_1 - m log2 e)`` (one exponential per row). A row with no columns
    (``S_t = 0``) gets ``m = -inf``, ``S = 0`` as the running-max loop gives it; a NaN
    sum keeps ``m`` finite so that the NaN reaches the loss.
    """
    k_int = _floor_log2(total_t)
    scale = ((127 - k_int) << 23).to(tl.float32, bitcast=True)  # 2^-k, |k| <= 126
    k = k_int.to(tl.float32)
    # Any m works with its own S (see base.PartialStats): the approximate divide (no
    # IEEE slow path) is enough.
    row_max = tl.where(total_t == 0.0, -float("inf"), tl.fdiv(k + ref_t, scaled_inv_t))
    shift = tl.where(total_t == 0.0, 0.0, row_max)
    total_1 = total_1 * tl.math.exp2(ref_1 - shift * LOG2E)
    # sum e (x2 - k) = sum e x2 - k S, then 2^-k; natural units.
    weighted = (weighted2 - k * total_t) * scale * LN2
    return row_max, total_t * scale, total_1, weighted


@triton.jit
def summarize_fixed(
    logits_ptr,
    row_offset,
    n_cols,
    scaled_inv_t,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    cap,
    tanh_slope,
):
    """``(m, S_t, S_1, W)`` of a soft-capped row against fixed references, as
    ``token_pass.summarize_row`` returns it; ``lost`` is true for a row that may have lost
    terms to underflow, which the caller walks again with a running max."""
    c_t = cap * scaled_inv_t
    c_1 = cap * LOG2E
    ref_t = tl.maximum(tl.math.ceil(c_t) - HEADROOM, 0.0)
    ref_1 = tl.maximum(tl.math.ceil(c_1) - HEADROOM, 0.0)
    total_t, total_1, weighted2 = _walk(
        logits_ptr,
        row_offset,
        n_cols,
        ref_t,
        ref_1,
        c_t,
        c_1,
        BLOCK_V,
        VEC,
        WITH_ENTROPY,
        tanh_slope,
    )
    lost = _may_have_lost(total_t, ref_t, c_t) | _may_have_lost(total_1, ref_1, c_1)
    lost = lost & (n_cols > 0)
    row_max, total_t, total_1, weighted = rebase(
        total_t, total_1, weighted2, ref_t, ref_1, scaled_inv_t
    )
    return row_max, total_t, total_1, weighted, lost
