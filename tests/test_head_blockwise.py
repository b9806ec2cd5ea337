"""The blockwise head (``head="blockwise"``): Triton kernels under the interpreter against
the fp64 reference, at shapes that span several tiles in every direction (tiles of 16
tokens x 32 vocabulary rows x 16 features: 3 token blocks, a ragged last vocabulary tile
and a ragged last K step)."""

from __future__ import annotations

import pytest
import torch

from gft_kernels import fused_linear_gft_loss, gft_loss
from gft_kernels.backends.base import PartialStats, RowParams
from gft_kernels.backends.triton import head_launch, launch
from gft_kernels.backends.triton.blockwise import blockwise_gradients, blockwise_statistics
from tests.helpers import MODES, assert_all_close, device_for, reference_fp64

# CPU tensors under the interpreter here; CUDA in make gpu-check (its tiles are larger, so
# the same shapes span fewer of them).
DEVICE = device_for("triton")

# 36 tokens (3 blocks of 16, the last ragged), H = 23 (two K steps, the last ragged),
# V = 77 (three tiles of 32, the last ragged).
BATCH, SEQ, HIDDEN, VOCAB = 4, 9, 23, 77


def blockwise_case(dtype=torch.float32, per_token=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(BATCH, SEQ, HIDDEN, dtype=torch.float64, generator=g)
    w = torch.randn(VOCAB, HIDDEN, dtype=torch.float64, generator=g) * 0.5
    b = torch.randn(VOCAB, dtype=torch.float64, generator=g)
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    targets[0, 1] = -100
    mask = torch.ones(BATCH, SEQ)
    mask[-1, 4:] = 0
    shape = (BATCH, SEQ) if per_token else (BATCH,)
    adv = torch.randn(shape, dtype=torch.float64, generator=g).float()
    adv[1] = 0.0  # a group whose rewards were all equal: its tokens carry no loss
    cast = dict(dtype=dtype, device=DEVICE)
    return (
        h.to(**cast),
        w.to(**cast),
        b.to(**cast),
        targets.to(DEVICE),
        adv.to(DEVICE),
        mask.to(DEVICE),
    )


def transformed(logits, logit_scale=1.0, logit_softcap=None):
    z = logits * logit_scale
    if logit_softcap is not None:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    return z


def run(head, h, w, b, targets, adv, mask, *, use_bias=True, upstream_seed=1, **kw):
    """Loss and (dh, dW, db) of ``head``, and the fp64 reference's."""
    hh = h.clone().requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    bb = b.clone().requires_grad_(True) if use_bias else None
    loss = fused_linear_gft_loss(
        hh, ww, targets, adv, mask, bias=bb, backend="triton", head=head, **kw
    )
    g = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.randn(loss.shape, generator=g) if loss.dim() else torch.tensor(1.7)
    (loss * upstream.to(loss.device)).sum().backward()
    h, w, b, targets, adv, mask = (t.detach().cpu() for t in (h, w, b, targets, adv, mask))

    scale, cap = kw.pop("logit_scale", 1.0), kw.pop("logit_softcap", None)
    kw.pop("compact_tokens", None)
    hr = h.double().requires_grad_(True)
    wr = w.double().requires_grad_(True)
    br = b.double().requires_grad_(True)
    logits = transformed(hr @ wr.T + (br if use_bias else 0), scale, cap)
    ref = reference_fp64(logits, targets, adv, mask, **kw)
    (ref * upstream.double()).sum().backward()
    ours = (loss, hh.grad, ww.grad, bb.grad if use_bias else None)
    return ours, (ref, hr.grad, wr.grad, br.grad)


def assert_close(ours, ref, tol):
    assert_all_close(ours, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_every_mode_against_fp64(mode, temperature):
    case = blockwise_case(per_token=mode == "none")
    ours, ref = run("blockwise", *case, loss_agg_mode=mode, tau=0.3, temperature=temperature)
    assert_close(ours, ref, 1e-4)


@pytest.mark.parametrize(
    "transform",
    [dict(logit_softcap=3.0), dict(logit_scale=0.6), dict(logit_softcap=500.0, logit_scale=2.0)],
    ids=["softcap", "scale", "wide-softcap"],
)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logit_transforms(transform, temperature):
    ours, ref = run("blockwise", *blockwise_case(), tau=0.2, temperature=temperature, **transform)
    assert_close(ours, ref, 1e-4)


@pytest.mark.parametrize("head", ["blockwise", "blockwise_exact"])
def test_without_bias_and_without_compaction(head):
    case = blockwise_case(per_token=True)
    for compact in (True, False):
        ours, ref = run(head, *case, use_bias=False, tau=0.3, compact_tokens=compact)
        assert_close(ours, ref, 1e-4)
        assert ours[3] is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head", ["blockwise", "blockwise_exact"])
def test_reduced_precision(dtype, head):
    ours, ref = run(head, *blockwise_case(dtype), tau=0.2, temperature=0.7)
    assert ours[1].dtype == dtype and ours[2].dtype == dtype and ours[3].dtype == dtype
    # The logits stay fp32 in registers (the chunked head rounds them to 16 bits), so the
    # remaining error is the rounded G of the gradient products and the outputs' rounding.
    assert_close(ours, ref, 2e-2)


def test_dh_of_a_16_bit_head_is_summed_in_bounded_token_ranges(monkeypatch):
    """The fp32 scratch of dh holds one token block here (three ranges): the gradients are
    those of one range, exactly (each token's sums do not depend on the others)."""
    from gft_kernels.backends.triton import blockwise

    case = blockwise_case(torch.bfloat16)
    whole, _ = run("blockwise", *case, tau=0.3)
    on_gpu = DEVICE.type == "cuda"
    block_m = head_launch.head_tiles("grad-atomic", torch.bfloat16, on_gpu).block_m
    monkeypatch.setattr(blockwise, "DH_SCRATCH_BYTES", 4 * HIDDEN * block_m)
    ranges = blockwise.token_ranges(BATCH * SEQ, HIDDEN, block_m, False)
    assert len(ranges) == -(-BATCH * SEQ // block_m)  # 3 under the interpreter
    ranged, _ = run("blockwise", *case, tau=0.3)
    assert torch.equal(ranged[1], whole[1])
    torch.testing.assert_close(ranged[2], whole[2], rtol=0, atol=1e-2)


def test_stats_match_the_logits_level_loss():
    h, w, b, targets, adv, mask = blockwise_case()
    kw = dict(tau=0.3, temperature=0.7, return_stats=True)
    loss, stats = fused_linear_gft_loss(
        h, w, targets, adv, mask, bias=b, backend="triton", head="blockwise", **kw
    )
    logits = (h.double() @ w.double().T + b.double()).float()
    loss_l, stats_l = gft_loss(logits, targets, adv, mask, backend="torch", **kw)
    torch.testing.assert_close(loss, loss_l, rtol=1e-5, atol=1e-6)
    valid = (targets != -100) & mask.bool()
    for name in ("logprobs", "probs", "entropy"):
        torch.testing.assert_close(
            getattr(stats, name)[valid], getattr(stats_l, name)[valid], rtol=1e-5, atol=1e-5
        )
    torch.testing.assert_close(stats.rectified_fraction, stats_l.rectified_fraction)


def on_cpu(part: PartialStats) -> PartialStats:
    fields = (part.row_max, part.sum_exp, part.sum_exp_1, part.weighted, part.target_logit)
    return PartialStats(*(None if t is None else t.cpu() for t in fields))


@pytest.mark.parametrize("with_entropy", [False, True])
def test_vocabulary_splits_combine_exactly(monkeypatch, with_entropy):
    """Few tokens, so the statistics split the vocabulary across programs; the splits'
    statistics combine to the unsplit ones (and a split of -inf columns changes nothing)."""
    h, w, b, targets, *_ = blockwise_case()
    hidden, local = h.reshape(-1, HIDDEN)[:5], targets.reshape(-1)[:5].clamp(min=0)
    params = RowParams(tau=0.1, temperature=0.8)
    whole = blockwise_statistics(hidden, w, b, local, params, with_entropy, splits=1)
    launched = []
    real = head_launch.head_stats_launch
    monkeypatch.setattr(
        "gft_kernels.backends.triton.blockwise.head_stats_launch",
        lambda *a: launched.append(a[4]) or real(*a),
    )
    monkeypatch.setattr(launch, "MIN_PROGRAMS", 64)
    split = blockwise_statistics(hidden, w, b, local, params, with_entropy)
    tiles = head_launch.head_tiles("stats", hidden.dtype, hidden.is_cuda)
    assert launched == [-(-VOCAB // tiles.block_n)]  # one tile each
    hidden, w, b, local = hidden.cpu(), w.cpu(), b.cpu(), local.cpu()
    whole, split = on_cpu(whole), on_cpu(split)
    z = (hidden.double() @ w.double().T + b.double()) / 0.8
    lse = torch.logsumexp(z, 1)
    for part in (whole, split):
        log_s = part.row_max.double() / 0.8 + part.sum_exp.double().log()
        torch.testing.assert_close(log_s, lse, rtol=1e-6, atol=1e-6)
        picked = part.target_logit.double() / 0.8 - log_s
        torch.testing.assert_close(picked, z.gather(1, local[:, None])[:, 0] - lse)
        if with_entropy:
            p = torch.softmax(z, 1)
            entropy = part.sum_exp.double().log() - part.weighted.double() / part.sum_exp.double()
            torch.testing.assert_close(entropy, -(p * p.log()).sum(1), rtol=1e-5, atol=1e-5)


def test_deterministic_mode_sums_in_a_fixed_order(monkeypatch):
    """Under torch.use_deterministic_algorithms the gradient launches own their sums (no
    atomics), and give the atomic form's gradients."""
    case = blockwise_case(per_token=True)
    owners = []
    real = head_launch.head_grad_launch
    monkeypatch.setattr(
        "gft_kernels.backends.triton.blockwise.head_grad_launch",
        lambda *a: owners.append(a[8]) or real(*a),
    )
    fast, ref = run("blockwise", *case, tau=0.3)
    assert owners == [head_launch.OWNER_ATOMIC]
    owners.clear()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        ordered, _ = run("blockwise", *case, tau=0.3)
        again, _ = run("blockwise", *case, tau=0.3)
    finally:
        torch.use_deterministic_algorithms(was)
    assert owners == [head_launch.OWNER_ROWS, head_launch.OWNER_COLUMNS] * 2
    assert_close(ordered, ref, 1e-4)
    for a, b in zip(ordered[1:], again[1:]):
        assert torch.equal(a, b)
    for a, b in zip(ordered, fast):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _peaked_case(dtype, other_logit):
    """Rows whose softmax mass sits in the first tile (the targets' tile, logits of about
    N(0, 25)); the other tiles' logits are near ``other_logit`` (their bias), which puts
    their mass just below the filter's threshold: skipped, yet visible in fp32 sums."""
    g = torch.Generator().manual_seed(3)
    n, hidden, vocab = 40, 19, 200
    on_gpu = DEVICE.type == "cuda"
    # The targets' tile: the first of both deterministic launches (dh's and dW's).
    block_n = min(
        head_launch.head_tiles(kernel, torch.float32, on_gpu).block_n
        for kernel in ("grad-rows", "grad-columns")
    )
    h = torch.nn.functional.normalize(torch.randn(n, hidden, generator=g), dim=1) * 5
    w = torch.randn(vocab, hidden, generator=g)
    w[block_n:] *= 0.01
    bias = torch.zeros(vocab)
    bias[block_n:] = other_logit
    targets = torch.randint(0, block_n, (n,), generator=g)
    cast = dict(dtype=dtype, device=DEVICE)
    return h.to(**cast), w.to(**cast), bias.to(**cast), targets.to(DEVICE)


@pytest.mark.parametrize("dtype, other_logit", [(torch.bfloat16, -5.5), (torch.float16, -8.0)])
def test_gradient_filtering_stays_within_its_bound(dtype, other_logit):
    """The filter skips tiles (the sums change), and each entry of dh, dW moves by no
    more than the stated bound: ``eps |c| max|W|`` for dh, ``filter_mass sum |c h|`` for
    dW (``eps`` the dtype's unit roundoff); a tile holding a target is never skipped."""
    from gft_kernels._head_blockwise import filter_eps

    h, w, bias, targets = _peaked_case(dtype, other_logit)
    # The sums are compared in fp32 (a 16-bit dh would round the moves away): the 16-bit
    # values as fp32 operands, filtered with the 16-bit dtype's eps.
    h, w, bias = h.float(), w.float(), bias.float()
    params = RowParams(tau=0.1, temperature=1.0)
    stats = blockwise_statistics(h, w, bias, targets, params, False)
    coef = torch.linspace(-1.5, 2.0, h.shape[0], device=DEVICE)
    coef[::7] = 0.0  # tokens without loss
    need = (True, True, True)
    args = (h, w, bias, targets, stats.row_max, stats.sum_exp, coef, params, need)
    eps = filter_eps(dtype)
    exact = [t.cpu() for t in blockwise_gradients(*args, deterministic=True, filter_eps=None)]
    filtered = [t.cpu() for t in blockwise_gradients(*args, deterministic=True, filter_eps=eps)]
    on_gpu = DEVICE.type == "cuda"
    block_n = head_launch.head_tiles("grad-columns", torch.float32, on_gpu).block_n
    tiles = -(-w.shape[0] // block_n)  # the dW launch's tiles (its filter threshold)
    h, w, coef = h.cpu(), w.cpu(), coef.cpu()
    slack = 1e-6
    dh_bound = eps * coef.abs()[:, None] * w.float().abs().max(0).values[None, :]
    dw_bound = (eps / tiles) * (coef.abs()[:, None] * h.float().abs()).sum(0)[None, :]
    dh_moved = (filtered[0] - exact[0]).abs()
    dw_moved = (filtered[1] - exact[1]).abs()
    assert dh_moved.max() > 0 and dw_moved.max() > 0, "no tile was skipped"
    assert torch.all(dh_moved <= dh_bound + slack * exact[0].abs().max())
    assert torch.all(dw_moved <= dw_bound + slack * exact[1].abs().max())
    # The targets' tile is kept whole: its dW rows and db entries are the exact ones.
    assert torch.equal(filtered[1][:block_n], exact[1][:block_n])
    assert torch.equal(filtered[2][:block_n], exact[2][:block_n])
    assert torch.all(filtered[2][block_n:] == 0) and torch.any(exact[2][block_n:] != 0)


@pytest.mark.skipif(
    DEVICE.type == "cuda",
    reason="the CPU allocator's record; on CUDA the benchmarks' memory probe measures the peak",
)
def test_no_buffer_of_chunk_or_logits_size_is_allocated():
    """Every allocation of one forward + backward is tracked (the CPU allocator's reports
    through the profiler, which sees inside the custom op): the blockwise head's largest is
    a gradient (dW, fp32 V x H), never ``tokens x V``; the same tracker sees the chunked
    head's logits chunk at this shape (so the check can fail)."""
    from torch.profiler import ProfilerActivity, profile

    n, hidden, vocab = 96, 8, 160  # N x V = 15360 elements against V x H = 1280
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g)
    targets = torch.randint(0, vocab, (n,), generator=g)
    adv = torch.randn(n, generator=g)
    largest = {}
    for head in ("blockwise", "chunked"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = fused_linear_gft_loss(hh, ww, targets, adv, backend="triton", head=head)
            loss.backward()
        events = prof.events()
        largest[head] = max(e.self_cpu_memory_usage for e in events if e.name.startswith("aten"))
    assert largest["chunked"] >= n * vocab * 4, largest
    assert largest["blockwise"] <= vocab * hidden * 4, largest


def test_non_finite_hidden_state_of_a_token_without_loss_changes_nothing():
    h, w, b, targets, adv, mask = blockwise_case(per_token=True)
    poisoned = h.clone()
    poisoned[-1, 5] = float("nan")  # masked
    poisoned[1, 0] = float("inf")  # zero advantage
    for compact in (True, False):
        clean, _ = run("blockwise", h, w, b, targets, adv, mask, compact_tokens=compact)
        dirty, _ = run("blockwise", poisoned, w, b, targets, adv, mask, compact_tokens=compact)
        for a, c in zip(clean, dirty):
            torch.testing.assert_close(a, c)


def test_non_finite_hidden_state_of_a_token_with_loss_gives_nan():
    h, w, b, targets, adv, mask = blockwise_case()
    h[0, 0] = float("nan")
    hh = h.clone().requires_grad_(True)
    loss = fused_linear_gft_loss(hh, w, targets, adv, mask, backend="triton", head="blockwise")
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(hh.grad[0, 0]).all()


def test_strided_views_read_as_their_strides():
    h, w, b, targets, adv, mask = blockwise_case()
    wide = torch.randn(BATCH, SEQ, 2 * HIDDEN, device=DEVICE)
    wide[..., 1::2] = h
    weight_t = w.t().contiguous().t()  # a (H, V) parameter used as W: column-major rows
    ours, _ = run("blockwise", wide[..., 1::2], weight_t, b, targets, adv, mask, tau=0.3)
    contiguous, _ = run("blockwise", h, w, b, targets, adv, mask, tau=0.3)
    for a, c in zip(ours, contiguous):
        torch.testing.assert_close(a, c)


def test_bad_input_names_the_argument():
    h, w, b, targets, adv, mask = blockwise_case()
    with pytest.raises(ValueError, match="head: 'blockwise' runs Triton kernels.*'torch'"):
        fused_linear_gft_loss(h, w, targets, adv, mask, backend="torch", head="blockwise")
    with pytest.raises(ValueError, match="chunk_size: applies to head='chunked' only"):
        fused_linear_gft_loss(
            h, w, targets, adv, mask, backend="triton", head="blockwise", chunk_size=4
        )
    with pytest.raises(ValueError, match="head: expected one of chunked, blockwise"):
        fused_linear_gft_loss(h, w, targets, adv, mask, backend="triton", head="tiles")
    bad = targets.clone()
    bad[2, 2] = VOCAB
    with pytest.raises(ValueError, match="targets: expected values in"):
        fused_linear_gft_loss(h, w, bad, adv, mask, backend="triton", head="blockwise")
