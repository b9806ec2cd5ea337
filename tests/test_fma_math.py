"""The FMA-pipe special functions of the Triton backend (``fma_math``) against fp64.

They run on the GPU when there is one and under the Triton interpreter otherwise (which
evaluates ``tl.fma`` as a rounded product and a rounded sum: the bounds hold for both).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from gft_kernels.backends.triton.fma_math import exp2_poly, reciprocal  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK = 1024
ULP = 2.0**-24


@triton.jit
def _exp2_kernel(a_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + offs, exp2_poly(a), mask=offs < n)


@triton.jit
def _reciprocal_kernel(d_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.load(d_ptr + offs, mask=offs < n, other=1.0)
    tl.store(out_ptr + offs, reciprocal(d), mask=offs < n)


def _run(kernel, x: torch.Tensor) -> torch.Tensor:
    x = x.float().to(DEVICE)
    out = torch.empty_like(x)
    kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, x.numel(), BLOCK=BLOCK)
    return out.cpu()


def test_exp2_poly_over_its_range():
    """``2^a`` for ``|a| <= 126`` within 3 ulp (fp64 of the fp32 argument)."""
    a = torch.cat(
        [
            torch.linspace(-126.0, 126.0, 200001, dtype=torch.float64),
            torch.linspace(-0.5, 0.5, 20001, dtype=torch.float64),
        ]
    ).float()
    got = _run(_exp2_kernel, a).double()
    want = torch.exp2(a.double())
    rel = (got - want).abs() / want
    assert rel.max().item() <= 3 * ULP, f"worst {rel.max().item() / ULP:.3g} ulp"


def test_exp2_poly_is_exact_at_integers_and_keeps_nan():
    n = torch.arange(-126, 127, dtype=torch.float32)
    assert torch.equal(_run(_exp2_kernel, n), torch.exp2(n))
    special = _run(_exp2_kernel, torch.tensor([float("nan"), 0.0, -0.0, 0.5, -0.5]))
    assert torch.isnan(special[0]) and special[1] == 1.0 and special[2] == 1.0
    assert torch.allclose(special[3:].double(), torch.tensor([2**0.5, 2**-0.5]).double())


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
