"""Special functions computed on the FMA pipe instead of the special-function unit.

An SM's special-function unit (MUFU: ``exp2``, ``rcp``, ``lg2``) delivers 16 results per
clock, an eighth of the FMA pipe's 128. A soft-capped statistics loop needs three
exponentials per 16-bit logit (tanh's, and the sums at T and at 1) and one reciprocal,
more than MUFU can keep up with at HBM speed; these functions move part of that work to
the FMA pipe, which has room to spare (``token_pass`` computes a quarter of tanh's
exponentials with :func:`exp2_poly`).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Adding 1.5 * 2^23 to |y| < 2^22 rounds y to the nearest integer, which then sits in the
# low mantissa bits of the sum.
ROUND_MAGIC: tl.constexpr = tl.constexpr(12582912.0)
# 2^f = 1 + f p(f) on [-1/2, 1/2], p of degree 4 fitted for relative error: 9.2e-8, and
# 1.6e-7 with fp32 coefficients and Horner steps (MUFU's ex2.approx: 2^-22 = 2.4e-7).
# The constant term is exactly 1, so 2^n comes out exact for an integer n.
EXP2_C1: tl.constexpr = tl.constexpr(0.6931470036506653)
EXP2_C2: tl.constexpr = tl.constexpr(0.24022242426872253)
EXP2_C3: tl.constexpr = tl.constexpr(0.05550733953714371)
EXP2_C4: tl.constexpr = tl.constexpr(0.009671511128544807)
EXP2_C5: tl.constexpr = tl.constexpr(0.0013264708686619997)


@triton.jit
def reciprocal(d):
    """``1 / d`` for ``d`` in ``[2^-125, 2^125)`` (where the seed is a normal number), to
    about 1 ulp.

    A bit-pattern seed (5.1%), a cubic step (1.3e-4), a Newton step: an integer subtract
    and five FMAs.
    """
    # Seed from the bit pattern (negated exponent, mirrored mantissa): within 5.1% of 1/d
    # for every positive normal d.
    seed = 0x7EF311C3 - d.to(tl.int32, bitcast=True)
    y = seed.to(tl.float32, bitcast=True)
    e = 1.0 - d * y
    y = y + y * (e + e * e)
    e = 1.0 - d * y
    return y + y * e


@triton.jit
def exp2_poly(a):
    """``2^a`` for ``|a| <= 126``, to about 3 ulp; NaN stays NaN.

    ``a = n + f`` with ``n`` an integer and ``|f| <= 1/2``, ``2^f`` a polynomial and
    ``2^n`` built from its bits: eight FMA-pipe instructions, one integer shift-and-add,
    one multiply. Outside the range the scale's exponent field wraps: callers clamp.
    """
    shifted = a + ROUND_MAGIC
    n = shifted - ROUND_MAGIC
    f = a - n
    p = tl.fma(f, EXP2_C5, EXP2_C4)
    p = tl.fma(p, f, EXP2_C3)
    p = tl.fma(p, f, EXP2_C2)
    p = tl.fma(p, f, EXP2_C1)
    p = tl.fma(p, f, 1.0)
    # The low bits of ``shifted`` hold n (two's complement); shifted into the exponent
    # field and added to 1.0's pattern they give 2^n (the magic's own bits shift out).
    bits = (shifted.to(tl.uint32, bitcast=True) << 23) + 0x3F800000
    # A multiply, not an add to p's bits: NaN * 2^n is NaN, while NaN's bits plus an
    # integer could come out as a number.
    return p * bits.to(tl.float32, bitcast=True)
