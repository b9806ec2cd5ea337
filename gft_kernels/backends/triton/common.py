"""Shared pieces of the Triton kernels: constants, the logit transforms and their slope,
and the aligned walk's head length.

The transforms are the one definition of ``z' = cap * tanh(z * scale / cap)`` (or
``z * scale``) on the GPU; the token pass, the fixed-reference walk and the gradient rows
all call them, so the forward and the backward see the same rounded ``z'``.
"""

from __future__ import annotations

import inspect

import triton
import triton.language as tl

from gft_kernels.backends.triton.fma_math import reciprocal

# log2(e) and ln(2) as Python floats (launch arguments fold them into multipliers) and as
# kernel constants.
LOG2E_VALUE = 1.4426950408889634
LN2_VALUE = 0.6931471805599453
LOG2E: tl.constexpr = tl.constexpr(LOG2E_VALUE)
LN2: tl.constexpr = tl.constexpr(LN2_VALUE)

# Triton 3.6 (the oldest release supported, see pyproject) has no ``approx`` switch on
# ``tl.fdiv``: its fdiv is ``div.full.f32`` (a reciprocal plus refining FMAs). There the
# MUFU reciprocal is written as the PTX instruction itself.
FDIV_HAS_APPROX: tl.constexpr = tl.constexpr("approx" in inspect.signature(tl.fdiv).parameters)


@triton.jit
def mufu_reciprocal(d):
    """``1 / d`` from the special-function unit (``rcp.approx``, 1 ulp), for ``d >= 1``, inf
    or NaN (flushing subnormals to zero cannot change such a result)."""
    if FDIV_HAS_APPROX:
        r = tl.fdiv(1.0, d, approx=True)
    else:
        r = tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=f,f", [d], dtype=tl.float32, is_pure=True, pack=1
        )
    return r


# Wide soft-cap (TRANSFORM 3, caps above launch.WIDE_SOFTCAP): near 0, ``cap - 2 cap r``
# cancels and keeps an absolute error of about cap 2^-22 (MUFU's exp2), which grows with
# the cap. For |u| <= 1/4 (u = z scale / cap) tanh comes from tanh(u) / u = 1 + c1 s +
# c2 s^2, s = u^2, c1 = -0.33324571, c2 = 0.12876421: the minimax fit for relative error
# on s in [0, 1/16] (4.9e-7; 5.5e-7 with fp32 rounding). The constants are c1 and c2 per
# a^2 = (2 log2(e) u)^2, the exp2 argument squared. Beyond, |z'| >= cap tanh(1/4) =
# 0.245 cap and the exp2 form's error (cap 2.3e-7: 2^-22 from exp2, 1 ulp from the
# reciprocal, 1 + e rounded) stays below 1e-6 of z'.
WIDE_NEAR: tl.constexpr = tl.constexpr(0.7213475204444817)  # |a| at |u| = 1/4
WIDE_C1: tl.constexpr = tl.constexpr(-0.04002722692984317)
WIDE_C2: tl.constexpr = tl.constexpr(0.0018577062276761477)


@triton.jit
def wide_softcap(z, logit_scale, cap, tanh_slope, rcp_on_mufu):
    """``cap * tanh(z * scale / cap)`` to about 1e-6 relative for any cap (TRANSFORM 3).

    ``rcp_on_mufu`` (a bool, or a bool per register known at compile time) takes the far
    side's reciprocal from the special-function unit (``rcp.approx``, 1 ulp) instead of
    the FMA pipe: one MUFU result for six issue slots (the reciprocal and its clamp), the
    trade a loop with MUFU to spare wants.
    """
    a = z * tanh_slope
    t = a * a
    near = z * tl.fma(t, tl.fma(t, logit_scale * WIDE_C2, logit_scale * WIDE_C1), logit_scale)
    # The FMA-pipe reciprocal needs 1 + e normal (see transform_logits); rcp.approx(inf)
    # is 0, tanh's limit, so the MUFU side skips the clamp. NaN passes either way.
    clamped = tl.minimum(a, 64.0, propagate_nan=tl.PropagateNan.ALL)
    d = 1.0 + tl.math.exp2(tl.where(rcp_on_mufu, a, clamped))
    r = tl.where(rcp_on_mufu, mufu_reciprocal(d), reciprocal(d))
    far = cap - (cap + cap) * r
    return tl.where(tl.abs(a) <= WIDE_NEAR, near, far)


@triton.jit
def transform_logits(z, TRANSFORM: tl.constexpr, logit_scale, cap, tanh_slope, rcp_on_mufu=True):
    """``z' = cap * tanh(z * scale / cap)`` (TRANSFORM 2, or 3 for a wide cap: see
    :func:`wide_softcap`, which ``rcp_on_mufu`` configures), ``z * scale`` (1) or ``z``
    (0).

    ``tanh_slope`` is ``2 log2(e) scale / cap``: ``tanh(u) = 1 - 2 / (1 + 2^(z * tanh_slope))``.
    """
    if TRANSFORM == 3:
        return wide_softcap(z, logit_scale, cap, tanh_slope, rcp_on_mufu)
    elif TRANSFORM == 2:
        # 2^64 makes tanh exactly 1 in fp32 and keeps 1 + e a normal number for the
        # reciprocal; the clamp passes NaN through, as tanh does.
        e = tl.math.exp2(tl.minimum(z * tanh_slope, 64.0, propagate_nan=tl.PropagateNan.ALL))
        return cap - (cap + cap) * reciprocal(1.0 + e)
    elif TRANSFORM == 1:
        return z * logit_scale
    else:
        return z


@triton.jit
def transform_slope(zt, TRANSFORM: tl.constexpr, logit_scale, cap):
    """``dz'/dz`` from ``z'``: ``scale * (1 - (z' / cap)^2)`` or ``scale``."""
    if TRANSFORM >= 2:
        t = zt / cap
        return logit_scale * (1.0 - t * t)
    else:
        return logit_scale


@triton.jit
def aligned_head(row_ptr, VEC: tl.constexpr):
    """Elements from ``row_ptr`` to the next 16-byte boundary (``VEC`` elements are 16
    bytes), read from the address itself: right for any base address and row stride."""
    misaligned = (row_ptr.to(tl.int64, bitcast=True) % 16) // (16 // VEC)
    return (VEC - misaligned) % VEC
