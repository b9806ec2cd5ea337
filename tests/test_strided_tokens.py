"""Token inputs (targets, advantages, mask) given as views with any strides.

A strided slice, a stride-0 broadcast and a column of a 2-D tensor (the GRPO idiom
``token_adv[:, 0]`` for per-sequence advantages) must give the same loss and gradients as
their contiguous copies, on every backend and through both entry points. The public API
copies these O(N) inputs to contiguous memory once before dispatch.
"""

import pytest
import torch

from gft_kernels import fused_linear_gft_loss, gft_loss
from tests.helpers import BACKENDS, check_against_reference, device_for, reference_fp64

B, T, V, H = 3, 4, 11, 6


def _views(device):
    """Strided token inputs for (B, T) tokens and their contiguous equivalents."""
    wide_targets = torch.randint(0, V, (B, 2 * T), device=device)
    wide_targets[0, 2] = -100
    targets = wide_targets[:, ::2]  # stride 2 along T
    token_adv = torch.randn(B, 5, device=device)
    adv = token_adv[:, 0]  # a column: stride 5
    wide_mask = torch.ones(B, T, 3, device=device)
    wide_mask[1, -1, 1] = 0
    wide_mask[2, 0, 1] = 0
    mask = wide_mask[:, :, 1]  # stride 3 along T
    assert not (targets.is_contiguous() or adv.is_contiguous() or mask.is_contiguous())
    return (targets, adv, mask), tuple(t.contiguous() for t in (targets, adv, mask))


def _broadcast(device):
    """Per-token advantages as a stride-0 view of one value, strided targets and mask."""
    n = B * T
    targets = torch.randint(0, V, (2 * n,), device=device)[1::2]
    adv = torch.tensor([0.7], device=device).expand(n)
    mask = torch.ones(2 * n, device=device)[::2]
    assert adv.stride() == (0,)
    return (targets, adv, mask), tuple(t.contiguous() for t in (targets, adv, mask))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [_views, _broadcast], ids=["strided", "broadcast"])
def test_gft_loss_reads_strided_token_inputs(backend, make):
    device = device_for(backend)
    (targets, adv, mask), _ = make(device)
    shape = tuple(targets.shape) + (V,)
    logits = torch.randn(shape, device=device) * 2
    check_against_reference(backend, logits, targets, adv, mask, tau=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [_views, _broadcast], ids=["strided", "broadcast"])
@pytest.mark.parametrize(
    "kw",
    [{}, {"return_stats": True}, {"compact_tokens": False}],
    ids=["default", "stats", "no-compact"],
)
def test_fused_linear_reads_strided_token_inputs(backend, make, kw):
    device = device_for(backend)
    (targets, adv, mask), (targets_c, adv_c, mask_c) = make(device)
    hidden = torch.randn(tuple(targets.shape) + (H,), device=device)
    weight = torch.randn(V, H, device=device)

    def run(y, a, m):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        out = fused_linear_gft_loss(h, w, y, a, m, tau=0.3, backend=backend, **kw)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return loss.detach(), h.grad, w.grad

    loss, grad_h, grad_w = run(targets, adv, mask)
    # Ground truth: the fp64 reference on the contiguous copies.
    hr = hidden.detach().cpu().double().requires_grad_(True)
    wr = weight.detach().cpu().double().requires_grad_(True)
    ref = reference_fp64(hr @ wr.T, targets_c.cpu(), adv_c.cpu(), mask_c.cpu(), tau=0.3)
    ref.backward()
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_h.double().cpu(), hr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_w.double().cpu(), wr.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_from_strided_token_inputs(backend):
    device = device_for(backend)
    (targets, adv, mask), (targets_c, adv_c, mask_c) = _views(device)
    logits = torch.randn(B, T, V, device=device)
    _, stats = gft_loss(logits, targets, adv, mask, backend=backend, return_stats=True)
    _, stats_c = gft_loss(logits, targets_c, adv_c, mask_c, backend=backend, return_stats=True)
    for name in ("logprobs", "probs", "rectified_fraction"):
        torch.testing.assert_close(getattr(stats, name), getattr(stats_c, name))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_token_inputs_are_not_modified(backend):
    device = device_for(backend)
    (targets, adv, mask), _ = _views(device)
    before = [t.clone() for t in (targets, adv, mask)]
    strides = [t.stride() for t in (targets, adv, mask)]
    logits = torch.randn(B, T, V, device=device, requires_grad=True)
    gft_loss(logits, targets, adv, mask, backend=backend).backward()
    for t, b, s in zip((targets, adv, mask), before, strides):
        assert torch.equal(t, b) and t.stride() == s
