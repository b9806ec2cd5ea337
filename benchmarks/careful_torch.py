"""The GFT loss written in plain, careful PyTorch: the ``careful`` peer of the benchmarks.

This is how a competent user writes the loss without custom kernels, next to ``naive``
(:mod:`gft_kernels.reference`, a transcription of the published code that clones the
logits and computes a second softmax). Here:

* one ``log_softmax`` over the vocabulary, computed in fp32 without a separate upcast copy
  (``dtype=torch.float32``); at temperature 1 the DCR probability comes from the same
  statistics (``q = exp(log p)``); at other temperatures one extra ``logsumexp`` reads the
  raw logits;
* one ``gather`` for the target log-probabilities; no clone, no second softmax;
* plain autograd for the backward.

For the fused-linear level the tokens go through the head in chunks, each under
``torch.utils.checkpoint``: only one chunk's logits exist at a time, and the backward
recomputes them (one extra ``h W^T`` per chunk, the standard memory-for-compute trade).

Aggregation is ``token-mean`` (the benchmarks' mode). Masked tokens contribute 0.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

# Bytes of fp32 logits per chunk of the fused form: the same budget the library's chunked
# head uses by default (256 MiB on the CPU, 1 GiB on CUDA), so both hold similar chunks.
CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}


def _token_terms(
    logits: torch.Tensor, targets: torch.Tensor, tau: float, temperature: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(log p, c)`` per row of ``logits (M, V)``: log-prob at T (fp32) and DCR coefficient."""
    index = targets.unsqueeze(-1)
    # fp32 at least (bf16/fp16 logits are upcast inside log_softmax, fp64 stays fp64).
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if temperature == 1.0:
        logp = torch.log_softmax(logits, dim=-1, dtype=dtype).gather(-1, index).squeeze(-1)
        q = logp.detach().exp()
    else:
        logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
        logp = logp.gather(-1, index).squeeze(-1)
        raw = logits.detach().to(dtype)
        q = (raw.gather(-1, index).squeeze(-1) - torch.logsumexp(raw, dim=-1)).exp()
    coef = torch.where(q <= tau, q, torch.ones_like(q))
    return logp, coef


def _weighted_sum(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    tau: float,
    temperature: float,
) -> torch.Tensor:
    """``sum_t m_t * (-A_t * c_t * log p_t)`` over the rows of ``logits (M, V)``."""
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    logp, coef = _token_terms(logits, safe, tau, temperature)
    return -(advantages.to(logp.dtype) * coef * logp).masked_fill(~mask, 0.0).sum()


def _token_layout(
    targets: torch.Tensor, advantages: torch.Tensor, mask: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat ``(targets, advantages, mask)``; per-sequence advantages broadcast to tokens."""
    if advantages.dim() == 1 and targets.dim() == 2:
        advantages = advantages.unsqueeze(-1).expand_as(targets)
    mask = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.bool()
    return targets.reshape(-1), advantages.reshape(-1), mask.reshape(-1)


def careful_gft_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    tau: float = 0.1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Token-mean GFT loss of ``logits (N, V)`` or ``(B, T, V)`` (fp32/bf16/fp16).

    ``targets``/``mask`` are shaped like the leading dims; ``advantages`` is per token or
    per sequence ``(B,)``. Returns a scalar in fp32 (fp64 for fp64 logits).
    """
    t, a, m = _token_layout(targets, advantages, mask)
    total = _weighted_sum(logits.reshape(-1, logits.shape[-1]), t, a, m, tau, temperature)
    return total / m.sum().clamp_min(1).to(total.dtype)


def chunk_tokens(vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk of the fused form: the device's budget of fp32 logits."""
    return max(1, CHUNK_BYTES.get(device.type, 256 << 20) // (4 * vocab_size))


def careful_fused_linear_gft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    tau: float = 0.1,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Token-mean GFT loss of the head ``hidden (N, H) or (B, T, H) @ weight (V, H)^T``.

    Chunks of ``chunk_size`` tokens (default :func:`chunk_tokens`), each checkpointed.
    Returns a scalar in fp32 (fp64 for an fp64 head).
    """
    t, a, m = _token_layout(targets, advantages, mask)
    h = hidden.reshape(-1, hidden.shape[-1])
    step = chunk_size or chunk_tokens(weight.shape[0], hidden.device)

    def chunk_loss(h_c, t_c, a_c, m_c):
        return _weighted_sum(h_c @ weight.t(), t_c, a_c, m_c, tau, temperature)

    total = h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
    for start in range(0, h.shape[0], step):
        rows = slice(start, start + step)
        total = total + checkpoint(
            chunk_loss, h[rows], t[rows], a[rows], m[rows], use_reentrant=False
        )
    return total / m.sum().clamp_min(1).to(total.dtype)
