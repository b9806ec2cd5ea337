"""Edge cases of the math (docs/design.md), gradcheck, input immutability and in-place backward."""

import pytest
import torch

from gft_kernels import GFTLoss, gft_loss
from tests.helpers import BACKENDS, check_against_reference, device_for, make_case, reference_fp64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_neg_inf_target_logit_is_finite(backend, temperature):
    dev = device_for(backend)
    logits = torch.randn(4, 9, device=dev)
    targets = torch.tensor([2, 5, 0, 8], device=dev)
    logits[1, 5] = -float("inf")  # the target of token 1
    logits[2, 3] = -float("inf")  # a non-target entry
    adv = torch.tensor([1.0, -2.0, 0.5, 1.5], device=dev)
    x = logits.clone().requires_grad_(True)
    loss, stats = gft_loss(
        x, targets, adv, temperature=temperature, return_stats=True, backend=backend
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert torch.all(x.grad[1] == 0), "a token with q = 0 has c = 0: no gradient"
    assert stats.probs[1] == 0 and stats.logprobs[1] == -float("inf")
    assert torch.isfinite(stats.entropy).all()
    # The other tokens still match the reference computed without the dead token.
    keep = torch.tensor([0, 2, 3])
    ref = reference_fp64(
        logits[keep].double().cpu(),
        targets[keep].cpu(),
        adv[keep].cpu(),
        None,
        temperature=temperature,
        loss_agg_mode="sum",
    )
    total = gft_loss(
        logits, targets, adv, temperature=temperature, loss_agg_mode="sum", backend=backend
    )
    torch.testing.assert_close(total.double().cpu(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "sum", "none"]
)
def test_all_masked_batch_gives_zero(backend, mode):
    logits, targets, adv, _ = make_case(device=device_for(backend))
    mask = torch.zeros_like(adv if adv.dim() == 2 else targets, dtype=torch.float32)
    x = logits.clone().requires_grad_(True)
    loss = gft_loss(x, targets, adv, mask, loss_agg_mode=mode, backend=backend)
    loss.sum().backward()
    assert torch.all(loss == 0)
    assert torch.all(x.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_exactly_tau_is_rectified(backend):
    # Two-way logits [log(q), log(1-q)] give q exactly representable when q = 0.25.
    dev = device_for(backend)
    q = 0.25
    logits = torch.tensor([[0.0, torch.log(torch.tensor(3.0)).item()]], device=dev)
    probs = torch.softmax(logits.double(), -1)[0, 0].item()
    tau = float(torch.softmax(logits, -1)[0, 0])  # tau equals q as the kernels compute it
    assert abs(probs - q) < 1e-6
    targets = torch.tensor([0], device=dev)
    adv = torch.tensor([1.0], device=dev)
    _, stats = gft_loss(logits, targets, adv, tau=tau, return_stats=True, backend=backend)
    assert float(stats.rectified_fraction) == 1.0
    loss_eq = gft_loss(logits, targets, adv, tau=float(stats.probs[0]), backend=backend)
    loss_below = gft_loss(logits, targets, adv, tau=float(stats.probs[0]) * 0.999, backend=backend)
    logp = float(stats.logprobs[0])
    # q <= tau: c = q; q > tau: c = 1.
    torch.testing.assert_close(float(loss_eq), -float(stats.probs[0]) * logp, rtol=1e-6, atol=0)
    torch.testing.assert_close(float(loss_below), -logp, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_advantage_tokens_contribute_nothing(backend):
    logits, targets, adv, mask = make_case(per_token_adv=True, device=device_for(backend))
    adv[0] = 0.0
    x = logits.clone().requires_grad_(True)
    gft_loss(x, targets, adv, mask, backend=backend).backward()
    assert torch.all(x.grad[0] == 0)
    check_against_reference(backend, logits, targets, adv, mask)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "none"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradcheck_fp64(backend, mode, temperature):
    logits, targets, adv, mask = make_case(batch=2, seq=3, vocab=5, dtype=torch.float64)
    adv = adv.double()
    x = logits.clone().requires_grad_(True)

    def fn(z):
        return gft_loss(
            z,
            targets,
            adv,
            mask,
            tau=0.0,
            temperature=temperature,
            loss_agg_mode=mode,
            backend=backend,
        )

    # DCR's coefficient is a stop-gradient constant, which finite differences cannot see:
    # with tau = 0 every c is 1 and the loss is the differentiable -A log p. The rectified
    # path (c = q) is checked against the reference's autograd in test_gft_loss.py.
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_not_modified(backend):
    logits, targets, adv, mask = make_case(per_token_adv=True, device=device_for(backend))
    copies = [t.clone() for t in (logits, targets, adv, mask)]
    x = logits.clone().requires_grad_(True)
    before = x.detach().clone()
    loss, _ = gft_loss(x, targets, adv, mask, return_stats=True, backend=backend)
    loss.backward()
    for original, copy in zip((logits, targets, adv, mask), copies):
        assert torch.equal(original, copy)
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward(backend):
    logits, targets, adv, mask = make_case(vocab=64, device=device_for(backend))
    x = logits.clone().requires_grad_(True)
    gft_loss(x, targets, adv, mask, backend=backend).backward()
    expected_grad = x.grad.clone()

    # The logits come out of a matmul (whose backward does not need its output), as in a
    # model's head; the in-place backward reuses their storage for the gradient.
    h = torch.eye(logits.shape[-1], device=logits.device).requires_grad_(True)
    z = logits @ h
    storage = z.data_ptr()
    captured = {}
    z.register_hook(lambda g: captured.setdefault("grad", g))
    gft_loss(z, targets, adv, mask, backend=backend, inplace_backward=True).backward()
    grad = captured["grad"]
    assert grad.data_ptr() == storage, "the gradient must live in the logits' storage"
    torch.testing.assert_close(grad, expected_grad)
    expected_h_grad = logits.reshape(-1, 64).T @ expected_grad.reshape(-1, 64)
    torch.testing.assert_close(h.grad, expected_h_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_function(backend):
    case = make_case(device=device_for(backend))
    options = dict(tau=0.2, temperature=0.7, backend=backend)
    module = GFTLoss(loss_agg_mode="seq-mean-token-sum", **options)
    assert "tau=0.2" in repr(module)
    got = module(*case)
    want = gft_loss(*case, loss_agg_mode="seq-mean-token-sum", **options)
    torch.testing.assert_close(got, want)
    override = module(*case, loss_agg_mode="sum")
    torch.testing.assert_close(override, gft_loss(*case, loss_agg_mode="sum", **options))


def test_non_contiguous_logits():
    logits, targets, adv, mask = make_case(vocab=40)
    wide = torch.randn(3, 5, 80)
    wide[..., ::2] = logits
    strided = wide[..., ::2]
    assert not strided.is_contiguous()
    check_against_reference("torch", strided, targets, adv, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_pass_skips_rows_without_loss(backend, temperature):
    """Rows that carry no loss (masked, zero advantage) are never read (NaN there stays
    out); the others are summarised by (m, S) with m / T + log S = logsumexp(z / T)."""
    from gft_kernels.backends import RowParams, check_backend, load_backend

    dev = device_for(backend)
    rows = load_backend(check_backend(backend, dev, torch.float32))
    z = torch.randn(6, 300, device=dev) * 3
    z[[1, 4]] = float("nan")
    targets = torch.randint(0, 300, (6,), device=dev)
    adv = torch.tensor([1.0, 0.0, -2.0, 0.5, 1.0, 3.0], device=dev)
    mask = torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.uint8, device=dev)
    active = (adv != 0) & (mask != 0)
    out = rows.token_pass(
        z,
        targets,
        adv,
        mask,
        RowParams(tau=0.1, temperature=temperature),
        tokens_per_advantage=1,
        with_stats=False,
    )
    for name in ("loss", "scale", "logprobs", "probs"):
        values = getattr(out, name)
        assert torch.all(values[~active] == 0), name
        assert torch.isfinite(values).all(), name
    want = torch.logsumexp(z[active].double() / temperature, -1)
    got = out.row_max[active].double() / temperature + out.sum_exp[active].double().log()
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-6, atol=1e-6)
    logp = z[active].double().log_softmax(-1) if temperature == 1.0 else None
    if logp is not None:
        want_logp = logp.gather(1, targets[active].unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(
            out.logprobs[active].double().cpu(), want_logp.cpu(), rtol=1e-6, atol=1e-6
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_logits_on_dropped_tokens_do_not_leak(backend):
    """NaN logits at masked / zero-advantage tokens: loss and gradient stay exact."""
    logits, targets, adv, mask = make_case(per_token_adv=True, device=device_for(backend))
    adv[1, :2] = 0.0
    dirty = logits.clone()
    dropped = (mask == 0) | (adv == 0) | (targets == -100)
    dirty[dropped] = float("nan")
    x = dirty.clone().requires_grad_(True)
    loss = gft_loss(x, targets, adv, mask, backend=backend)
    loss.backward()
    y = logits.clone().requires_grad_(True)
    clean = gft_loss(y, targets, adv, mask, backend=backend)
    clean.backward()
    torch.testing.assert_close(loss, clean)
    assert torch.all(x.grad[dropped] == 0)
    torch.testing.assert_close(x.grad[~dropped], y.grad[~dropped])
