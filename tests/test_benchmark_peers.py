"""The benchmark suite's own loss peers and floor rows compute what they claim.

The ``careful`` PyTorch peer is checked against the fp64 reference (loss and gradients), so
that the speedups stated against it compare equal work; the floor rows are checked to do
exactly their products.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.careful_torch import careful_fused_linear_gft_loss, careful_gft_loss
from benchmarks.floors import bare_gemms, memory_floor
from gft_kernels.reference import gft_loss_reference


def _case(batch=3, seq=5, vocab=41, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64) * 3).to(dtype)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    # Every other target at its row's argmax: both DCR branches (q <= tau and q > tau).
    targets[:, ::2] = logits[:, ::2].argmax(-1)
    mask = torch.rand(batch, seq, generator=gen) > 0.3
    mask[0, 0] = True
    return logits, targets, mask, gen


def _reference_grads(fn, leaves):
    loss = fn()
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("tau", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("per_token", [False, True])
def test_careful_gft_loss_matches_reference(temperature, tau, per_token):
    logits, targets, mask, gen = _case()
    shape = targets.shape if per_token else targets.shape[:1]
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    adv_ref = adv if per_token else adv.unsqueeze(-1).expand_as(targets)
    x = logits.clone().requires_grad_(True)
    y = logits.clone().requires_grad_(True)
    mine, (g_mine,) = _reference_grads(
        lambda: careful_gft_loss(x, targets, adv, mask, tau=tau, temperature=temperature), [x]
    )
    ref, (g_ref,) = _reference_grads(
        lambda: gft_loss_reference(
            y, targets, adv_ref, mask, tau=tau, temperature=temperature, loss_agg_mode="token-mean"
        ),
        [y],
    )
    torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_mine, g_ref, rtol=1e-9, atol=1e-12)


def test_careful_gft_loss_bf16_close_to_fp64_reference():
    logits, targets, mask, gen = _case(vocab=300, dtype=torch.bfloat16)
    adv = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    x = logits.clone().requires_grad_(True)
    loss = careful_gft_loss(x, targets, adv, mask, tau=0.1)
    loss.backward()
    y = logits.double().requires_grad_(True)
    ref = gft_loss_reference(
        y, targets, adv.unsqueeze(-1).expand_as(targets), mask, tau=0.1, loss_agg_mode="token-mean"
    )
    ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-2, atol=1e-3)
    err = (x.grad.double() - y.grad).norm() / y.grad.norm()
    assert err < 2e-2


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 7])
def test_careful_fused_matches_reference(chunk_size):
    _, targets, mask, gen = _case()
    hidden = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(41, 8, generator=gen, dtype=torch.float64)
    adv = torch.randn(3, generator=gen, dtype=torch.float64)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    mine, (gh, gw) = _reference_grads(
        lambda: careful_fused_linear_gft_loss(
            h1, w1, targets, adv, mask, tau=0.2, temperature=0.8, chunk_size=chunk_size
        ),
        [h1, w1],
    )
    ref, (gh_ref, gw_ref) = _reference_grads(
        lambda: gft_loss_reference(
            h2 @ w2.T,
            targets,
            adv.unsqueeze(-1).expand_as(targets),
            mask,
            tau=0.2,
            temperature=0.8,
            loss_agg_mode="token-mean",
        ),
        [h2, w2],
    )
    torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-9, atol=1e-12)


def test_memory_floor_reads_and_writes_the_logits():
    logits = torch.randn(6, 33, dtype=torch.float64, requires_grad=True)
    value = memory_floor({"logits": logits})
    torch.testing.assert_close(value.detach(), logits.detach().amax(-1).sum().float())
    value.backward()
    # The gradient pass is a read-and-write of the logits into a fresh buffer.
    torch.testing.assert_close(logits.grad, logits.detach())
    assert logits.grad.data_ptr() != logits.data_ptr()


def test_bare_gemms_compute_the_three_products():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    floor = bare_gemms()
    floor({"hidden": hidden, "weight": weight}).backward()
    ((logits, grad),) = floor._buffers.values()
    h = hidden.detach().reshape(-1, 8)
    torch.testing.assert_close(logits, h @ weight.detach().T)
    torch.testing.assert_close(hidden.grad.reshape(-1, 8), grad @ weight.detach())
    torch.testing.assert_close(weight.grad, grad.T @ h)
    # A second call reuses the buffers (the floor pays no allocation).
    floor({"hidden": hidden, "weight": weight})
    assert floor._buffers[next(iter(floor._buffers))][0].data_ptr() == logits.data_ptr()


@pytest.mark.parametrize("op", ["gft_loss", "fused_linear_gft_loss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_composed_peer_matches_reference(op, dtype):
    """The composed peer computes the GFT loss (Triton under the interpreter without CUDA)."""
    pytest.importorskip("liger_kernel")
    from benchmarks.implementations import (
        _liger_fused,
        _liger_logits,
        _reference_fused,
        _reference_logits,
    )

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    logits, targets, mask, gen = _case(batch=2, seq=4, vocab=64)
    adv = torch.rand(2, generator=gen, dtype=torch.float64) + 0.5
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 1e-3}
    if op == "gft_loss":
        flat = {
            "targets": targets.reshape(-1).to(device),
            "advantages": adv.repeat_interleave(4).to(device),
            "mask": mask.reshape(-1).to(device),
        }
        mine = {**flat, "logits": logits.reshape(8, 64).to(device, dtype).requires_grad_(True)}
        ref = {**flat, "logits": logits.reshape(8, 64).to(device).requires_grad_(True)}
        leaves = ["logits"]
        loss = _liger_logits(mine)
        expected = _reference_logits(ref)
    else:
        hidden = torch.randn(2, 4, 16, generator=gen, dtype=torch.float64)
        weight = torch.randn(64, 16, generator=gen, dtype=torch.float64) / 4
        common = {
            "targets": targets.to(device),
            "advantages": adv.to(device),
            "mask": mask.to(device),
        }
        mine = {
            **common,
            "hidden": hidden.to(device, dtype).requires_grad_(True),
            "weight": weight.to(device, dtype).requires_grad_(True),
        }
        ref = {
            **common,
            "hidden": hidden.to(device).requires_grad_(True),
            "weight": weight.to(device).requires_grad_(True),
        }
        leaves = ["hidden", "weight"]
        loss = _liger_fused(mine)
        expected = _reference_fused(ref)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss.detach().double(), expected.detach(), **tol)
    for name in leaves:
        got, want = mine[name].grad.double(), ref[name].grad
        assert ((got - want).norm() / want.norm()).item() < tol["rtol"] * 2, name
