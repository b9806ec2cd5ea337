"""Nothing silently wrong: every case gets the right answer or a clear error.

Each test names the case it guards (in-place safety, tempered gradients, double backward,
narrow targets, non-finite rows, autocast, evaluation cost, reference, masks, advantages
overflow, the scalar native path); the native build's robustness is in
``test_native_build.py``. Triton runs under the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from gft_kernels import (
    FusedLinearGFTLoss,
    GFTLoss,
    fused_linear_gft_loss,
    gft_loss,
    group_advantages,
)
from gft_kernels.reference import gft_loss_reference
from tests.helpers import BACKENDS  # noqa: E402


def on(backend, *tensors):
    """Tensors on the backend's device: CUDA for Triton when present, else the CPU."""
    dev = torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
    moved = tuple(t.to(dev) for t in tensors)
    return moved if len(moved) > 1 else moved[0]


def head_and_tokens(seed=0, n=6, hidden=8, vocab=20):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=gen)
    h = torch.randn(n, hidden, generator=gen)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    adv = torch.randn(n, generator=gen)
    return weight, h, targets, adv


def z_loss(logits):
    return 1e-2 * torch.logsumexp(logits, -1).pow(2).mean()


# --- in-place backward -----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_with_a_second_consumer_is_exact_or_refused(backend):
    """A z-loss on the same logits: the weight gradient is exact when the z-loss backward
    runs first, and autograd refuses (instead of reading overwritten logits) otherwise."""
    weight, h, targets, adv = on(backend, *head_and_tokens())
    w_ref = weight.clone().requires_grad_(True)
    logits = h @ w_ref.t()
    (gft_loss(logits, targets, adv, backend=backend) + z_loss(logits)).backward()

    w = weight.clone().requires_grad_(True)
    logits = h @ w.t()
    (
        gft_loss(logits, targets, adv, backend=backend, inplace_backward=True) + z_loss(logits)
    ).backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)

    w = weight.clone().requires_grad_(True)
    logits = h @ w.t()
    loss = z_loss(logits) + gft_loss(logits, targets, adv, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_second_backward_is_refused(backend):
    weight, h, targets, adv = on(backend, *head_and_tokens())
    w = weight.clone().requires_grad_(True)
    loss = gft_loss(h @ w.t(), targets, adv, backend=backend, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward=True.*once"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_write_is_visible_to_autograd(backend):
    weight, h, targets, adv = on(backend, *head_and_tokens())
    logits = (h @ weight.t()).requires_grad_(True)
    version = logits._version
    gft_loss(logits, targets, adv, backend=backend, inplace_backward=True).backward()
    assert logits._version > version


def test_inplace_refused_for_logits_without_grad_or_overlapping():
    _, _, targets, adv = head_and_tokens()
    logits = torch.randn(6, 20)
    adv_req = adv.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="inplace_backward.*require grad"):
        gft_loss(logits, targets, adv_req, inplace_backward=True, backend="torch")
    expanded = torch.randn(1, 20, requires_grad=True).expand(6, 20)
    with pytest.raises(ValueError, match="inplace_backward.*share memory"):
        gft_loss(expanded, targets, adv, inplace_backward=True, backend="cpu")
    assert torch.equal(logits, logits.clone())


# --- tempered gradients --------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.7, 1e-2, 1e-3])
def test_tempered_gradient_matches_fp64(backend, temperature):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(8, 50, generator=gen) * 3
    z[0, 3] = 1000.0  # a dominant logit far from 0
    targets = torch.randint(0, 50, (8,), generator=gen)
    targets[0] = 3
    adv = torch.randn(8, generator=gen)
    x = on(backend, z.clone()).requires_grad_(True)
    gft_loss(x, *on(backend, targets, adv), temperature=temperature, backend=backend).backward()
    ref = z.double().requires_grad_(True)
    gft_loss_reference(ref, targets, adv, temperature=temperature).backward()
    err = (x.grad.cpu().double() - ref.grad).abs().max() / ref.grad.abs().max()
    assert err.item() <= 1e-5, err.item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1e-2, 1e-5, 1e-6])
def test_certain_token_gradient_is_exactly_zero(backend, temperature):
    x = on(backend, torch.tensor([[1000.0, 0.0, 0.0, 0.0]])).requires_grad_(True)
    loss = gft_loss(
        x,
        *on(backend, torch.tensor([0]), torch.tensor([1.0])),
        temperature=temperature,
        backend=backend,
    )
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(x.grad == 0), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_temperature_is_finite(backend):
    x = on(backend, torch.tensor([[1.0, -float("inf"), 3.0, 2.0]])).requires_grad_(True)
    loss = gft_loss(
        x,
        *on(backend, torch.tensor([2]), torch.tensor([1.0])),
        temperature=1e300,
        tau=0.0,
        backend=backend,
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # log p of a uniform over the 3 finite entries.
    torch.testing.assert_close(loss.cpu(), torch.tensor(torch.log(torch.tensor(3.0)).item()))


# --- double backward -----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused_clearly(backend):
    weight, h, targets, adv = on(backend, *head_and_tokens())
    x = (h @ weight.t()).requires_grad_(True)
    (g,) = torch.autograd.grad(gft_loss(x, targets, adv, backend=backend), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        g.pow(2).sum().backward()
    hh = h.clone().requires_grad_(True)
    loss = fused_linear_gft_loss(hh, weight, targets, adv, backend=backend)
    (gh,) = torch.autograd.grad(loss, hh, create_graph=True)
    with pytest.raises(RuntimeError, match="not twice differentiable"):
        gh.pow(2).sum().backward()


# --- narrow targets ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_narrow_integer_targets_are_refused(dtype):
    with pytest.raises(TypeError, match="targets.*int64 or int32"):
        gft_loss(torch.randn(2, 200), torch.tensor([100, 3]).to(dtype), torch.ones(2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_targets_are_exact(backend):
    weight, h, targets, adv = on(backend, *head_and_tokens())
    targets[2] = -100
    a = gft_loss(h @ weight.t(), targets, adv, backend=backend)
    b = gft_loss(h @ weight.t(), targets.int(), adv, backend=backend)
    assert torch.equal(a, b)


# --- non-finite rows -----------------------------------------------------------------


def nonfinite_rows():
    z = torch.randn(5, 10, generator=torch.Generator().manual_seed(4))
    z[0] = -float("inf")  # a valid token whose row is all -inf (the formula gives NaN)
    z[1, 3] = float("inf")  # +inf in a non-target column
    z[2] = torch.tensor([3e38, -3e38] * 5)  # fp32 extremes, T = 0.5 overflows z / T
    z[3, 4] = float("inf")  # +inf at the target
    return z, torch.tensor([1, 2, 0, 4, 5])


@pytest.mark.parametrize("tau", [0.0, 0.1, 1.0])
def test_nonfinite_rows_are_finite_and_agree(tau):
    z, targets = nonfinite_rows()
    adv = torch.tensor([1.0, -1.0, 2.0, 1.0, 0.5])
    results = {}
    for backend in BACKENDS:
        x = on(backend, z.clone()).requires_grad_(True)
        loss = gft_loss(
            x,
            *on(backend, targets, adv),
            temperature=0.5,
            tau=tau,
            backend=backend,
            loss_agg_mode="none",
        )
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all(), backend
        results[backend] = (loss.detach().cpu(), x.grad.cpu())
    # Rows without a finite max carry no loss and no gradient; row 2 is an ordinary row.
    for loss, grad in results.values():
        assert torch.all(loss[[0, 1, 3]] == 0) and torch.all(grad[[0, 1, 3]] == 0)
        torch.testing.assert_close(loss, results["torch"][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, results["torch"][1], rtol=1e-5, atol=1e-6)
    ref = gft_loss_reference(
        z[4:].double(), targets[4:], adv[4:], temperature=0.5, tau=tau, loss_agg_mode="none"
    )
    torch.testing.assert_close(results["cpu"][0][4:].double(), ref, rtol=1e-5, atol=1e-6)


# --- autocast, evaluation ------------------------------------------------------------


def test_fused_linear_under_cpu_autocast():
    weight, h, targets, adv = head_and_tokens()
    w = weight.clone().requires_grad_(True)
    hh = h.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_gft_loss(hh, w, targets, adv, backend="cpu")
    loss.backward()
    assert w.grad.dtype == torch.float32 and hh.grad.dtype == torch.float32
    ref = gft_loss_reference((h.bfloat16() @ weight.bfloat16().t()).double(), targets, adv)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-3, atol=1e-3)


def test_evaluation_pays_only_the_forward(monkeypatch):
    import gft_kernels._head as head

    def no_gradients(*args, **kwargs):
        raise AssertionError("a gradient was computed under no_grad")

    monkeypatch.setattr(head, "_accumulate_dw", no_gradients)
    weight, h, targets, adv = head_and_tokens()
    w = weight.clone().requires_grad_(True)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            loss = fused_linear_gft_loss(h, w, targets, adv, backend="cpu")
        assert not loss.requires_grad


# --- reference, masks, options -------------------------------------------------------


def test_reference_gives_advantages_no_gradient():
    weight, h, targets, adv = head_and_tokens()
    a = adv.clone().requires_grad_(True)
    loss = gft_loss_reference(h @ weight.t(), targets, a)
    assert not loss.requires_grad or torch.autograd.grad(loss, a, allow_unused=True)[0] is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.float16])
def test_mask_values_other_than_0_1_are_refused(backend, dtype):
    weight, h, targets, adv = on(backend, *head_and_tokens())
    mask = on(backend, torch.tensor([1, 0, 2, 1, 1, 1]).to(dtype))
    with pytest.raises(ValueError, match="mask: expected 0/1 values, got 2"):
        gft_loss(h @ weight.t(), targets, adv, mask, backend=backend)
    with pytest.raises(ValueError, match="mask: expected 0/1 values, got 2"):
        fused_linear_gft_loss(h, weight, targets, adv, mask, backend=backend)


def test_modules_check_keywords_at_construction():
    with pytest.raises(ValueError, match="tau"):
        GFTLoss(tau=-1)
    with pytest.raises(ValueError, match="temperature"):
        FusedLinearGFTLoss(temperature=0.0)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        GFTLoss(loss_agg_mode="mean")
    with pytest.raises(ValueError, match="logit_softcap"):
        GFTLoss(logit_softcap=-3.0)


def test_group_advantages_do_not_overflow_fp32():
    for rewards in ([1e20, -1e20, 3e20, 0.0], [3e38, -3e38]):
        r = torch.tensor(rewards, dtype=torch.float32)
        want = (r.double() - r.double().mean()) / (r.double().std() + 1e-6)
        got = group_advantages(r, group_size=len(rewards))
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_scalar_native_path_vocab_one_is_exact():
    from gft_kernels.backends import cpu_rows

    module = cpu_rows.require()
    previous = module.set_simd_enabled(False)
    try:
        for temperature in (1.0, 0.7):
            x = torch.tensor([[2.5], [-1.0]], requires_grad=True)
            loss, stats = gft_loss(
                x,
                torch.tensor([0, 0]),
                torch.tensor([1.0, 2.0]),
                temperature=temperature,
                backend="cpu",
                return_stats=True,
            )
            loss.backward()
            assert torch.all(stats.logprobs == 0) and loss.item() == 0
            assert torch.all(x.grad == 0)
    finally:
        module.set_simd_enabled(previous)
