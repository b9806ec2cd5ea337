"""Row passes over a vocabulary that may be sharded across ranks (vocab parallelism).

Unsharded, a row pass is the backend's fused ``token_pass``. Vocab-parallel (each rank
holds a contiguous block of vocabulary columns, in rank order, blocks of any size), every
rank summarises its block with ``partial_stats`` and O(N) all-reduces combine the blocks
exactly (``combine_partials``), after which ``token_terms`` gives the per-token quantities
and the gradient needs no communication: each rank writes its own columns
with the global ``M`` and ``S`` (the target's column only on the rank that owns it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from gft_kernels.backends import RowBackend, RowParams, TokenPass
from gft_kernels.backends.token_terms import (
    combine_partials,
    raise_for_flags,
    token_terms,
    value_flags,
)


@dataclass(frozen=True)
class VocabShard:
    """This rank's block ``[offset, offset + size)`` of a ``total``-entry vocabulary."""

    group: object  # torch.distributed.ProcessGroup
    offset: int
    size: int
    total: int


def vocab_shard(process_group, local_size: int, device: torch.device) -> VocabShard:
    """Gather every rank's block size (one small all-gather) and locate this rank's block."""
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "process_group: expected a torch.distributed.ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD) or None, got {type(process_group).__name__}"
        )
    world = dist.get_world_size(process_group)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(
        sizes, torch.tensor([local_size], dtype=torch.long, device=device), group=process_group
    )
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(process_group)
    return VocabShard(process_group, sum(sizes[:rank]), local_size, sum(sizes))


def local_targets(targets: torch.Tensor, valid: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """Column of each valid target in this rank's block, -1 where it lives elsewhere."""
    local = targets.long() - shard.offset
    here = valid & (local >= 0) & (local < shard.size)
    return torch.where(here, local, torch.full_like(local, -1))


def sharded_token_pass(
    backend: RowBackend,
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor],
    params: RowParams,
    *,
    tokens_per_advantage: int,
    with_stats: bool,
    shard: VocabShard,
) -> Tuple[TokenPass, torch.Tensor]:
    """The token pass of a vocab-parallel head; returns it and the local targets that
    :meth:`RowBackend.row_grad` takes for this rank's block."""
    import torch.distributed as dist

    flags = value_flags(
        targets, mask, advantages, tokens_per_advantage, shard.total, params.ignore_index
    )
    if bool(flags.any()):
        raise_for_flags(
            flags.cpu(),
            targets.cpu(),
            None if mask is None else mask.cpu(),
            advantages.cpu(),
            tokens_per_advantage,
            shard.total,
            params.ignore_index,
        )
    valid = targets != params.ignore_index
    if mask is not None:
        valid = valid & (mask != 0)
    adv = advantages
    if tokens_per_advantage > 1:
        adv = adv.repeat_interleave(tokens_per_advantage)
    local = local_targets(targets, valid, shard)
    part = backend.partial_stats(logits, local, params, with_entropy=with_stats)

    def reduce_max(values):
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=shard.group)
        return values

    def reduce_sum(stacked):
        dist.all_reduce(stacked, group=shard.group)
        return stacked

    row_max, sum_exp, sum_exp_1, weighted, target_logit = combine_partials(
        part, params, reduce_max=reduce_max, reduce_sum=reduce_sum
    )
    active = valid if with_stats else valid & (adv != 0)
    loss, logprobs, probs, entropy, scale = token_terms(
        row_max, sum_exp, sum_exp_1, weighted, target_logit, active, adv, params
    )
    result = TokenPass(loss, logprobs, probs, entropy, row_max, sum_exp.contiguous(), scale)
    return result, local
