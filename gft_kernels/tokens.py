"""Token-level preparation shared by the logits-level and fused-linear losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from gft_kernels import _checks
from gft_kernels.aggregation import token_weights
from gft_kernels.backends import RowKernels, resolve
from gft_kernels.cpu.torch_rows import accumulate_dtype
from gft_kernels.rows import VocabShard, vocab_shard
from gft_kernels.stats import GFTStats


@dataclass
class TokenBatch:
    """Flattened per-token inputs, all ``(N,)``, checked and ready for a kernel."""

    token_shape: torch.Size
    targets: torch.Tensor  # int64, ignore_index replaced by 0
    advantages: torch.Tensor  # accumulate dtype, per token
    valid: torch.Tensor  # bool: mask and not ignore_index
    weights: torch.Tensor  # aggregation weight w_t (loss = sum w * l); the mask for 'none'
    loss_agg_mode: str
    tau: float
    temperature: float


def check_options(
    *,
    tau: object,
    temperature: object,
    num_tokens: object,
    max_response_length: object,
    return_stats: object,
) -> tuple:
    tau = _checks.check_scalar("tau", tau, minimum=0.0, inclusive=True)
    temperature = _checks.check_scalar("temperature", temperature, minimum=0.0, inclusive=False)
    if num_tokens is not None:
        num_tokens = _checks.check_scalar("num_tokens", num_tokens, minimum=0.0, inclusive=False)
    if max_response_length is not None:
        if isinstance(max_response_length, bool) or not isinstance(max_response_length, int):
            raise TypeError(
                "max_response_length: expected a positive int, got "
                f"{type(max_response_length).__name__}"
            )
        if max_response_length <= 0:
            raise ValueError(
                f"max_response_length: expected a positive int, got {max_response_length}"
            )
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats: expected a bool, got {type(return_stats).__name__}")
    return tau, temperature, num_tokens


def prepare_tokens(
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor],
    *,
    token_shape: torch.Size,
    vocab_size: int,
    device: torch.device,
    acc_dtype: torch.dtype,
    tau: object,
    temperature: object,
    loss_agg_mode: object,
    ignore_index: int,
    num_tokens: object,
    max_response_length: object,
    return_stats: object,
) -> TokenBatch:
    """Check every token-level argument and flatten them (no input is modified)."""
    tau, temperature, num_tokens = check_options(
        tau=tau,
        temperature=temperature,
        num_tokens=num_tokens,
        max_response_length=max_response_length,
        return_stats=return_stats,
    )
    mode = _checks.check_mode(loss_agg_mode, len(token_shape))
    _checks.check_token_inputs(
        targets, advantages, mask, token_shape, vocab_size, ignore_index, device
    )
    valid = targets != ignore_index
    if mask is not None:
        valid = valid & mask.bool()
    weights = token_weights(
        valid, mode, acc_dtype, num_tokens=num_tokens, max_response_length=max_response_length
    )
    if advantages.dim() == 1 and len(token_shape) == 2:
        advantages = advantages.unsqueeze(1).expand(token_shape)
    return TokenBatch(
        token_shape=token_shape,
        targets=torch.where(targets == ignore_index, 0, targets).reshape(-1).long(),
        advantages=advantages.reshape(-1).to(acc_dtype),
        valid=valid.reshape(-1),
        weights=weights.reshape(-1),
        loss_agg_mode=mode,
        tau=tau,
        temperature=temperature,
    )


def prepare_call(
    anchor: torch.Tensor,
    local_vocab: int,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor],
    *,
    backend: object,
    process_group: Optional[object],
    **options: object,
) -> Tuple[RowKernels, Optional[VocabShard], TokenBatch]:
    """Dispatch and token preparation shared by both public losses.

    ``anchor`` is the logits or hidden tensor whose leading dims are the tokens and whose
    device/dtype pick the kernels; ``local_vocab`` is this rank's vocabulary size.
    ``options`` are the loss keywords checked by :func:`prepare_tokens`.
    """
    kernels = resolve(backend, anchor.device, anchor.dtype)
    shard = None
    if process_group is not None:
        shard = vocab_shard(process_group, local_vocab, anchor.device)
    batch = prepare_tokens(
        targets,
        advantages,
        mask,
        token_shape=anchor.shape[:-1],
        vocab_size=local_vocab if shard is None else shard.total,
        device=anchor.device,
        acc_dtype=accumulate_dtype(anchor.dtype),
        **options,
    )
    return kernels, shard, batch


def reduce_loss(token_loss: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Apply the aggregation mode to ``(N,)`` per-token losses (0 on invalid tokens)."""
    if batch.loss_agg_mode == "none":
        return token_loss.reshape(batch.token_shape)
    return (token_loss * batch.weights).sum()


def make_stats(
    batch: TokenBatch, logprobs: torch.Tensor, probs: torch.Tensor, entropy: torch.Tensor
) -> GFTStats:
    rectified = (batch.valid & (probs <= batch.tau)).sum()
    fraction = rectified.to(probs.dtype) / batch.valid.sum().clamp_min(1).to(probs.dtype)
    shape = batch.token_shape
    return GFTStats(
        logprobs=logprobs.detach().reshape(shape),
        probs=probs.detach().reshape(shape),
        entropy=entropy.detach().reshape(shape),
        rectified_fraction=fraction.detach(),
    )
