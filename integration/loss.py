"""The GFT loss of a padded batch, with the fused head and step-level normalisation.

Only the hidden states that predict response tokens (position ``t - 1`` predicts the token
at ``t``) reach :func:`gft_kernels.fused_linear_gft_loss`, as an ``(N_resp, H)`` matrix:
prompt and padding positions never reach the head and the ``tokens x vocab`` logits never
exist.

Normalisation. Every aggregation mode is a weighted token sum ``sum_t w_t * l_t``; since the
advantages are data (no gradient) and enter the loss linearly, the weight is folded into
each token's advantage and the fused op runs with ``loss_agg_mode="sum"``. The weights come
from a :class:`LossNormalizer`, counted either over the optimizer step (every
gradient-accumulation micro-batch of every rank: the update is then the same for any split
of the step into batch size x accumulation x ranks) or over the micro-batch (the published
GFT code, whose Trainer then averages the micro-batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from gft_kernels import fused_linear_gft_loss
from gft_kernels.aggregation import aggregation_weights

from .heads import LogitTransform

# ``step``: one normalisation for the whole optimizer step (verl's ``batch_num_tokens``);
# ``micro_batch``: each micro-batch is its own mean and the Trainer averages them.
LOSS_NORMALIZATIONS = ("step", "micro_batch")


@dataclass(frozen=True)
class LossNormalizer:
    """The counts a loss is divided by.

    Attributes:
        tokens: response tokens (``token-mean``'s denominator).
        sequences: responses (the ``seq-*`` modes' denominator).
        longest: the longest response (``Tlen`` of ``seq-mean-token-sum-norm`` when
            ``max_response_length`` is not set).
        ranks: data-parallel ranks whose gradients are averaged: each rank's loss is
            multiplied by it, so that the average is the loss over all ranks' tokens.
        per_step: ``seq-mean-token-sum-norm`` divides by ``sequences`` too (verl's
            global-batch form); per micro-batch it is ``sum / Tlen`` as the published code.
    """

    tokens: float
    sequences: float
    longest: float
    ranks: int = 1
    per_step: bool = True

    def to_tensor(self) -> torch.Tensor:
        """The counts as a float64 tensor, to travel inside a batch dict."""
        return torch.tensor(
            [self.tokens, self.sequences, self.longest, float(self.ranks), float(self.per_step)],
            dtype=torch.float64,
        )

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> LossNormalizer:
        tokens, sequences, longest, ranks, per_step = tensor.tolist()
        return cls(tokens, sequences, longest, int(ranks), bool(per_step))


def response_positions(batch: Dict[str, Any]) -> torch.Tensor:
    """``(R, L - 1)`` bool: the input positions whose next token is a trained response token."""
    return batch["response_mask"][:, 1:].bool() & batch["attention_mask"][:, 1:].bool()


def _world() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def reduce_counts(
    tokens: float, sequences: float, longest: float, device: torch.device
) -> Tuple[float, float, float, int]:
    """Sums of ``tokens`` and ``sequences`` and the maximum of ``longest`` over the ranks of
    the default process group (two all-reduces; the values themselves without one)."""
    world = _world()
    if world < 2:
        return tokens, sequences, longest, 1
    dist = torch.distributed
    sums = torch.tensor([tokens, sequences], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    longest_t = torch.tensor([longest], dtype=torch.float64, device=device)
    dist.all_reduce(longest_t, op=dist.ReduceOp.MAX)
    tokens, sequences = sums.tolist()
    return tokens, sequences, float(longest_t.item()), world


def step_normalizer(
    masks: Sequence[torch.Tensor], device: torch.device, *, across_ranks: bool = True
) -> LossNormalizer:
    """Counts over all micro-batches of an optimizer step (``masks``: their
    :func:`response_positions`) and, with ``across_ranks``, over all ranks. Responses with no
    trained token are not counted (they add nothing to any mode)."""
    tokens = sequences = longest = 0.0
    for mask in masks:
        per_row = mask.sum(1)
        tokens += float(per_row.sum())
        sequences += float((per_row > 0).sum())
        longest = max(longest, float(per_row.max()) if per_row.numel() else 0.0)
    ranks = 1
    if across_ranks:
        tokens, sequences, longest, ranks = reduce_counts(tokens, sequences, longest, device)
    return LossNormalizer(tokens, sequences, longest, ranks, per_step=True)


def micro_batch_normalizer(
    mask: torch.Tensor, loss_agg_mode: str, *, across_ranks: bool = True
) -> LossNormalizer:
    """The published code's per-micro-batch counts: ``token-mean`` divides by the micro-batch's
    tokens over all ranks (so DDP's average equals one rank holding the whole micro-batch),
    the ``seq-*`` modes by this rank's rows (every row, as the fused op's ``(B, T)`` form)."""
    per_row = mask.sum(1)
    tokens = float(per_row.sum())
    longest = float(per_row.max()) if per_row.numel() else 0.0
    ranks = 1
    if loss_agg_mode == "token-mean" and across_ranks:
        tokens, _, _, ranks = reduce_counts(tokens, 0.0, 0.0, mask.device)
    return LossNormalizer(tokens, float(mask.shape[0]), longest, ranks, per_step=False)


def normalized_weights(
    mask: torch.Tensor,
    loss_agg_mode: str,
    normalizer: LossNormalizer,
    max_response_length: Optional[int] = None,
) -> torch.Tensor:
    """``(R, L - 1)`` fp32 weights ``w_t`` with ``loss = sum_t w_t * l_t`` (0 off the mask):
    :func:`gft_kernels.aggregation.aggregation_weights` with the counts of ``normalizer``.

    ``token-mean``: ``ranks / tokens``; ``seq-mean-token-sum``: ``ranks / sequences``;
    ``seq-mean-token-mean``: ``ranks / (sequences * n_b)`` (``n_b``: the response's tokens);
    ``seq-mean-token-sum-norm``: ``ranks / (Tlen * sequences)`` (per micro-batch:
    ``1 / Tlen``), ``Tlen = max_response_length`` or ``longest``; ``sum``: ``ranks``.
    """
    sequences = max(normalizer.sequences, 1.0)
    tlen = float(max_response_length) if max_response_length else max(normalizer.longest, 1.0)
    return aggregation_weights(
        mask != 0,
        loss_agg_mode,
        torch.float32,
        tokens=max(normalizer.tokens, 1.0),
        sequences=sequences,
        response_length=tlen,
        ranks=float(normalizer.ranks),
        norm_by_sequences=normalizer.per_step,
    )


def fused_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    batch: Dict[str, Any],
    weights: torch.Tensor,
    *,
    tau: float,
    temperature: float,
    transform: Optional[LogitTransform] = None,
    return_stats: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    head: str = "chunked",
    compute_dtype: Optional[torch.dtype] = None,
    keep_graph_of: Sequence[Optional[torch.Tensor]] = (),
) -> Tuple[torch.Tensor, Any]:
    """``sum_t weights_t * l_t`` over the response tokens of ``hidden`` ``(R, L, H)``.

    ``batch``: ``input_ids`` ``(R, L)``, ``attention_mask``, ``response_mask`` and the
    per-response ``advantages`` ``(R,)``; ``weights``: :func:`normalized_weights` ``(R, L - 1)``.
    ``compute_dtype``: the dtype the head runs in (mixed precision: the autocast dtype, as
    ``lm_head`` would; the fused op accumulates ``dW`` in fp32 and returns an fp32 loss).
    ``keep_graph_of``: tensors that get a zero gradient when no token is trained at all (the
    head's parameters under FSDP, whose ranks must all reduce a gradient for them).

    Returns ``(loss, stats)``: stats (:class:`gft_kernels.GFTStats`, per trained token in
    row-major order) with ``return_stats``, else None.
    """
    mask = response_positions(batch)
    picked = mask.nonzero(as_tuple=True)
    h_in = hidden[:, :-1][picked]
    targets = batch["input_ids"][:, 1:][picked]
    advantages = batch["advantages"].to(torch.float32)
    # Folding the weights into the advantages: l_t = -A_t c_t log p_t is linear in A_t.
    a_in = (advantages[:, None] * weights.to(advantages.device))[picked]

    dtype = compute_dtype or h_in.dtype
    h_in = h_in.to(dtype)
    if weight.dtype != dtype:
        weight = weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if h_in.shape[0] == 0:  # no trained token: a defined 0 that keeps the graph
        loss = hidden.sum() * 0.0
        for tensor in keep_graph_of:
            if tensor is not None and tensor.requires_grad:
                loss = loss + tensor.sum() * 0.0
        return loss, None
    # The fused op manages its own precision; autocast must not re-cast its matmuls.
    with torch.autocast(device_type=h_in.device.type, enabled=False):
        result = fused_linear_gft_loss(
            h_in,
            weight,
            targets,
            a_in,
            bias=bias,
            tau=tau,
            temperature=temperature,
            loss_agg_mode="sum",
            return_stats=return_stats,
            backend=backend,
            chunk_size=chunk_size,
            head=head,
            **(transform.loss_kwargs() if transform is not None else {}),
        )
    return result if return_stats else (result, None)
