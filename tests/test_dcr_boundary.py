"""The DCR boundary ``q <= tau`` is decided one way on every backend.

The rule: ``q`` in the accumulate dtype (fp32 for fp32/bf16/fp16 logits, fp64 for fp64)
against ``tau`` rounded to that dtype, which is what a PyTorch tensor-scalar comparison
does. The loss's coefficient ``c`` and ``GFTStats.rectified_fraction`` follow it alike.
A uniform row of ``V = 10`` has ``q = 1/10`` exactly at the default ``tau = 0.1``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gft_kernels.backends import backend_info
from tests.helpers import BACKENDS, device_for, reference_fp64, run_entry

B, T, V, H = 2, 3, 10, 8
TAU = 0.1
# One fp32 step below float32(0.1): q = 1/10 lies above it in fp32 and in fp64.
TAU_BELOW = float(np.nextafter(np.float32(TAU), np.float32(0.0)))
# Half an fp32 step below float32(0.1): an fp32 tau equals q = float32(1/10), an fp64 one
# does not.
TAU_ROUNDS_UP = TAU - 1e-9
ENTRIES = ("gft_loss", "gft_loss-stats", "fused", "fused-stats", "fused-full")


def cases(dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64)):
    out = []
    for backend in BACKENDS:
        for dtype in dtypes:
            if dtype not in backend_info(backend).dtypes:
                continue  # refused with a TypeError (tested elsewhere)
            for entry in ENTRIES:
                for temperature in (1.0, 0.7):
                    name = f"{backend}-{entry}-{str(dtype)[6:]}-T{temperature}"
                    out.append(pytest.param(backend, entry, dtype, temperature, id=name))
    return out


def uniform_case(entry, dtype, device):
    """Rows whose logits are all equal (a constant per row, or 0 from a zero hidden state),
    per-sequence advantages of both signs and no mask: every token is rectified iff
    ``1/10 <= tau`` in the rule's precision."""
    gen = torch.Generator().manual_seed(7)
    targets = torch.randint(0, V, (B, T), generator=gen).to(device)
    adv = torch.tensor([1.5, -0.5], device=device)
    if entry.startswith("gft_loss"):
        level = torch.tensor([[-2.0, 0.5, 3.0], [1.25, 0.0, -7.5]], dtype=torch.float64)
        leaves = {"z": level.unsqueeze(-1).expand(B, T, V).to(dtype).to(device).contiguous()}
    else:
        weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
        leaves = {
            "h": torch.zeros(B, T, H, dtype=dtype, device=device),
            "w": weight.to(dtype).to(device),
        }
    return leaves, targets, adv


def run(entry, backend, leaves, targets, adv, tau, temperature):
    """``(loss, grads, rectified_fraction or None)`` of one entry point."""
    loss, grads, stats = run_entry(
        entry, backend, leaves, targets, adv, tau=tau, temperature=temperature
    )
    fraction = None if stats is None else float(stats.rectified_fraction)
    return loss, grads, fraction


def reference(entry, leaves, targets, adv, tau, temperature):
    """fp64 reference loss and gradients of the same (uniform) inputs."""
    leaves = {k: v.detach().cpu().double().requires_grad_(True) for k, v in leaves.items()}
    z = leaves["z"] if "z" in leaves else leaves["h"] @ leaves["w"].T
    loss = reference_fp64(z, targets.cpu(), adv.cpu(), None, tau=tau, temperature=temperature)
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


def expected_loss(adv, coef):
    """token-mean of ``-A c log(1/10)`` over B x T tokens (every row uniform)."""
    per_token = -adv.double().cpu().repeat_interleave(T) * coef * np.log(1.0 / V)
    return per_token.mean()


def check(entry, backend, dtype, temperature, tau, rectified):
    dev = device_for(backend)
    leaves, targets, adv = uniform_case(entry, dtype, dev)
    loss, grads, fraction = run(entry, backend, leaves, targets, adv, tau, temperature)
    # The reference decides in fp64: give it tau as the rule rounds it for this dtype.
    tau_rule = tau if dtype == torch.float64 else float(np.float32(tau))
    ref_loss, ref_grads = reference(entry, leaves, targets, adv, tau_rule, temperature)
    coef = 1.0 / V if rectified else 1.0
    what = f"{backend}/{entry}: c should be {'q' if rectified else '1'}"
    rtol = 1e-10 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(ref_loss, expected_loss(adv, coef), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=0, msg=what)
    for name, grad in grads.items():
        scale = max(ref_grads[name].abs().max().item(), 1e-30)
        atol = (1e-10 if dtype == torch.float64 else 1e-2 if dtype.itemsize == 2 else 1e-5) * scale
        torch.testing.assert_close(grad.double(), ref_grads[name], rtol=0, atol=atol, msg=what)
    if fraction is not None:
        assert fraction == (1.0 if rectified else 0.0), f"{what}: rectified_fraction {fraction}"


@pytest.mark.parametrize(("backend", "entry", "dtype", "temperature"), cases())
def test_uniform_row_at_tau_and_just_above(backend, entry, dtype, temperature):
    """q = 1/10 at tau = 0.1 takes c = q (every token rectified), as the fp64 reference
    does; with tau one fp32 step lower, q is just above it and c = 1."""
    check(entry, backend, dtype, temperature, TAU, rectified=True)
    check(entry, backend, dtype, temperature, TAU_BELOW, rectified=False)


@pytest.mark.parametrize(("backend", "entry", "dtype", "temperature"), cases())
def test_tau_is_rounded_to_the_accumulate_dtype(backend, entry, dtype, temperature):
    """tau = 0.1 - 1e-9 rounds to float32(0.1) = q in fp32 (c = q, rectified) but stays
    below q = 0.1 in fp64 (c = 1): the comparison's precision is the rule's."""
    check(entry, backend, dtype, temperature, TAU_ROUNDS_UP, rectified=dtype != torch.float64)
