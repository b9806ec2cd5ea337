"""fused_linear_gft_loss against the fp64 naive path (matmul + reference)."""

import pytest
import torch

from gft_kernels import FusedLinearGFTLoss, fused_linear_gft_loss
from tests.helpers import BACKENDS, CPU, MODES, assert_all_close, device_for, reference_fp64


def head_case(
    batch=3,
    seq=5,
    hidden=16,
    vocab=37,
    *,
    per_token=False,
    dtype=torch.float32,
    zero_groups=True,
    device=CPU,
):
    h = torch.randn(batch, seq, hidden, dtype=torch.float64)
    w = torch.randn(vocab, hidden, dtype=torch.float64) * 0.5
    b = torch.randn(vocab, dtype=torch.float64)
    targets = torch.randint(0, vocab, (batch, seq))
    targets[0, 1] = -100
    mask = torch.ones(batch, seq)
    mask[-1, 2:] = 0
    adv = torch.randn(batch, seq) if per_token else torch.randn(batch)
    if zero_groups:
        adv[1] = 0.0  # a GRPO group whose rewards were all equal
    cast = dict(dtype=dtype, device=device)
    return (
        h.to(**cast),
        w.to(**cast),
        b.to(**cast),
        targets.to(device),
        adv.to(device),
        mask.to(device),
    )


def run_both(backend, h, w, b, targets, adv, mask, *, use_bias=True, **kw):
    hh = h.clone().requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    bb = b.clone().requires_grad_(True) if use_bias else None
    loss = fused_linear_gft_loss(hh, ww, targets, adv, mask, bias=bb, backend=backend, **kw)
    upstream = torch.randn_like(loss) if loss.dim() else torch.tensor(1.7, device=loss.device)
    (loss * upstream).sum().backward()

    kw_ref = {k: v for k, v in kw.items() if k != "chunk_size"}
    hr = h.detach().cpu().double().requires_grad_(True)
    wr = w.detach().cpu().double().requires_grad_(True)
    br = b.detach().cpu().double().requires_grad_(True)
    logits = hr @ wr.T + (br if use_bias else 0)
    ref = reference_fp64(logits, targets.cpu(), adv.cpu(), mask.cpu(), **kw_ref)
    (ref * upstream.cpu().double()).sum().backward()
    return (loss, hh.grad, ww.grad, bb.grad if use_bias else None), (ref, hr.grad, wr.grad, br.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tau", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matrix(backend, mode, tau, temperature):
    case = head_case(device=device_for(backend))
    ours, ref = run_both(backend, *case, tau=tau, temperature=temperature, loss_agg_mode=mode)
    assert_all_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 4, 100])  # 1, one that does not divide 15, > N
@pytest.mark.parametrize("mode", ["token-mean", "none"])
def test_chunk_sizes(backend, chunk_size, mode):
    case = head_case(per_token=True, device=device_for(backend))
    ours, ref = run_both(backend, *case, chunk_size=chunk_size, loss_agg_mode=mode, tau=0.2)
    assert_all_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_buffers_are_written_before_they_are_read(monkeypatch, backend, dtype):
    """dW is written by the first chunk's product (``beta = 0``) and one chunk buffer is
    reused: with every fresh buffer full of NaN, nothing of it may leak into the results."""
    real_empty, real_new_empty = torch.empty, torch.Tensor.new_empty

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda self, *a, **k: poisoned(real_new_empty(self, *a, **k))
    )
    case = head_case(per_token=True, dtype=dtype)
    ours, ref = run_both(backend, *case, chunk_size=4, tau=0.2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_all_close(ours, ref, rtol=tol * 10, atol=tol)


@pytest.mark.parametrize("n_tokens, budget_rows", [(2048, 700), (2048, 441), (7, 3), (5, 9)])
def test_default_chunks_are_as_few_as_the_budget_allows_and_equal(
    monkeypatch, n_tokens, budget_rows
):
    import gft_kernels._head as head

    vocab = 64
    monkeypatch.setitem(head._CHUNK_BYTES, "cpu", budget_rows * vocab * 4 + 3)
    seen = []
    original = head._logits_chunk
    monkeypatch.setattr(
        head, "_logits_chunk", lambda h, *a: seen.append(h.shape[0]) or original(h, *a)
    )
    h = torch.randn(n_tokens, 8, requires_grad=True)
    w = torch.randn(vocab, 8, requires_grad=True)
    targets = torch.zeros(n_tokens, dtype=torch.int64)
    fused_linear_gft_loss(h, w, targets, torch.ones(n_tokens), backend="torch").backward()
    assert sum(seen) == n_tokens and max(seen) <= budget_rows
    assert len(seen) == -(-n_tokens // budget_rows)  # as few chunks as the budget allows
    assert max(seen) - min(seen) <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_dimensional_hidden_without_bias(backend):
    h, w, b, targets, adv, mask = head_case(device=device_for(backend), per_token=True)
    ours, ref = run_both(
        backend,
        h.reshape(15, -1),
        w,
        b,
        targets.reshape(15),
        adv.reshape(15),
        mask.reshape(15),
        use_bias=False,
        tau=0.2,
    )
    assert_all_close(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision(backend, dtype):
    case = head_case(dtype=dtype, device=device_for(backend))
    ours, ref = run_both(backend, *case, tau=0.2, temperature=0.7)
    assert ours[2].dtype == dtype and ours[1].dtype == dtype
    # Logits are formed in the input dtype (as a bf16 model's head does), so the
    # reference, computed from the same rounded parameters in fp64, differs by rounding.
    assert_all_close(ours, ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_hidden_without_grad(backend):
    h, w, b, targets, adv, mask = head_case(device=device_for(backend))
    hh = h.clone().requires_grad_(True)
    loss = fused_linear_gft_loss(hh, w, targets, adv, mask, backend=backend)
    loss.backward()
    assert hh.grad is not None and w.grad is None
    ww = w.clone().requires_grad_(True)
    loss = fused_linear_gft_loss(h, ww, targets, adv, mask, backend=backend)
    loss.backward()
    assert ww.grad is not None
    with torch.no_grad():
        value = fused_linear_gft_loss(h, w, targets, adv, mask, backend=backend)
    torch.testing.assert_close(value, loss.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_match_logits_level(backend):
    from gft_kernels import gft_loss

    h, w, b, targets, adv, mask = head_case(device=device_for(backend))
    loss, stats = fused_linear_gft_loss(
        h,
        w,
        targets,
        adv,
        mask,
        bias=b,
        tau=0.3,
        temperature=0.7,
        return_stats=True,
        backend=backend,
    )
    logits = h @ w.T + b
    loss_l, stats_l = gft_loss(
        logits, targets, adv, mask, tau=0.3, temperature=0.7, return_stats=True, backend=backend
    )
    torch.testing.assert_close(loss, loss_l, rtol=1e-5, atol=1e-6)
    valid = (targets != -100) & mask.bool()
    for name in ("logprobs", "probs", "entropy"):
        torch.testing.assert_close(
            getattr(stats, name)[valid], getattr(stats_l, name)[valid], rtol=1e-5, atol=1e-5
        )
    torch.testing.assert_close(stats.rectified_fraction, stats_l.rectified_fraction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_advantages_give_zero(backend):
    h, w, b, targets, adv, mask = head_case(device=device_for(backend))
    adv = torch.zeros_like(adv)
    hh = h.clone().requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    loss = fused_linear_gft_loss(hh, ww, targets, adv, mask, backend=backend)
    loss.backward()
    assert loss.item() == 0 and torch.all(hh.grad == 0) and torch.all(ww.grad == 0)


def test_dropped_tokens_never_reach_the_head(monkeypatch):
    """Zero-advantage and masked tokens are removed before the matmul."""
    import gft_kernels._head as head

    h, w, b, targets, adv, mask = head_case(per_token=True)
    seen = []
    original = head._logits_chunk
    monkeypatch.setattr(
        head, "_logits_chunk", lambda x, *a: seen.append(x.shape[0]) or original(x, *a)
    )
    fused_linear_gft_loss(h, w, targets, adv, mask, backend="torch")
    contributing = ((targets != -100) & mask.bool() & (adv != 0)).sum().item()
    assert sum(seen) == contributing < targets.numel()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck_fp64_none_mode(backend):
    """torch.autograd.gradcheck on the recompute path (per-token losses)."""
    h, w, b, targets, adv, mask = head_case(batch=2, seq=3, hidden=4, vocab=6, dtype=torch.float64)
    args = [t.clone().requires_grad_(True) for t in (h, w, b)]

    def fn(hh, ww, bb):
        # tau = 0: every c is 1, so the loss is differentiable (see the logits-level test).
        return fused_linear_gft_loss(
            hh,
            ww,
            targets,
            adv.double(),
            mask,
            bias=bb,
            tau=0.0,
            loss_agg_mode="none",
            backend=backend,
            chunk_size=2,
        )

    assert torch.autograd.gradcheck(fn, tuple(args), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "sum"])
def test_directional_derivative_fp64_reduced_modes(backend, mode):
    """Central differences along random directions equal <grad, direction> in fp64.

    Reduced modes hand their precomputed gradients to the one backward they support,
    so gradcheck (which runs backward twice) does not apply; this is the same check.
    """
    h, w, b, targets, adv, mask = head_case(batch=2, seq=3, hidden=4, vocab=6, dtype=torch.float64)
    adv = adv.double()

    def loss_of(hh, ww, bb):
        return fused_linear_gft_loss(
            hh,
            ww,
            targets,
            adv,
            mask,
            bias=bb,
            tau=0.0,
            loss_agg_mode=mode,
            backend=backend,
            chunk_size=2,
        )

    params = [t.clone().requires_grad_(True) for t in (h, w, b)]
    loss_of(*params).backward()
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        dirs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        eps = 1e-6
        with torch.no_grad():
            plus = loss_of(*[p + eps * d for p, d in zip(params, dirs)])
            minus = loss_of(*[p - eps * d for p, d in zip(params, dirs)])
        numeric = ((plus - minus) / (2 * eps)).item()
        analytic = sum((p.grad * d).sum().item() for p, d in zip(params, dirs))
        assert abs(numeric - analytic) <= 1e-7 + 1e-6 * abs(analytic), (numeric, analytic)


def test_module_and_bad_input():
    h, w, b, targets, adv, mask = head_case()
    module = FusedLinearGFTLoss(tau=0.2, backend="torch", chunk_size=4)
    torch.testing.assert_close(
        module(h, w, targets, adv, mask, bias=b),
        fused_linear_gft_loss(h, w, targets, adv, mask, bias=b, tau=0.2, backend="torch"),
    )
    with pytest.raises(ValueError, match=r"weight: expected shape \(V, 16\)"):
        fused_linear_gft_loss(h, w[:, :8], targets, adv, mask)
    with pytest.raises(TypeError, match="weight: expected dtype torch.float32"):
        fused_linear_gft_loss(h, w.double(), targets, adv, mask)
    with pytest.raises(ValueError, match=r"bias: expected shape \(37,\)"):
        fused_linear_gft_loss(h, w, targets, adv, mask, bias=b[:5])
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        fused_linear_gft_loss(h, w, targets, adv, mask, chunk_size=0)
    with pytest.raises(ValueError, match="targets: expected values in"):
        fused_linear_gft_loss(h, w, torch.full_like(targets, 37), adv, mask)
    with pytest.raises(ValueError, match="hidden: expected a 2-D or 3-D"):
        fused_linear_gft_loss(h[0, 0], w, targets, adv, mask)


def test_backward_scales_by_upstream_and_refuses_a_second_pass():
    h, w, b, targets, adv, mask = head_case()
    hh = h.clone().requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    loss = fused_linear_gft_loss(hh, ww, targets, adv, mask, backend="torch")
    (loss / 4).backward(retain_graph=True)  # gradient accumulation style
    hr = h.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    ref = reference_fp64(hr.double() @ wr.double().T, targets, adv, mask)
    (ref / 4).backward()
    torch.testing.assert_close(hh.grad.double(), hr.grad.double(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ww.grad.double(), wr.grad.double(), rtol=1e-4, atol=1e-7)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_weight_grad_is_the_precomputed_buffer_not_a_copy():
    """After backward, no V x H buffer besides weight.grad survives while the loss lives."""
    h, w, b, targets, adv, mask = head_case()
    ww = w.clone().requires_grad_(True)
    loss = fused_linear_gft_loss(h, ww, targets, adv, mask, backend="torch")
    node = loss.grad_fn
    precomputed_w = node.saved_tensors[1].data_ptr()
    (loss * 0.5).backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        _ = node.saved_tensors  # released with the graph: no other V x H buffer is held
    # The buffer computed in the forward became weight.grad itself (same storage).
    assert ww.grad.data_ptr() == precomputed_w
