"""The ``blockwise`` head strategy: logit tiles formed with ``tl.dot`` and folded into
per-token statistics in registers, so no ``chunk x V`` buffer exists (the chunked head's
one large temporary); see :mod:`gft_kernels._head` for the strategies' contract.

Two passes over the vocabulary: the statistics (one product ``h W^T``), then the per-token
terms on O(N) vectors (the same :func:`~gft_kernels.backends.token_terms.token_terms`
every path uses), then the gradients (the logits recomputed, and the ``dh`` and ``dW``
products). Tokens that carry no loss are dropped first, as in the chunked head.

Two switches:

* ``filter_gradients`` (``head="blockwise"``; ``"blockwise_exact"`` turns it off): for
  16-bit inputs, tiles whose softmax mass cannot matter at the inputs' precision skip the
  gradient products: the skipped part of each row's gradient has an L1 norm below
  ``u |c| scale`` (``u`` the dtype's unit roundoff: 2^-8 bf16, 2^-11 fp16; ``c`` the
  token's coefficient ``w A dcr / T``). fp32 inputs are never filtered.
* deterministic sums: the gradient sums run in a fixed order (no atomics) when
  ``torch.use_deterministic_algorithms(True)`` is on, PyTorch's own switch for kernels
  that sum with atomics (``index_add_``, ``scatter_add_``); otherwise the faster atomic
  form (one recompute of the logits instead of two).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from gft_kernels._head import HeadInputs, HeadOutputs, keep_tokens
from gft_kernels._vocab_parallel import VocabShard, all_reduce
from gft_kernels.backends import RowBackend
from gft_kernels.backends.base import PartialStats, TokenInputs
from gft_kernels.backends.token_terms import (
    GFT_OBJECTIVE,
    ColumnBlock,
    check_token_values,
    combine_partials,
    token_targets,
    token_terms,
)


def filter_eps(dtype: torch.dtype) -> Optional[float]:
    """The softmax mass per row the filter may skip: the unit roundoff of a 16-bit dtype;
    None (no filtering) for fp32."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.finfo(dtype).eps / 2
    return None


def blockwise_head(
    rows: RowBackend,
    inputs: HeadInputs,
    *,
    grad_weights: Optional[torch.Tensor],
    need_grads: Tuple[bool, bool, bool],
    with_stats: bool,
    compact: bool,
    chunk_size: Optional[int],
    shard: Optional[VocabShard],
    filter_gradients: bool = True,
) -> HeadOutputs:
    """The blockwise head (arguments as :func:`gft_kernels._head.chunked_head`'s; ``rows``
    must be the Triton backend; ``chunk_size`` is None: the public function refuses one)."""
    from gft_kernels.backends.triton.blockwise import blockwise_gradients, blockwise_statistics
    from gft_kernels.backends.triton.head_stats import NOT_NEEDED_VALUE

    if rows.name != "triton":
        raise ValueError(
            "head: 'blockwise' runs Triton kernels: expected backend 'triton' (or 'auto' on "
            f"CUDA tensors; CPU tensors need TRITON_INTERPRET=1), got backend {rows.name!r}"
        )
    weight, bias, params = inputs.weight, inputs.bias, inputs.params
    vocab = weight.shape[0] if shard is None else shard.total
    kept = keep_tokens(inputs, grad_weights, compact=compact, with_stats=with_stats, vocab=vocab)
    hidden, weights = kept.hidden, kept.weights

    tokens = TokenInputs(kept.targets, kept.advantages, kept.mask, 1)
    check_token_values(tokens, vocab, params.ignore_index, host=False)
    columns = ColumnBlock.whole(weight.shape[0]) if shard is None else shard
    token = token_targets(tokens, params.ignore_index, columns)
    active = (
        token.valid if with_stats else GFT_OBJECTIVE.carries_loss(token.valid, token.advantages)
    )
    # Without stats only the tokens that carry loss need their statistics; without
    # compaction (sync-free) the others are marked so that their blocks form no tile.
    stats_targets = token.local
    if not with_stats and kept.index is None:
        stats_targets = torch.where(active, token.local, NOT_NEEDED_VALUE)
    part = blockwise_statistics(hidden, weight, bias, stats_targets, params, with_stats)
    if shard is not None:
        reduce = all_reduce(shard.group)
        part = PartialStats(
            *combine_partials(part, params, reduce_max=reduce.max, reduce_sum=reduce.sum)
        )
    loss, logprobs, probs, entropy, scale = token_terms(
        part.row_max,
        part.sum_exp,
        part.sum_exp_1,
        part.weighted,
        part.target_logit,
        active,
        token.advantages,
        params,
    )

    grad_h = grad_w = grad_b = None
    if weights is not None and any(need_grads):
        coef = torch.where(scale != 0, weights.to(scale.dtype) * scale, 0.0)
        coef = coef * params.inv_temperature
        elsewhere = (0, 0)  # the vocabulary's columns and blocks on other ranks
        if shard is not None:
            ranks = torch.distributed.get_world_size(shard.group)
            elsewhere = (shard.total - shard.size, ranks - 1)
        grad_h, grad_w, grad_b = blockwise_gradients(
            hidden,
            weight,
            bias,
            token.local,
            part.row_max,
            part.sum_exp,
            coef,
            params,
            need_grads,
            deterministic=torch.are_deterministic_algorithms_enabled(),
            filter_eps=filter_eps(hidden.dtype) if filter_gradients else None,
            vocab_elsewhere=elsewhere,
        )
        if grad_h is not None and shard is not None:
            torch.distributed.all_reduce(grad_h, group=shard.group)  # dh = sum_r G_r W_r
        grad_h = kept.scatter(grad_h)

    scatter = kept.scatter
    return HeadOutputs(
        scatter(loss), scatter(logprobs), scatter(probs), scatter(entropy), grad_h, grad_w, grad_b
    )
