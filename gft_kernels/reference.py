"""The naive GFT loss, written the way the published GFT code computes it.

This module is the baseline for tests and benchmarks. It is deliberately literal: it
materialises the logits copy, the tempered log-softmax, a second softmax of the raw
logits and the gathered target values, exactly like the published implementation, and it
aggregates with verl's ``agg_loss`` rules. Never use it as a fast path.

It keeps the reference's behaviour where that behaviour is undefined: an empty mask or a
``0 * inf`` product gives NaN here, and the fast backends define those cases as 0.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["gft_loss_reference", "agg_loss_reference", "gft_token_terms_reference"]


def gft_token_terms_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tau: float = 0.1,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> dict:
    """Per-token quantities of the published formula (no advantage, no aggregation).

    Returns a dict of tensors shaped like ``targets``: ``logprobs`` (log p at
    temperature T, differentiable), ``probs`` (the DCR probability q at temperature 1),
    ``coef`` (the detached DCR coefficient) and ``entropy`` (of softmax(z / T)).
    """
    safe_targets = torch.where(targets == ignore_index, torch.zeros_like(targets), targets)
    scaled = logits.clone() / temperature
    log_probs_all = torch.log_softmax(scaled, dim=-1)
    logprobs = torch.gather(log_probs_all, -1, safe_targets.unsqueeze(-1)).squeeze(-1)
    probs_all = torch.softmax(logits.detach(), dim=-1)
    probs = torch.gather(probs_all, -1, safe_targets.unsqueeze(-1)).squeeze(-1)
    coef = torch.where(probs > tau, torch.ones_like(probs), probs).detach()
    probs_t = torch.softmax(scaled.detach(), dim=-1)
    entropy = -(probs_t * log_probs_all.detach()).sum(-1)
    return {"logprobs": logprobs, "probs": probs, "coef": coef, "entropy": entropy}


def agg_loss_reference(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    *,
    num_tokens: Optional[float] = None,
    max_response_length: Optional[int] = None,
) -> torch.Tensor:
    """verl's aggregation of a per-token loss ``(B, T)`` (or ``(N,)`` for token modes)."""
    loss_mask = loss_mask.to(loss_mat.dtype)
    if loss_agg_mode == "token-mean":
        denom = loss_mask.sum() if num_tokens is None else num_tokens
        return (loss_mat * loss_mask).sum() / denom
    if loss_agg_mode == "seq-mean-token-sum":
        seq_losses = (loss_mat * loss_mask).sum(dim=-1)
        return seq_losses.mean()
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = (loss_mat * loss_mask).sum(dim=-1) / loss_mask.sum(dim=-1)
        return seq_losses.mean()
    if loss_agg_mode == "seq-mean-token-sum-norm":
        tlen = loss_mask.shape[-1] if max_response_length is None else max_response_length
        return (loss_mat * loss_mask).sum() / tlen
    if loss_agg_mode == "sum":
        return (loss_mat * loss_mask).sum()
    if loss_agg_mode == "none":
        return loss_mat * loss_mask
    raise ValueError(f"loss_agg_mode: unknown mode {loss_agg_mode!r}")


def gft_loss_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    tau: float = 0.1,
    temperature: float = 1.0,
    loss_agg_mode: str = "token-mean",
    ignore_index: int = -100,
    num_tokens: Optional[float] = None,
    max_response_length: Optional[int] = None,
) -> torch.Tensor:
    """The naive GFT loss: ``-A * stopgrad(DCR(q)) * log p`` aggregated verl-style.

    Shapes as in :func:`gft_kernels.gft_loss`: logits ``(B, T, V)`` or ``(N, V)``,
    targets ``(B, T)`` / ``(N,)``, advantages ``(B,)`` or shaped like targets.
    Arithmetic happens in the logits' dtype (pass fp64 for a ground truth).
    """
    terms = gft_token_terms_reference(
        logits, targets, tau=tau, temperature=temperature, ignore_index=ignore_index
    )
    if advantages.dim() == 1 and targets.dim() == 2:
        advantages = advantages.unsqueeze(-1).expand_as(targets)
    # Advantages are data: like the published code, no gradient flows into them.
    advantages = advantages.detach().to(terms["logprobs"].dtype)
    pg_losses = -advantages * terms["coef"] * terms["logprobs"]
    loss_mask = targets != ignore_index
    if mask is not None:
        loss_mask = loss_mask & mask.bool()
    return agg_loss_reference(
        pg_losses,
        loss_mask,
        loss_agg_mode,
        num_tokens=num_tokens,
        max_response_length=max_response_length,
    )
