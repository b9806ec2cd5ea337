"""A NaN or inf in the hidden state of a token that carries no loss (masked, ignore_index,
zero advantage) changes nothing in the fused head's loss and gradients, on every path:
compacted (the default), ``compact_tokens=False`` and ``return_stats=True`` (no
compaction), where such a row still enters ``dW = G^T h`` with a zero gradient row."""

from __future__ import annotations

import pytest
import torch

from gft_kernels import fused_linear_gft_loss
from tests.helpers import BACKENDS, device_for, reference_fp64

PATHS = {
    "compacted": {},
    "no-compaction": {"compact_tokens": False},
    "stats": {"return_stats": True},
}


def case(device, per_token=True):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(24, 8, generator=gen, dtype=torch.float64) * 0.5
    bias = torch.randn(24, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 24, (2, 5), generator=gen)
    mask = torch.ones(2, 5)
    adv = torch.randn(2, 5, generator=gen) if per_token else torch.randn(2, generator=gen)
    targets[0, 1] = -100
    mask[0, 2] = 0
    if per_token:
        adv[1, 3] = 0.0
    else:
        adv[1] = 0.0  # a group whose rewards were all equal: the whole sequence is idle
    idle = [(0, 1), (0, 2), (1, 3)]
    to = dict(device=device)
    return (
        hidden.float().to(**to),
        weight.float().to(**to),
        bias.float().to(**to),
        targets.to(**to),
        adv.to(**to),
        mask.to(**to),
        idle,
    )


def poisoned(hidden, idle):
    out = hidden.clone()
    for k, (b, t) in enumerate(idle):
        out[b, t, k] = (float("nan"), float("inf"), -float("inf"))[k % 3]
        out[b, t, k + 3] = float("nan")
    return out


def run(backend, hidden, weight, bias, targets, adv, mask, mode, **kw):
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    out = fused_linear_gft_loss(
        h, w, targets, adv, mask, bias=b, backend=backend, loss_agg_mode=mode, **kw
    )
    loss, stats = out if isinstance(out, tuple) else (out, None)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).reshape(loss.shape)
    (loss * upstream).sum().backward()
    return loss.detach(), h.grad, w.grad, b.grad, stats


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["token-mean", "none"])
def test_nan_in_a_token_without_loss_changes_nothing(backend, path, mode):
    hidden, weight, bias, targets, adv, mask, idle = case(device_for(backend))
    kw = PATHS[path]
    clean = run(backend, hidden, weight, bias, targets, adv, mask, mode, **kw)
    dirty = run(backend, poisoned(hidden, idle), weight, bias, targets, adv, mask, mode, **kw)
    for name, want, got in zip(("loss", "grad hidden", "grad weight", "grad bias"), clean, dirty):
        assert torch.isfinite(got).all(), f"{name} is not finite: {got}"
        torch.testing.assert_close(
            got, want, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}"
        )
    for b, t in idle:
        assert torch.all(dirty[1][b, t] == 0), "a token without loss has no hidden gradient"
    if path == "stats":
        keep = torch.ones_like(targets, dtype=torch.bool)
        for b, t in idle:
            keep[b, t] = False
        for name in ("logprobs", "probs", "entropy"):
            got, want = getattr(dirty[4], name)[keep], getattr(clean[4], name)[keep]
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)

    # And the clean values are the fp64 reference's.
    hr, wr, br = (t.detach().cpu().double().requires_grad_(True) for t in (hidden, weight, bias))
    ref = reference_fp64(hr @ wr.T + br, targets.cpu(), adv.cpu(), mask.cpu(), loss_agg_mode=mode)
    upstream = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64).reshape(ref.shape)
    (ref * upstream).sum().backward()
    for name, got, want in zip(
        ("loss", "grad hidden", "grad weight", "grad bias"),
        dirty[:4],
        (ref.detach(), hr.grad, wr.grad, br.grad),
    ):
        scale = max(want.abs().max().item(), 1e-12)
        torch.testing.assert_close(
            got.cpu().double(),
            want,
            rtol=1e-4,
            atol=1e-5 * scale,
            msg=lambda m, n=name: f"{n}: {m}",
        )


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_nan_in_an_idle_sequence_without_compaction(backend):
    """Per-sequence advantages: a whole sequence at zero advantage holds NaN hidden states."""
    hidden, weight, bias, targets, adv, mask, _ = case(device_for(backend), per_token=False)
    dirty_hidden = hidden.clone()
    dirty_hidden[1] = float("nan")
    want = run(backend, hidden, weight, bias, targets, adv, mask, "token-mean")
    got = run(
        backend, dirty_hidden, weight, bias, targets, adv, mask, "token-mean", **PATHS["stats"]
    )
    for a, b in zip(got[:4], want[:4]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
