"""Degenerate option values: ``num_tokens`` of 0, temperatures below the arithmetic's
normal range, and an ``ignore_index`` the targets' dtype cannot hold. Each gives the
fp64-correct value or a clear error on every backend and through both entry points."""

from __future__ import annotations

import pytest
import torch

from gft_kernels import GFTLoss, fused_linear_gft_loss, gft_loss
from tests.helpers import BACKENDS, device_for, make_case, reference_fp64

# The fused head through its three paths: default, with stats (no compaction) and
# without compaction.
ENTRIES = {
    "gft_loss": None,
    "fused": {},
    "fused_stats": dict(return_stats=True),
    "fused_no_compact": dict(compact_tokens=False),
}
HIDDEN = 6


def head_for(logits_shape, device, dtype=torch.float32):
    """hidden (B, T, H) and weight (V, H) for a logits shape (B, T, V)."""
    *lead, vocab = logits_shape
    hidden = torch.randn(*lead, HIDDEN, dtype=torch.float64).to(device, dtype)
    weight = (torch.randn(vocab, HIDDEN, dtype=torch.float64) * 0.7).to(device, dtype)
    return hidden, weight


def run(entry, backend, logits, targets, adv, mask, **kw):
    """The loss and the gradients of its differentiable inputs (logits, or hidden and
    weight), and the fp64 logits the reference should see."""
    if ENTRIES[entry] is None:
        x = logits.clone().requires_grad_(True)
        loss = gft_loss(x, targets, adv, mask, backend=backend, **kw)
        inputs, ref_logits = (x,), logits.double()
    else:
        h, w = (t.clone().requires_grad_(True) for t in head_for(logits.shape, logits.device))
        loss = fused_linear_gft_loss(
            h, w, targets, adv, mask, backend=backend, **kw, **ENTRIES[entry]
        )
        inputs, ref_logits = (h, w), h.detach().double() @ w.detach().double().t()
    if isinstance(loss, tuple):
        loss = loss[0]
    loss.sum().backward()
    return loss, [t.grad for t in inputs], ref_logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("num_tokens", ["tensor", "int", "float"])
def test_num_tokens_zero_on_a_batch_with_nothing_to_train(backend, entry, num_tokens):
    """0 / 0 arises only where nothing carries loss: the loss is 0 and every gradient 0
    (the naive formula, and the code before, gave NaN; the number 0 was refused)."""
    dev = device_for(backend)
    logits, targets, adv, mask = make_case(batch=2, seq=3, vocab=11, device=dev)
    mask = torch.zeros_like(mask)
    count = {"tensor": torch.tensor(0.0, device=dev), "int": 0, "float": 0.0}[num_tokens]
    loss, grads, _ = run(entry, backend, logits, targets, adv, mask, num_tokens=count)
    assert loss.item() == 0.0
    for g in grads:
        assert torch.all(g == 0), g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", ["gft_loss", "fused"])
def test_num_tokens_zero_with_valid_tokens_is_a_visible_division_by_zero(backend, entry):
    """Valid tokens over ``num_tokens=0`` cannot be checked without a host sync; the loss
    keeps the naive formula's division by zero (not finite) rather than silently
    dropping the batch, and the number 0 is accepted like the tensor."""
    dev = device_for(backend)
    logits, targets, adv, mask = make_case(batch=2, seq=3, vocab=11, device=dev)
    for count in (0, torch.tensor(0.0, device=dev)):
        loss, _, _ = run(entry, backend, logits, targets, adv, mask, num_tokens=count)
        assert not torch.isfinite(loss), loss


TINY_TEMPERATURES = [1e-39, 1e-300]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_temperature_below_float32_normal_range_is_refused(backend, entry, temperature):
    """1 / T overflows fp32 there (the loss was NaN): a ValueError naming the range."""
    dev = device_for(backend)
    logits, targets, adv, mask = make_case(batch=2, seq=3, vocab=11, device=dev)
    with pytest.raises(ValueError) as info:
        run(entry, backend, logits, targets, adv, mask, temperature=temperature)
    message = str(info.value)
    for word in ("temperature", ">= 1.1754943508222875e-38", "float32", repr(temperature)):
        assert word in message, f"{word!r} not in {message!r}"


def test_module_checks_the_temperature_at_construction_and_per_call():
    """Without an input the constructor knows only the widest arithmetic (fp64)."""
    with pytest.raises(ValueError, match=r"temperature: .*>= 2\.2250738585072014e-308"):
        GFTLoss(temperature=1e-320)
    module = GFTLoss(temperature=1e-39, backend="torch")
    logits, targets, adv, mask = make_case(batch=2, seq=3, vocab=11)
    with pytest.raises(ValueError, match="temperature: .*float32.*1e-39"):
        module(logits, targets, adv, mask)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("entry", ["gft_loss", "fused"])
def test_float64_input_takes_temperatures_down_to_float64s_normal_range(backend, entry):
    """fp64 arithmetic holds 1 / 1e-300: the result is the fp64 reference's; below fp64's
    normal range it is refused as well."""
    logits, targets, adv, mask = make_case(batch=2, seq=3, vocab=11, dtype=torch.float64)
    adv = adv.double()
    kw = dict(temperature=1e-300, tau=0.3)
    if entry == "gft_loss":
        x = logits.clone().requires_grad_(True)
        loss = gft_loss(x, targets, adv, mask, backend=backend, **kw)
        loss.backward()
        grad, ref_logits = x.grad, logits
    else:
        h, w = (t.requires_grad_(True) for t in head_for(logits.shape, "cpu", torch.float64))
        loss = fused_linear_gft_loss(h, w, targets, adv, mask, backend=backend, **kw)
        loss.backward()
        grad, ref_logits = w.grad, (h.detach() @ w.detach().t())
    x_ref = ref_logits.detach().clone().requires_grad_(True)
    ref = reference_fp64(x_ref, targets, adv, mask, **kw)
    ref.backward()
    ref_grad = x_ref.grad
    if entry != "gft_loss":  # dW = G^T h
        vocab = ref_grad.shape[-1]
        ref_grad = ref_grad.reshape(-1, vocab).t() @ h.detach().reshape(-1, HIDDEN)
    assert abs(ref.item()) > 1e290  # log p ~ (z_y - max z) / T: the scale is real
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-9 * ref_grad.abs().max().item())
    with pytest.raises(
        ValueError, match=r"temperature: .*2\.2250738585072014e-308.*float64.*1e-320"
    ):
        gft_loss(logits, targets, adv, mask, backend=backend, temperature=1e-320)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize(
    "dtype, ignore_index",
    [
        (torch.int32, -(2**32) - 100),  # an int32 copy wraps to -100
        (torch.int32, -(2**40) - 100),
        (torch.int32, 2**31),
        (torch.int64, 2**63),
    ],
)
def test_ignore_index_outside_the_targets_range_is_refused(backend, entry, dtype, ignore_index):
    """A value the targets cannot hold: some comparisons wrapped it (so -100 padding
    counted as ignored on one backend), others never matched; now every backend raises
    the same ValueError."""
    dev = device_for(backend)
    logits, targets, adv, mask = make_case(batch=2, seq=3, vocab=11, device=dev)
    targets = targets.to(dtype)
    with pytest.raises(ValueError) as info:
        run(entry, backend, logits, targets, adv, mask, ignore_index=ignore_index)
    message = str(info.value)
    info_range = torch.iinfo(dtype)
    for word in ("ignore_index", f"[{info_range.min}, {info_range.max}]", str(ignore_index)):
        assert word in message, f"{word!r} not in {message!r}"
    assert str(dtype).replace("torch.", "") in message
    # The check leaves every value the dtype holds working (here the smallest).
    edge = torch.where(targets == -100, info_range.min, targets).to(dtype)
    loss, _, _ = run(entry, backend, logits, edge, adv, mask, ignore_index=info_range.min)
    assert torch.isfinite(loss)
