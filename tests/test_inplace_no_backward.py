"""``inplace_backward=True`` where no backward will run (no_grad, inference_mode, the
first forward of a reentrant checkpoint), and the overlap check deciding exactly."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from gft_kernels import GFTLoss, gft_loss
from tests.helpers import BACKENDS, device_for, make_case, reference_fp64

HIDDEN = 8


def head_case(backend, batch=3, seq=5, vocab=37):
    """hidden (B, T, H), weight (V, H) and the token inputs, on the backend's device."""
    dev = device_for(backend)
    _, targets, adv, mask = make_case(batch, seq, vocab, device=dev)
    hidden = torch.randn(batch, seq, HIDDEN, device=dev)
    weight = torch.randn(vocab, HIDDEN, device=dev) * 0.5
    return hidden, weight, targets, adv, mask


def reference_head_grads(hidden, weight, targets, adv, mask, **kw):
    h = hidden.detach().cpu().double().requires_grad_(True)
    w = weight.detach().cpu().double().requires_grad_(True)
    loss = reference_fp64(h @ w.t(), targets.cpu(), adv.cpu(), mask.cpu(), **kw)
    loss.backward()
    return loss, h.grad, w.grad


def assert_close_fp32(actual, expected, what):
    torch.testing.assert_close(
        actual.detach().double().cpu(),
        expected,
        rtol=1e-4,
        atol=1e-5 * max(expected.abs().max().item(), 1.0),
        msg=lambda m: f"{what}: {m}",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_inplace_without_grad_mode_computes_the_loss(backend, context):
    """An evaluation loop with GFTLoss(inplace_backward=True): nothing will be overwritten,
    so the loss is computed (it was refused) and the logits are left as they were."""
    logits, targets, adv, mask = make_case(device=device_for(backend))
    ref = reference_fp64(logits.cpu(), targets.cpu(), adv.cpu(), mask.cpu(), tau=0.2)
    before = logits.clone()
    module = GFTLoss(inplace_backward=True, backend=backend, tau=0.2)
    with getattr(torch, context)():
        by_module = module(logits, targets, adv, mask)
        by_function = gft_loss(
            logits, targets, adv, mask, tau=0.2, backend=backend, inplace_backward=True
        )
    for loss in (by_module, by_function):
        torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-5, atol=1e-6)
        assert not loss.requires_grad
    assert torch.equal(logits, before)
    # With grad mode on, logits that do not require grad are still refused.
    with pytest.raises(ValueError, match="inplace_backward.*require grad"):
        module(logits, targets, adv, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reentrant_checkpoint_writes_the_gradient_in_place_in_its_recompute(backend):
    """The checkpoint's forward runs under no_grad (the call was refused there); its
    recompute runs with grad mode on and overwrites the recomputed logits with their
    gradient. The head's gradients match the fp64 reference."""
    hidden, weight, targets, adv, mask = head_case(backend)
    seen = []

    def head_loss(h, w):
        logits = h @ w.t()
        seen.append(logits)
        return gft_loss(logits, targets, adv, mask, backend=backend, inplace_backward=True)

    h, w = (t.clone().requires_grad_(True) for t in (hidden, weight))
    loss = checkpoint(head_loss, h, w, use_reentrant=True)
    assert len(seen) == 1 and not seen[0].requires_grad  # the no_grad forward
    loss.backward()
    assert len(seen) == 2  # the recompute
    ref, ref_h, ref_w = reference_head_grads(hidden, weight, targets, adv, mask)
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-5, atol=1e-6)
    assert_close_fp32(h.grad, ref_h, "grad hidden")
    assert_close_fp32(w.grad, ref_w, "grad weight")
    # In place: the recomputed logits now hold dL/dlogits = G (dW = G^T h).
    grad_logits = seen[1].detach().reshape(-1, weight.shape[0])
    h_flat = hidden.reshape(-1, HIDDEN)
    assert_close_fp32(grad_logits.t() @ h_flat, ref_w, "G^T h from the overwritten logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_shift_is_accepted_in_place(backend):
    """``logits[:, :-1]`` of a batch (B > 1): no two elements share memory, so it is not
    refused (the old check answered "too hard to tell"); the gradient matches the fp64
    reference and reaches the full logits."""
    logits, targets, adv, mask = make_case(batch=3, seq=6, vocab=29, device=device_for(backend))
    full = logits.clone().requires_grad_(True)
    shifted = full[:, :-1]
    loss = gft_loss(
        shifted, targets[:, 1:], adv, mask[:, 1:], backend=backend, inplace_backward=True
    )
    loss.backward()
    x_ref = logits.cpu().double().requires_grad_(True)
    ref = reference_fp64(x_ref[:, :-1], targets[:, 1:].cpu(), adv.cpu(), mask[:, 1:].cpu())
    ref.backward()
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-5, atol=1e-6)
    assert_close_fp32(full.grad, x_ref.grad, "grad of the full logits")
    assert torch.all(full.grad[:, -1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_in_place_match_the_reference(backend):
    """Rows one stride apart with room between them (every other row, a column block of
    a wider buffer): accepted in place, with the reference's gradient."""
    dev = device_for(backend)
    logits, targets, adv, mask = make_case(batch=2, seq=4, vocab=19, device=dev)
    flat = logits.reshape(-1, 19)
    targets, adv, mask = targets.reshape(-1), adv.repeat_interleave(4), mask.reshape(-1)
    wide = torch.randn(8, 50, device=dev)
    wide[:, 7:26] = flat
    tall = torch.randn(16, 19, device=dev)
    tall[::2] = flat
    for name, base, view in [
        ("column block", wide, lambda b: b[:, 7:26]),
        ("every other row", tall, lambda b: b[::2]),
    ]:
        x = base.clone().requires_grad_(True)
        z = view(x)
        assert not z.is_contiguous() and z.stride(-1) == 1, name
        gft_loss(z, targets, adv, mask, backend=backend, inplace_backward=True).backward()
        x_ref = flat.cpu().double().requires_grad_(True)
        reference_fp64(x_ref, targets.cpu(), adv.cpu(), mask.cpu()).backward()
        assert_close_fp32(view(x.grad), x_ref.grad, name)
        outside = x.grad.clone()
        view(outside).zero_()
        assert torch.all(outside == 0), f"{name}: gradient outside the view"


def test_overlap_is_decided_exactly_from_sizes_and_strides():
    """Rows of an (N, V) view with a unit last stride overlap exactly when the row stride
    is below V (or 0) and there is more than one row."""
    from gft_kernels._checks import rows_overlap

    base = torch.zeros(200)
    disjoint = [
        base[:60].view(6, 10),
        base.as_strided((6, 10), (10, 1)),
        base.as_strided((6, 10), (13, 1)),  # gaps between rows
        base.as_strided((1, 10), (0, 1)),  # one row: nothing to share with
        base.as_strided((1, 10), (3, 1)),
        torch.zeros(4, 6, 10)[:, :-1].reshape(-1, 10),  # a copy: the causal shift
        torch.zeros(12, 10)[::2],  # a view, rows 20 apart
    ]
    overlapping = [
        base.as_strided((6, 10), (0, 1)),  # expanded
        base.as_strided((6, 10), (9, 1)),  # one element shared per pair of rows
        base.as_strided((2, 10), (1, 1)),
        torch.zeros(1, 10).expand(6, 10),
    ]
    for t in disjoint:
        assert not rows_overlap(t), (tuple(t.shape), t.stride())
    for t in overlapping:
        assert rows_overlap(t), (tuple(t.shape), t.stride())


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_logits_are_still_refused_and_a_copy_is_not(backend):
    """Real overlap is refused; a 3-D view whose rows need a copy anyway (rows sharing
    memory only in the caller's tensor) runs, since the copy is what gets overwritten."""
    dev = device_for(backend)
    logits, targets, adv, mask = make_case(batch=1, seq=4, vocab=13, device=dev)
    row = torch.randn(1, 13, device=dev, requires_grad=True)
    with pytest.raises(ValueError, match="inplace_backward.*share memory"):
        gft_loss(
            row.expand(4, 13), targets[0], adv.expand(4), backend=backend, inplace_backward=True
        )
    # (2, 4, V) repeating one (1, 4, V) block: the kernels read a contiguous copy.
    block = logits.clone().requires_grad_(True)
    targets2, adv2, mask2 = targets.repeat(2, 1), adv.repeat(2), mask.repeat(2, 1)
    loss = gft_loss(
        block.expand(2, 4, 13), targets2, adv2, mask2, backend=backend, inplace_backward=True
    )
    loss.backward()
    x_ref = logits.cpu().double().requires_grad_(True)
    reference_fp64(x_ref.expand(2, 4, 13), targets2.cpu(), adv2.cpu(), mask2.cpu()).backward()
    assert_close_fp32(block.grad, x_ref.grad, "grad through the expanded batch")
