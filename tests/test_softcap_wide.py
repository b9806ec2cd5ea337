"""Soft-capping with a large cap: every backend within 1e-5 of the fp64 loss.

``cap * tanh(z * scale / cap)`` of a logit much smaller than the cap is nearly ``z * scale``;
written as ``cap - 2 cap / (1 + 2^a)`` it cancels and keeps an absolute error of about
``cap 2^-24`` (``cap 2^-22`` on a GPU), which grows with the cap. Caps above
``launch.WIDE_SOFTCAP`` take the Triton path's wide soft-cap instead (a series near 0);
cap 30 (Gemma 2) is the control that keeps the fast form.
"""

from __future__ import annotations

import pytest
import torch

from gft_kernels import fused_linear_gft_loss, gft_loss
from gft_kernels.backends import RowParams, load_backend
from tests.helpers import BACKENDS, TOLERANCES, assert_close, device_for, reference_fp64

CAPS = [30.0, 1e3, 1e4, 1e5]
DTYPES = [torch.float32, torch.bfloat16]
EPS32 = torch.finfo(torch.float32).eps


def _name(value) -> str:
    return str(value).replace("torch.", "")


def softcapped(z: torch.Tensor, cap: float, scale: float = 1.0) -> torch.Tensor:
    return cap * torch.tanh(z * scale / cap)


def wide_case(cap: float, dtype: torch.dtype, large: bool):
    """(3, 5, 37) logits of size ~3 (``large``: a third of them between 0.3 and 3 caps,
    either sign, where tanh bends and saturates), positive advantages (a relative
    tolerance on the loss means something only without cancellation)."""
    gen = torch.Generator().manual_seed(int(cap) % 1000 + 17 * large)
    logits = torch.randn(3, 5, 37, generator=gen, dtype=torch.float64) * 3.0
    if large:
        pick = torch.rand(3, 5, 37, generator=gen) < 1 / 3
        size = cap * (0.3 + 2.7 * torch.rand(3, 5, 37, generator=gen, dtype=torch.float64))
        sign = torch.where(torch.rand(3, 5, 37, generator=gen) < 0.5, -1.0, 1.0)
        logits = torch.where(pick, sign * size, logits)
    logits = logits.to(dtype)
    targets = torch.randint(0, 37, (3, 5), generator=gen)
    # With tau = 0, c = 1 where q > 0 and 0 where q = 0: a target whose q underflows
    # fp32 but not fp64 (q < e^-80, rows with logits near the cap) would flip its c.
    # Such targets move to their row's largest logit.
    log_q = torch.log_softmax(softcapped(logits.double(), cap), -1)
    far = log_q.gather(-1, targets[..., None]).squeeze(-1) < -80.0
    targets = torch.where(far, logits.double().argmax(-1), targets)
    targets[0, 1] = -100
    mask = torch.ones(3, 5)
    mask[0, -1] = 0
    adv = torch.rand(3, generator=gen, dtype=torch.float64).float() + 0.5
    return logits, targets, adv, mask


def reference(logits, targets, adv, mask, cap, **kw):
    """fp64 loss and raw-logit gradient of the soft-capped logits actually stored."""
    x = logits.detach().double().requires_grad_(True)
    loss = reference_fp64(softcapped(x, cap), targets, adv, mask, **kw)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("large", [False, True], ids=["moderate", "near-cap"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_softcap_loss_and_gradient_match_fp64(backend, cap, dtype, temperature, large):
    logits, targets, adv, mask = wide_case(cap, dtype, large)
    device = device_for(backend)
    x = logits.to(device).requires_grad_(True)
    kw = dict(temperature=temperature, tau=0.0)
    loss = gft_loss(
        x,
        targets.to(device),
        adv.to(device),
        mask.to(device),
        backend=backend,
        logit_softcap=cap,
        **kw,
    )
    loss.backward()
    want, grad_want = reference(logits, targets, adv, mask, cap, **kw)
    # The bound: 1e-5 of the loss, whatever the cap. fp32 itself rounds each log p to
    # about eps |logsumexp|, which shows only with logits near a large cap (the loss is
    # then as large: a few 1e-6 of it). tau = 0 (c = 1): the loss is -mean(A log p), of
    # the size of log p, not of a small DCR probability.
    lse_bound = 1.0 + softcapped(logits.double(), cap).abs().max().item() / temperature
    rel = abs(loss.item() - want.item()) / abs(want.item())
    fp32_floor = 2 * EPS32 * lse_bound * adv.max().item() / abs(want.item())
    assert rel <= max(1e-5, fp32_floor), (rel, fp32_floor)
    # Gradient: helpers.check_against_reference's tolerances (atol relative to the largest
    # entry, and the fp32 rounding of each row's logsumexp times the row's coefficient).
    _, (grad_rtol, grad_atol) = TOLERANCES[dtype]
    grad_atol = max(
        grad_atol * grad_want.abs().max().item(),
        2 * EPS32 * lse_bound * adv.max().item() / temperature,
    )
    assert x.grad.dtype == dtype
    assert_close(x.grad, grad_want, rtol=grad_rtol, atol=grad_atol, what="grad")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_linear_head_with_a_large_softcap_matches_fp64(temperature):
    """The fused head (logits never materialised) on the Triton path: logits of size ~3
    under cap 1e4, where the fast form's error was ~1e-4 of the loss."""
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(37, 16, generator=gen, dtype=torch.float64) * 0.75
    targets = torch.randint(0, 37, (3, 5), generator=gen)
    targets[0, 1] = -100
    mask = torch.ones(3, 5)
    mask[-1, 3:] = 0
    adv = torch.rand(3, generator=gen, dtype=torch.float64).float() + 0.5
    cap, kw = 1e4, dict(temperature=temperature, tau=0.0)
    device = device_for("triton")
    hh = h.float().to(device).requires_grad_(True)
    ww = w.float().to(device).requires_grad_(True)
    loss = fused_linear_gft_loss(
        hh,
        ww,
        targets.to(device),
        adv.to(device),
        mask.to(device),
        backend="triton",
        logit_softcap=cap,
        **kw,
    )
    loss.backward()
    hr = h.float().double().requires_grad_(True)
    wr = w.float().double().requires_grad_(True)
    ref = reference_fp64(softcapped(hr @ wr.T, cap), targets, adv, mask, **kw)
    ref.backward()
    rel = abs(loss.item() - ref.item()) / abs(ref.item())
    assert rel <= 1e-5, rel
    for got, want, what in [(hh.grad, hr.grad, "hidden grad"), (ww.grad, wr.grad, "weight grad")]:
        scale = want.abs().max().item()
        assert_close(got, want, rtol=1e-4, atol=2e-5 * scale, what=what)


def test_wide_softcap_is_accurate_relative_to_the_capped_logit():
    """``z'`` per logit on the Triton path, read back as the target logit: relative to
    ``z'`` itself (not to the cap), from 1e-6 of the cap through the series' edge
    (|u| = 1/4) to saturation, at caps 1e3 and 1e5 with a logit scale."""
    rows = load_backend("triton")
    device = device_for("triton")
    u = torch.cat(
        [
            torch.logspace(-6, 0.5, 60, dtype=torch.float64),
            torch.linspace(0.24, 0.26, 21, dtype=torch.float64),
            torch.tensor([2.0, 5.0, 9.0, 20.0, 1e3]),
        ]
    )
    u = torch.cat([u, -u])
    for cap, scale in [(1e3, 1.0), (1e5, 0.5)]:
        z = (u * cap / scale).float()[:, None]
        params = RowParams(tau=0.1, temperature=1.0, logit_scale=scale, logit_softcap=cap)
        part = rows.partial_stats(
            z.to(device),
            torch.zeros(len(z), dtype=torch.int64, device=device),
            params,
            with_entropy=False,
        )
        want = softcapped(z.double().squeeze(1), cap, scale)
        got = part.target_logit.double().cpu()
        # About 1e-6 on a GPU (see common.wide_softcap); the interpreter's exp2 and
        # division are exact to fp32 rounding.
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0.0, msg=f"cap {cap}")
        torch.testing.assert_close(part.row_max.double().cpu(), want, rtol=2e-6, atol=0.0)
