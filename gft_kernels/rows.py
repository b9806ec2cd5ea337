"""Row statistics and gradients over a vocabulary that may be sharded across ranks.

Both autograd Functions (logits-level and fused-linear) call these two helpers, so the
single-device path and the vocab-parallel path are the same code. Unsharded, they are
the backend's ``row_stats`` / ``row_grad`` plus an O(N) gather of the target logit.

Vocab-parallel (each rank holds a contiguous block of vocabulary columns, in rank order,
blocks of any size): every rank runs the row kernel on its block, then O(N) all-reduces
combine the partial statistics exactly:

    lse      = M + log sum_r exp(lse_r - M),   M = max_r lse_r      (at T and at 1)
    E_p[x]   = sum_r exp(lse_r - lse) * (lse_r - H_r)                (x = z / T)
    H        = lse - E_p[x]
    z_y      = the one rank that owns y contributes it, the others 0

The gradient then needs no communication: each rank writes its own columns of
``coef * (softmax(z / T) - onehot(y))`` with the global ``lse``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from gft_kernels.backends import RowKernels


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

    world = dist.get_world_size(process_group)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(
        sizes, torch.tensor([local_size], dtype=torch.long, device=device), group=process_group
    )
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(process_group)
    return VocabShard(process_group, sum(sizes[:rank]), local_size, sum(sizes))


@dataclass
class RowStats:
    """Per-row statistics, all ``(N,)`` in the accumulate dtype."""

    lse_t: torch.Tensor
    lse_1: torch.Tensor
    entropy: Optional[torch.Tensor]
    target_logit: torch.Tensor
    local_targets: torch.Tensor  # column of the target in this block (0 where not here)
    target_here: Optional[torch.Tensor]  # bool, None when unsharded (always here)


def _combine_lse(local: torch.Tensor, group) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact logsumexp across ranks of per-rank logsumexps ``(k, N)``; returns (lse, M)."""
    import torch.distributed as dist

    top = local.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    # A block whose entries are all -inf has lse_r = -inf: exp(-inf - M) = 0, and an
    # all -inf row everywhere keeps M = -inf; shifting by 0 then avoids -inf - -inf.
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    sums = torch.exp(local - shift)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return shift + torch.log(sums), shift


def row_statistics(
    kernels: RowKernels,
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    shard: Optional[VocabShard] = None,
    active: Optional[torch.Tensor] = None,
) -> RowStats:
    """Statistics of ``(N, V_local)`` logits; ``targets`` are global vocabulary ids.

    Rows with ``active[i] == False`` are not read (lse = +inf: no loss, no gradient).
    """
    lse_t, lse_1, entropy = kernels.row_stats(logits, temperature, with_entropy, active)
    if shard is None:
        target_logit = logits.gather(1, targets.unsqueeze(1)).squeeze(1).to(lse_t.dtype)
        return RowStats(lse_t, lse_1, entropy, target_logit, targets, None)

    import torch.distributed as dist

    local = targets - shard.offset
    here = (local >= 0) & (local < shard.size)
    local = torch.where(here, local, torch.zeros_like(local))
    target_logit = torch.where(
        here, logits.gather(1, local.unsqueeze(1)).squeeze(1).to(lse_t.dtype), 0.0
    )
    dist.all_reduce(target_logit, group=shard.group)
    combined, _ = _combine_lse(torch.stack([lse_t, lse_1]), shard.group)
    global_t, global_1 = combined[0], combined[1]
    if with_entropy:
        share = torch.exp(lse_t - global_t)
        mean_x = torch.where(share > 0, share * (lse_t - entropy), torch.zeros_like(share))
        dist.all_reduce(mean_x, group=shard.group)
        entropy = global_t - mean_x
    return RowStats(global_t, global_1, entropy, target_logit, local, here)


def row_gradient(
    kernels: RowKernels,
    logits: torch.Tensor,
    stats: RowStats,
    coef: torch.Tensor,
    temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write ``coef * (softmax(z / T) - onehot(y))`` for this block into ``out``.

    ``out`` may alias ``logits``. Rows whose target lives on another rank were given
    column 0 as a stand-in target; their column 0 is rewritten with the exact value,
    computed before the kernel may overwrite the logits.
    """
    if stats.target_here is None:
        return kernels.row_grad(logits, stats.local_targets, stats.lse_t, coef, temperature, out)
    elsewhere = ~stats.target_here
    first = logits[:, 0].to(stats.lse_t.dtype)
    fixed = coef * torch.exp(first / temperature - stats.lse_t)
    kernels.row_grad(logits, stats.local_targets, stats.lse_t, coef, temperature, out)
    out[:, 0] = torch.where(elsewhere, fixed, out[:, 0].to(fixed.dtype)).to(out.dtype)
    return out
