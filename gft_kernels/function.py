"""The autograd Function of the logits-level GFT loss, shared by every backend."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from gft_kernels.backends import RowKernels
from gft_kernels.rows import VocabShard, row_gradient, row_statistics


def token_terms(
    target_logit: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    lse_t: torch.Tensor,
    lse_1: torch.Tensor,
    tau: float,
    temperature: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token GFT quantities from the row statistics, all ``(N,)``, O(N) work.

    Returns ``(loss, logprobs, probs, scale)`` where ``scale = A * c`` on contributing
    tokens and 0 elsewhere, and ``loss = -scale * logprobs`` (0 where ``scale`` is 0, even
    when ``logprobs = -inf``: a rectified token contributes nothing, not NaN).
    """
    # Multiply by 1/T exactly as the row kernels do, so that log p of a certain token
    # (V = 1, or one dominant logit) cancels to 0 instead of leaving a rounding residue.
    logprobs = target_logit * (1.0 / temperature) - lse_t
    probs = torch.exp(target_logit - lse_1)
    # DCR: c = q where q <= tau else 1. It is computed from detached statistics, so it is
    # a constant of the backward pass (the stop-gradient of the formula).
    dcr = torch.where(probs <= tau, probs, torch.ones_like(probs))
    scale = torch.where(valid, advantages * dcr, torch.zeros_like(dcr))
    loss = torch.where(scale != 0, -scale * logprobs, torch.zeros_like(scale))
    return loss, logprobs, probs, scale


class GFTTokenLossFunction(torch.autograd.Function):
    """Per-token GFT losses ``l_t = -A_t c_t log p_t`` of 2-D logits.

    Inputs: ``logits (N, V)`` with a contiguous last dim (this rank's vocabulary block
    when ``shard`` is given), ``targets (N,)`` int64 global ids, ``advantages (N,)`` and
    ``valid (N,)`` bool. Outputs ``(loss, logprobs, probs, entropy)``, each ``(N,)``
    (``entropy`` empty unless requested); only ``loss`` is differentiable. The backward
    writes ``g_t A_t c_t / T * (softmax(z/T) - onehot)``; it saves O(N) statistics and the
    logits themselves, never an ``N x V`` temporary.
    """

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        targets: torch.Tensor,
        advantages: torch.Tensor,
        valid: torch.Tensor,
        tau: float,
        temperature: float,
        kernels: RowKernels,
        with_entropy: bool,
        inplace_backward: bool,
        shard: Optional[VocabShard],
    ):
        # Without stats, rows that can carry no loss (masked, zero advantage) are skipped in
        # the forward too; the backward already skips them (their coefficient is 0).
        active = None if with_entropy else valid & (advantages != 0)
        stats = row_statistics(kernels, logits, targets, temperature, with_entropy, shard, active)
        loss, logprobs, probs, scale = token_terms(
            stats.target_logit, advantages, valid, stats.lse_t, stats.lse_1, tau, temperature
        )
        entropy = stats.entropy if with_entropy else stats.lse_t.new_empty(0)
        stats.entropy = None
        ctx.save_for_backward(logits, scale)
        ctx.stats = stats
        ctx.temperature = temperature
        ctx.kernels = kernels
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(logprobs, probs, entropy)
        return loss, logprobs, probs, entropy

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        logits, scale = ctx.saved_tensors
        coef = grad_loss.to(scale.dtype) * scale / ctx.temperature
        grad = logits if ctx.inplace_backward else torch.empty_like(logits)
        row_gradient(ctx.kernels, logits, ctx.stats, coef, ctx.temperature, grad)
        return (grad,) + (None,) * 9
