"""Row passes over a vocabulary that may be sharded across ranks (vocab parallelism).

Unsharded, a row pass is the backend's fused ``token_pass``. Vocab-parallel (each rank
holds a contiguous block of vocabulary columns, in rank order, blocks of any size), every
rank summarises its block with ``partial_stats`` and O(N) all-reduces combine the blocks
exactly (``combine_partials``); the per-token terms then follow as on one device
(``token_pass_from_statistics``), and the gradient needs no communication: each rank
writes its own columns with the global ``M`` and ``S`` (the target's column only on the
rank that owns it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from gft_kernels.backends import RowBackend, RowParams, TokenPass
from gft_kernels.backends.base import GradRows, PartialStats, TokenPassCall
from gft_kernels.backends.token_terms import (
    BlockReduce,
    ColumnBlock,
    token_pass_from_statistics,
)


@dataclass(frozen=True)
class VocabShard(ColumnBlock):
    """This rank's block ``[offset, offset + size)`` of a ``total``-entry vocabulary, and
    the process group of the ranks that hold the blocks."""

    group: object  # torch.distributed.ProcessGroup


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
    return VocabShard(sum(sizes[:rank]), local_size, sum(sizes), process_group)


def all_reduce(group: object) -> BlockReduce:
    """Blocks on the ranks of ``group``, combined with O(N) all-reduces."""
    import torch.distributed as dist

    def reduce_max(values: Tensor) -> Tensor:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
        return values

    def reduce_sum(stacked: Tensor) -> Tensor:
        dist.all_reduce(stacked, group=group)
        return stacked

    return BlockReduce(reduce_max, reduce_sum)


class ShardedRows(RowBackend):
    """``backend`` on this rank's block of a vocab-parallel head.

    Its ``token_pass`` takes the global targets, combines the blocks' statistics across
    the ranks and, when asked, writes the gradient of this rank's columns;
    ``partial_stats`` and ``row_grad`` are the backend's, on the block (targets local to
    it). ``local_targets`` holds the latest pass's (``(N,)`` int64, what ``row_grad``
    takes).
    """

    def __init__(self, backend: RowBackend, shard: VocabShard) -> None:
        self.backend, self.shard, self.name = backend, shard, backend.name
        self.local_targets: Optional[Tensor] = None

    def _token_pass(self, call: TokenPassCall) -> TokenPass:
        out, self.local_targets = token_pass_from_statistics(
            self, call, reduce=all_reduce(self.shard.group), columns=self.shard
        )
        return out

    def _partial_stats(
        self, logits: Tensor, local_targets: Tensor, params: RowParams, with_entropy: bool
    ) -> PartialStats:
        return self.backend.partial_stats(logits, local_targets, params, with_entropy=with_entropy)

    def _row_grad(self, logits: Tensor, rows: GradRows, params: RowParams, out: Tensor) -> Tensor:
        summary = (rows.targets, rows.row_max, rows.sum_exp, rows.grad_rows, rows.scale)
        return self.backend.row_grad(logits, *summary, params, out)


def sharded_token_pass(
    backend: RowBackend, *args: Any, shard: VocabShard, **kwargs: Any
) -> Tuple[TokenPass, Tensor]:
    """:meth:`RowBackend.token_pass` (the same arguments, with global targets) on this
    rank's block; returns it and the local targets that ``backend.row_grad`` takes for the
    block."""
    rows = ShardedRows(backend, shard)
    out = rows.token_pass(*args, **kwargs)
    return out, rows.local_targets
