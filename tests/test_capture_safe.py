"""The fused head without host synchronisation: token compaction (``nonzero``, a host
sync that breaks CUDA-graph capture and ``torch.compile(mode="reduce-overhead")``) is
turned off automatically while compiling or capturing, and the result is the compacted
one.

Syncs are observed with ``torch.profiler``, which sees the ATen ops run inside the
library's custom ops (a ``TorchDispatchMode`` only sees the custom op itself). On CPU
tensors ``nonzero`` does not wait for a device, but it is the op that does on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import gft_kernels._head as head
from gft_kernels import fused_linear_gft_loss, gft_loss
from gft_kernels.backends import token_terms as terms
from tests.helpers import device_for

# Ops that read a device value on the host (or, for nonzero, size their output by one).
SYNCS = {
    "aten::nonzero",
    "aten::nonzero_numpy",
    "aten::argwhere",
    "aten::masked_select",
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::is_nonzero",
    "aten::equal",
}


def host_syncs(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, sorted({e.name for e in prof.events() if e.name in SYNCS})


def head_case(device):
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 6, 16, generator=gen)
    weight = torch.randn(50, 16, generator=gen) * 0.5
    bias = torch.randn(50, generator=gen)
    targets = torch.randint(0, 50, (3, 6), generator=gen)
    targets[0, 2] = -100
    mask = torch.ones(3, 6)
    mask[2, 3:] = 0
    adv = torch.tensor([0.7, 0.0, -1.2])  # the middle group carries no loss
    return [t.to(device) for t in (hidden, weight, bias, targets, adv, mask)]


def run(backend, case, mode, **kw):
    hidden, weight, bias, targets, adv, mask = case
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    loss = fused_linear_gft_loss(
        h, w, targets, adv, mask, bias=b, backend=backend, loss_agg_mode=mode, **kw
    )
    upstream = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).reshape(loss.shape)
    (loss * upstream).sum().backward()
    return loss.detach(), h.grad, w.grad, b.grad


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("mode", ["token-mean", "none"])
def test_compiling_turns_compaction_off_and_gives_the_compacted_result(monkeypatch, backend, mode):
    """Under torch.compile only the Python wrapper is traced (the ops are opaque), so the
    choice is made there, and again in the head for the backward's recompute (``none``)."""
    case = head_case(device_for(backend))
    want, syncs = host_syncs(lambda: run(backend, case, mode))
    assert "aten::nonzero" in syncs  # the default compacts: the probe sees it
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got, syncs = host_syncs(lambda: run(backend, case, mode))
    assert syncs == []
    for name, a, b in zip(("loss", "grad hidden", "grad weight", "grad bias"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_the_head_itself_does_not_compact_while_capturing(monkeypatch):
    """Capturing is checked where the head runs, so the paths that ask for compaction
    below the wrapper (the recompute of ``none``'s backward, the vocab-parallel head, a
    replayed compiled graph) stay capturable."""
    case = head_case(device_for("cpu"))
    want = run("cpu", case, "none")
    monkeypatch.setattr(head, "must_not_sync", lambda device: True)
    got, syncs = host_syncs(lambda: run("cpu", case, "none"))
    assert syncs == []
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_capture_is_checked_on_the_stream_of_the_tensors_device(monkeypatch):
    """``is_current_stream_capturing`` asks about the current device: the check runs with
    the tensors' device made current (stubbed here, there is no GPU)."""
    entered, inside = [], []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)
            inside.append(self.device)

        def __exit__(self, *exc):
            inside.pop()
            return False

    capturing = {"now": True}
    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(
        torch.cuda, "is_current_stream_capturing", lambda: capturing["now"] and bool(inside)
    )
    assert head.must_not_sync(torch.device("cuda", 1))
    assert entered == [torch.device("cuda", 1)]
    capturing["now"] = False
    assert not head.must_not_sync(torch.device("cuda", 1))
    assert not head.must_not_sync(torch.device("cpu"))  # nothing to capture on the host
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert head.must_not_sync(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_of_both_losses(monkeypatch):
    """On a GPU: both losses, forward and backward, captured into one CUDA graph with the
    default options (the sync-checks switch of the test suite syncs, so it is unset)."""
    monkeypatch.delenv(terms.SYNC_CHECKS_ENV, raising=False)
    case = head_case(torch.device("cuda"))
    hidden, weight, bias, targets, adv, mask = case
    logits = torch.randn(18, 50, device="cuda").requires_grad_(True)
    flat_targets, flat_adv = targets.reshape(-1), torch.randn(18, device="cuda")
    h = hidden.clone().requires_grad_(True)

    def step(**kw):
        h.grad = logits.grad = None
        loss = fused_linear_gft_loss(h, weight, targets, adv, mask, **kw)
        loss = loss + gft_loss(logits, flat_targets, flat_adv)
        loss.backward()
        return loss.detach()

    want = step()
    want_grads = (h.grad.clone(), logits.grad.clone())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compiles the kernels the capture launches, outside it
            step(compact_tokens=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    h.grad = logits.grad = None
    with torch.cuda.graph(graph):
        got = step()  # compact_tokens=True (the default), turned off by the capture
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, want_grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad, want_grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("mode", ["token-mean", "none"])
def test_compact_tokens_false_is_sync_free_forward_and_backward(backend, mode):
    """``compact_tokens=False`` is the documented sync-free call: the per-token (``none``)
    backward recomputes the head and must follow the forward's choice, not compact again."""
    case = head_case(device_for(backend))
    want = run(backend, case, mode)
    got, syncs = host_syncs(lambda: run(backend, case, mode, compact_tokens=False))
    assert syncs == []
    for name, a, b in zip(("loss", "grad hidden", "grad weight", "grad bias"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
