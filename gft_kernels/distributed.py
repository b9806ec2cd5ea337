"""Helpers for data-parallel training with the GFT loss."""

from __future__ import annotations

from typing import Optional, Union

import torch

from gft_kernels import _checks


def global_num_tokens(
    targets: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    process_group: Optional[object] = None,
    average_over_ranks: bool = True,
    as_tensor: bool = False,
) -> Union[float, torch.Tensor]:
    """``num_tokens`` for ``token-mean`` under data parallelism, with one all-reduce.

    Counts the valid tokens (``mask`` and not ``ignore_index``) of every rank. With
    ``average_over_ranks=True`` (the default, for DDP/FSDP, which average gradients over
    ranks) the count is divided by the world size, so that
    ``gft_loss(..., num_tokens=global_num_tokens(targets, mask))`` on every rank gives,
    after the ranks' gradients are averaged, exactly the gradient of one rank holding the
    whole batch. Pass ``average_over_ranks=False`` when gradients are summed instead.

    Returns a Python float (>= 1 / world size; an all-empty batch counts as 1 token, so
    the loss is 0 rather than 0 / 0), read on the host (one sync). With
    ``as_tensor=True`` it is a 0-dim float64 tensor on the targets' device instead, never
    read on the host: no sync, and under ``torch.compile`` a graph input that changes
    every step without a recompile (a Python float recompiles once, when dynamo first
    sees it change).
    """
    import torch.distributed as dist

    _checks.check_tensor("targets", targets)
    _checks.check_bool("as_tensor", as_tensor)
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets: expected an integer tensor, got {targets.dtype}")
    # Outside the targets' range the comparison below would wrap (int32) and count wrongly.
    _checks.check_ignore_index(ignore_index, targets.dtype)
    valid = targets != ignore_index
    if mask is not None:
        _checks.check_tensor("mask", mask)
        if mask.shape != targets.shape:
            raise ValueError(
                f"mask: expected shape {tuple(targets.shape)}, got {tuple(mask.shape)}"
            )
        valid = valid & mask.bool()
    count = valid.sum().to(torch.float64).reshape(1)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, group=process_group)
        world = dist.get_world_size(process_group)
    total = count.reshape(()).clamp_min(1.0)
    if average_over_ranks:
        total = total / world
    return total if as_tensor else float(total.item())
