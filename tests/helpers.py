"""Shared test utilities: the fp64 ground truth, case builders and the tiny decoders' size."""

from __future__ import annotations

import contextlib

import pytest
import torch

from gft_kernels._options import LOSS_AGG_MODES
from gft_kernels.backends import backend_names
from gft_kernels.reference import gft_loss_reference

# Every concrete backend (the registry's names but "auto": a backend registered before the
# tests are collected joins every parametrised test), and every aggregation mode.
BACKENDS = tuple(b for b in backend_names() if b != "auto")
CPU = torch.device("cpu")
MODES = LOSS_AGG_MODES
# The layers of every tiny Hugging Face decoder the integration tests build (Llama, Gemma 2,
# Cohere, Granite, Qwen2): small enough to train on the CPU within a test, with 4 query heads
# sharing 2 key-value heads (grouped-query attention).
TINY_DECODER_LAYERS = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def device_for(backend: str) -> torch.device:
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def make_case(
    batch: int = 3,
    seq: int = 5,
    vocab: int = 37,
    *,
    per_token_adv: bool = False,
    dtype: torch.dtype = torch.float32,
    masked_sequence: bool = True,
    ignored_tokens: bool = True,
    scale: float = 2.0,
    device: torch.device = CPU,
):
    """Random (B, T, V) logits with padding: one fully masked sequence, ignore_index tokens."""
    logits = (torch.randn(batch, seq, vocab, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, seq)
    if seq > 1:
        mask[0, -1] = 0
    if masked_sequence and batch > 1:
        mask[-1] = 0
    if ignored_tokens and seq > 2:
        targets[0, 1] = -100
    adv = torch.randn(batch, seq) if per_token_adv else torch.randn(batch)
    to = dict(device=device)
    return logits.to(**to), targets.to(**to), adv.to(**to), mask.to(**to)


def reference_fp64(logits, targets, advantages, mask, *, ignore_index=-100, **kw):
    """fp64 reference with the library's definition where the naive formula is 0/0.

    ``seq-mean-token-mean`` divides each sequence by its token count, which is 0 for a
    fully masked sequence; the library defines such a sequence to add 0 (B unchanged), so it is
    dropped from the reference and the result rescaled by kept/B. ``token-mean`` of an
    empty batch is defined as 0. Returns the loss; its backward reaches ``logits``.
    """
    mode = kw.get("loss_agg_mode", "token-mean")
    valid = targets != ignore_index
    if mask is not None:
        valid = valid & mask.bool()
    x = logits.double()
    adv = advantages.double()
    if mode == "seq-mean-token-mean":
        keep = valid.any(-1)
        if not bool(keep.any()):
            return (x * 0).sum()
        adv_kept = adv[keep] if adv.dim() == 2 else adv[keep]
        loss = gft_loss_reference(
            x[keep],
            targets[keep],
            adv_kept,
            None if mask is None else mask[keep],
            ignore_index=ignore_index,
            **kw,
        )
        return loss * keep.sum() / keep.numel()
    if mode == "token-mean" and kw.get("num_tokens") is None and not bool(valid.any()):
        return (x * 0).sum()
    return gft_loss_reference(x, targets, adv, mask, ignore_index=ignore_index, **kw)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, what: str
):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


TOLERANCES = {
    # loss (rtol, atol), grad (rtol, atol relative to max |grad|)
    torch.float64: ((1e-10, 1e-12), (1e-10, 1e-12)),
    # The gradient entry of a target with p ~ 1 is coef * (p - 1): fp32 cancellation there
    # costs ~1e-7 absolute per unit of coef, hence atol relative to the largest entry.
    torch.float32: ((2e-5, 1e-6), (1e-4, 2e-5)),
    # Reduced precision: the loss is computed in fp32 from the same rounded inputs, so it
    # stays tight; the gradient is stored in the input dtype (8 or 11 mantissa bits).
    torch.bfloat16: ((1e-4, 1e-5), (1e-2, 1e-2)),
    torch.float16: ((1e-4, 1e-5), (2e-3, 2e-3)),
}


def check_against_reference(backend, logits, targets, adv, mask, **kw):
    """Run gft_loss and the fp64 reference; compare loss and logits gradient."""
    from gft_kernels import gft_loss

    (loss_rtol, loss_atol), (grad_rtol, grad_atol) = TOLERANCES[logits.dtype]
    x = logits.clone().requires_grad_(True)
    loss = gft_loss(x, targets, adv, mask, backend=backend, **kw)
    upstream = torch.randn_like(loss, dtype=torch.float32) if loss.dim() else None
    (loss * upstream).sum().backward() if upstream is not None else loss.backward()

    x_ref = logits.detach().cpu().double().requires_grad_(True)
    ref = reference_fp64(
        x_ref, targets.cpu(), adv.cpu(), None if mask is None else mask.cpu(), **kw
    )
    weight = (
        upstream.cpu().double() if upstream is not None else torch.ones((), dtype=torch.float64)
    )
    (ref * weight).sum().backward()
    grad_ref = x_ref.grad
    # log p = z_y / T - lse carries an fp32 rounding of ~eps * |lse| per token; every
    # aggregation weight is <= 1, so the loss error is at most that times sum_t |A_t|.
    temperature = kw.get("temperature", 1.0)
    finite = logits.detach().float().abs()
    lse_bound = 1.0 + finite[torch.isfinite(finite)].max().item() / temperature
    eps32 = torch.finfo(torch.float32).eps
    adv_sum = (
        adv.abs().expand_as(targets.T).sum().item()
        if adv.dim() == 1 and targets.dim() == 2
        else adv.abs().sum().item()
    )
    if logits.dtype != torch.float64:
        loss_atol = max(loss_atol, 2 * eps32 * lse_bound * adv_sum)
    assert_close(loss, ref, rtol=loss_rtol, atol=loss_atol, what="loss")
    scale = max(grad_ref.abs().max().item(), 1e-30)
    atol = grad_atol * scale
    if logits.dtype != torch.float64:
        # Each row's softmax is exp(z / T - lse) with lse stored in fp32, so every entry
        # carries a relative error ~ eps * |lse| times the row's coefficient |g A c w / T|;
        # where p ~ 1 the entry coef * (p - 1) is tiny and that error dominates. Bound the
        # coefficient by max|A| * max|g| / T (every aggregation weight is <= 1).
        g_max = upstream.abs().max().item() if upstream is not None else 1.0
        coef_max = adv.abs().max().item() * g_max / temperature
        atol = max(atol, 2 * eps32 * lse_bound * coef_max)
    # fp16 cannot hold gradient entries below its subnormal spacing 2^-24: they flush to 0.
    if logits.dtype == torch.float16:
        atol += 2.0**-24
    assert x.grad.dtype == logits.dtype
    assert_close(x.grad, grad_ref, rtol=grad_rtol, atol=atol, what="grad")
    return loss, x.grad


@contextlib.contextmanager
def backend_variant(name: str):
    """The public backend name of a row-backend variant, with the variant switched on:
    ``cpu-simd``/``cpu-scalar`` (the native kernel's AVX2 or scalar loops, for CPUs without
    AVX2) and ``triton-split`` (each row's columns split across programs, as on a large GPU
    with few rows); any other name is itself."""
    if name.startswith("cpu-"):
        from gft_kernels.backends import cpu_rows

        module = cpu_rows.require()
        previous = module.set_simd_enabled(name == "cpu-simd")
        try:
            yield "cpu"
        finally:
            module.set_simd_enabled(previous)
    elif name == "triton-split":
        from gft_kernels.backends.triton import launch

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(launch, "MIN_PROGRAMS", 64)
            patch.setattr(launch, "MIN_SEGMENT_BLOCKS", 1)
            patch.setattr(launch, "MAX_BLOCK", {4: 64, 2: 64})
            yield "triton"
    else:
        yield name


def run_entry(entry: str, backend: str, leaves: dict, targets, adv, mask=None, **kw):
    """``(loss, {leaf: grad}, stats or None)`` of one entry point, the backward included.

    ``entry``: ``gft_loss`` or ``gft_loss-stats`` on ``leaves["z"]``; ``fused``,
    ``fused-stats`` or ``fused-full`` (no token compaction) on ``leaves["h"]``,
    ``leaves["w"]`` and, when present, ``leaves["b"]``. ``kw`` goes to the loss.
    """
    from gft_kernels import fused_linear_gft_loss, gft_loss

    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    if entry.startswith("gft_loss"):
        out = gft_loss(
            leaves["z"],
            targets,
            adv,
            mask,
            backend=backend,
            return_stats=entry.endswith("stats"),
            **kw,
        )
    else:
        out = fused_linear_gft_loss(
            leaves["h"],
            leaves["w"],
            targets,
            adv,
            mask,
            bias=leaves.get("b"),
            backend=backend,
            return_stats=entry == "fused-stats",
            compact_tokens=entry != "fused-full",
            **kw,
        )
    loss, stats = out if isinstance(out, tuple) else (out, None)
    loss.backward()
    return loss.detach().cpu(), {k: v.grad.cpu() for k, v in leaves.items()}, stats


def assert_all_close(ours, ref, rtol, atol):
    """The fused head's ``(loss, dh, dW, db)`` against the fp64 ``ref`` (None: not
    computed, skipped); ``atol`` relative to each reference's largest magnitude."""
    names = ("loss", "hidden grad", "weight grad", "bias grad")
    for name, got, want in zip(names, ours, ref):
        if got is None:
            continue
        scale = max(want.abs().max().item(), 1e-12)
        torch.testing.assert_close(
            got.detach().cpu().double(),
            want,
            rtol=rtol,
            atol=atol * scale,
            msg=lambda m, n=name: f"{n}: {m}",
        )
