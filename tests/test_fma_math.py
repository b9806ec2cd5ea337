"""The FMA-pipe special functions of the Triton backend (``fma_math``) against fp64.

They run on the GPU when there is one and under the Triton interpreter otherwise (which
evaluates ``tl.fma`` as a rounded product and a rounded sum, hence the product's rounding
in the bounds below).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from gft_kernels.backends.triton.fma_math import exp2_of_product, reciprocal  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK = 1024
ULP = 2.0**-24


@triton.jit
def _exp2_kernel(z_ptr, out_ptr, slope, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    z = tl.load(z_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, exp2_of_product(z, slope), mask=offs < n)


@triton.jit
def _reciprocal_kernel(d_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.load(d_ptr + offs, mask=offs < n, other=1.0)
    tl.store(out_ptr + offs, reciprocal(d), mask=offs < n)


def _run(kernel, x: torch.Tensor, *args) -> torch.Tensor:
    x = x.float().to(DEVICE)
    out = torch.empty_like(x)
    kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, *args, x.numel(), BLOCK=BLOCK)
    return out.cpu()


@pytest.mark.parametrize("slope", [1.4426950408889634, 3.1, 0.37])
def test_exp2_of_product_over_its_range(slope):
    """``2^(z * slope)`` for ``|z * slope| <= 126`` within 4 ulp plus the fp32 product's
    rounding (which the GPU's fused multiply-adds never make)."""
    z = torch.linspace(-126.0 / slope, 126.0 / slope, 40001, dtype=torch.float64).float()
    got = _run(_exp2_kernel, z, slope).double()
    y = z.double() * slope
    want = torch.exp2(y)
    rel = (got - want).abs() / want
    allowed = 4 * ULP + y.abs() * ULP * 0.6931471805599453
    assert torch.all(rel <= allowed), f"worst {(rel / allowed).max().item():.3g} of the bound"


def test_exp2_of_product_is_exact_at_integers_and_keeps_nan():
    n = torch.arange(-126, 127, dtype=torch.float32)
    got = _run(_exp2_kernel, n, 1.0)
    assert torch.equal(got, torch.exp2(n))
    special = _run(_exp2_kernel, torch.tensor([float("nan"), 0.0, -0.0]), 1.4426950408889634)
    assert torch.isnan(special[0]) and special[1] == 1.0 and special[2] == 1.0


def test_reciprocal_of_every_normal_binade():
    """``1 / d`` within 2 ulp for ``d`` in ``[2^-125, 2^125)``, where the bit-pattern
    seed is a normal number (the soft-cap uses ``d = 1 + e`` in ``[1, 2^64]``)."""
    gen = torch.Generator().manual_seed(3)
    mantissa = 1.0 + torch.rand(60000, generator=gen, dtype=torch.float64)
    exponent = torch.randint(-125, 125, (60000,), generator=gen).double()
    d = (mantissa * torch.exp2(exponent)).float()
    d = torch.cat([d, torch.tensor([1.0, 2.0, 1.9999999, 2.0**64 + 1.0])])
    got = _run(_reciprocal_kernel, d).double()
    want = 1.0 / d.double()
    rel = (got - want).abs() / want
    assert rel.max().item() <= 2 * ULP, f"worst {rel.max().item():.3g}"
