"""One fused pass in fact: ATen op counts, host syncs, custom ops under torch.compile, and
fp32 accumulation of a 16-bit head's dW.

Op counts use ``torch.profiler``: leaf ``aten::`` ops (those nested inside other ops
included, so a custom-op wrapper does not hide what it runs), views and allocations
excluded. A host sync is an ``aten::_local_scalar_dense``.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from gft_kernels import fused_linear_gft_loss, gft_loss

NOT_COMPUTE = {
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::as_strided",
    "aten::expand",
    "aten::t",
    "aten::transpose",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::select",
    "aten::slice",
    "aten::detach",
    "aten::alias",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::lift_fresh",
    "aten::_unsafe_view",
    "aten::permute",
    "aten::contiguous",
    "aten::to",
}


def profiled(fn):
    fn()  # warm: builds, first-call allocations
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    leaves = [e for e in events if not any(c.name.startswith("aten::") for c in e.cpu_children)]
    compute = [e.name for e in leaves if e.name not in NOT_COMPUTE]
    syncs = [e.name for e in events if e.name == "aten::_local_scalar_dense"]
    return compute, syncs


def logits_case():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 64, 1000, generator=gen).requires_grad_(True)
    targets = torch.randint(0, 1000, (4, 64), generator=gen)
    mask = torch.ones(4, 64)
    mask[:, -7:] = 0
    return logits, targets, torch.randn(4, generator=gen), mask


def test_gft_loss_cpu_is_one_pass_each_way():
    logits, targets, adv, mask = logits_case()
    compute, syncs = profiled(
        lambda: gft_loss(logits, targets, adv, mask, backend="cpu").backward()
    )
    assert len(compute) <= 20, compute
    assert syncs == []


def on_triton_device(*tensors):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return tuple(t.detach().to(dev).requires_grad_(t.requires_grad) for t in tensors)


def test_gft_loss_triton_has_no_host_sync():
    logits, targets, adv, mask = on_triton_device(*logits_case())
    _, syncs = profiled(lambda: gft_loss(logits, targets, adv, mask, backend="triton").backward())
    assert syncs == []


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_linear_syncs_once_with_compaction_and_never_without(backend):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 16, 32, generator=gen).requires_grad_(True)
    weight = torch.randn(100, 32, generator=gen).requires_grad_(True)
    targets = torch.randint(0, 100, (2, 16), generator=gen)
    adv = torch.tensor([1.0, 0.0])
    if backend == "triton":
        hidden, weight, targets, adv = on_triton_device(hidden, weight, targets, adv)

    def run(compact):
        loss = fused_linear_gft_loss(
            hidden, weight, targets, adv, backend=backend, compact_tokens=compact
        )
        (loss * 2).backward()

    assert profiled(lambda: run(False))[1] == []
    assert len(profiled(lambda: run(True))[1]) <= 1


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fused_linear_backward_only_scales_the_forward_gradients(backend):
    """A reduced loss's backward is the in-place scaling of dh, dW (and db): no zero-filled
    gradient for the op's other outputs, which would include a V x H buffer."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(24, 32, generator=gen).requires_grad_(True)
    weight = torch.randn(100, 32, generator=gen).requires_grad_(True)
    bias = torch.randn(100, generator=gen).requires_grad_(True)
    targets = torch.randint(0, 100, (24,), generator=gen)
    adv = torch.randn(24, generator=gen)
    loss = fused_linear_gft_loss(hidden, weight, targets, adv, bias=bias, backend=backend)
    upstream = torch.tensor(3.0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward(upstream)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    leaves = [e for e in events if not any(c.name.startswith("aten::") for c in e.cpu_children)]
    assert [e.name for e in leaves if e.name not in NOT_COMPUTE] == ["aten::mul_"] * 3


def _check_compiled(fn, args, compiler):
    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    eager_args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    got = compiled(*args)
    want = fn(*eager_args)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(args, eager_args):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "backend, compiler", [("cpu", "inductor"), ("torch", "aot_eager"), ("cpu", "aot_eager")]
)
def test_torch_compile_fullgraph_matches_eager(backend, compiler):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 8, 50, generator=gen).requires_grad_(True)
    hidden = torch.randn(2, 8, 16, generator=gen).requires_grad_(True)
    weight = torch.randn(50, 16, generator=gen).requires_grad_(True)
    targets = torch.randint(0, 50, (2, 8), generator=gen)
    adv = torch.randn(2, generator=gen)
    mask = torch.ones(2, 8)
    mask[:, -2:] = 0

    def logits_level(x):
        loss, stats = gft_loss(
            x, targets, adv, mask, backend=backend, temperature=0.7, return_stats=True
        )
        return loss * 2 + stats.entropy.mean()

    def fused(h, w):
        return fused_linear_gft_loss(
            h,
            w,
            targets,
            adv,
            mask,
            backend=backend,
            loss_agg_mode="seq-mean-token-mean",
            logit_softcap=5.0,
        )

    _check_compiled(logits_level, [logits], compiler)
    _check_compiled(fused, [hidden, weight], compiler)


def test_bf16_head_dw_error_does_not_grow_with_chunks():
    gen = torch.Generator().manual_seed(3)
    n, hidden_size, vocab = 1024, 64, 512
    h = torch.randn(n, hidden_size, generator=gen)
    w = torch.randn(vocab, hidden_size, generator=gen) * 0.5
    targets = torch.randint(0, vocab, (n,), generator=gen)
    adv = torch.randn(n, generator=gen)
    ref_w = w.double().requires_grad_(True)
    from gft_kernels.reference import gft_loss_reference

    gft_loss_reference(h.bfloat16().double() @ ref_w.t(), targets, adv).backward()

    def error(chunk):
        wb = w.bfloat16().requires_grad_(True)
        fused_linear_gft_loss(
            h.bfloat16(), wb, targets, adv, backend="cpu", chunk_size=chunk
        ).backward()
        return ((wb.grad.double() - ref_w.grad).norm() / ref_w.grad.norm()).item()

    one, many = error(n), error(n // 256)
    assert many <= 1.05 * one, (one, many)
