"""Group Advantage Learning (GAL): rewards normalised inside their group of responses."""

from __future__ import annotations

from typing import Optional

import torch

from gft_kernels import _checks


def _group_index(
    n: int, group_ids: Optional[torch.Tensor], group_size: Optional[int], device: torch.device
) -> torch.Tensor:
    if (group_ids is None) == (group_size is None):
        raise ValueError(
            "group_ids/group_size: expected exactly one of them, got "
            + ("both" if group_ids is not None else "neither")
        )
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size: expected a positive int, got {type(group_size).__name__}")
        if group_size <= 0 or n % group_size:
            raise ValueError(
                f"group_size: expected a positive divisor of len(rewards)={n}, got {group_size}"
            )
        return torch.arange(n, device=device) // group_size
    group_ids = _checks.check_tensor("group_ids", group_ids)
    if group_ids.dtype.is_floating_point or group_ids.is_complex():
        raise TypeError(f"group_ids: expected an integer tensor, got {group_ids.dtype}")
    if tuple(group_ids.shape) != (n,):
        raise ValueError(f"group_ids: expected shape ({n},), got {tuple(group_ids.shape)}")
    return torch.unique(group_ids.to(device), return_inverse=True)[1]


def group_advantages(
    rewards: torch.Tensor,
    group_ids: Optional[torch.Tensor] = None,
    *,
    group_size: Optional[int] = None,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-response advantages ``A_i = (r_i - mean_g) / (std_g + eps)`` (or ``r_i - mean_g``).

    Args:
        rewards: ``(B,)`` rewards, one per response (any real dtype; integers become fp32).
        group_ids: ``(B,)`` integer group of each response, any order and group sizes.
        group_size: alternatively, groups are contiguous blocks of this many responses.
        norm_by_std: divide by the unbiased group std plus ``eps`` (GRPO); else only centre
            (Dr. GRPO style).
        eps: ``>= 0``, added to the std.

    Returns:
        ``(B,)`` advantages in the rewards' float dtype. As in the GRPO estimator, a group
        of one response uses mean 0 and std 1 (it keeps its raw reward, divided by
        ``1 + eps`` when ``norm_by_std``), and a group whose rewards are all equal gets
        exactly 0. Vectorised: no Python loop over groups.
    """
    rewards = _checks.check_tensor("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected a 1-D tensor (B,), got shape {tuple(rewards.shape)}")
    _checks.check_nonempty("rewards", rewards, "reward")
    if rewards.is_complex() or rewards.dtype == torch.bool:
        raise TypeError(f"rewards: expected a real tensor, got {rewards.dtype}")
    if not rewards.dtype.is_floating_point:
        rewards = rewards.float()
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards: expected finite values, got NaN or inf")
    if not isinstance(norm_by_std, bool):
        raise TypeError(f"norm_by_std: expected a bool, got {type(norm_by_std).__name__}")
    eps = _checks.check_scalar("eps", eps, minimum=0.0, inclusive=True)

    n = rewards.shape[0]
    index = _group_index(n, group_ids, group_size, rewards.device)
    n_groups = int(index.max()) + 1
    acc = torch.float64  # O(B) work: fp64 keeps sums and squares of fp32 rewards in range
    r = rewards.to(acc)
    count = torch.zeros(n_groups, dtype=acc, device=r.device).index_add_(
        0, index, torch.ones_like(r)
    )
    total = torch.zeros_like(count).index_add_(0, index, r)
    mean = total / count
    centred = r - mean[index]
    # Squares of deviations >= ~1.8e19 overflow fp32: square the deviations divided by the
    # group's largest one, and scale the root back.
    spread = torch.zeros_like(count).scatter_reduce(0, index, centred.abs(), "amax")
    spread = torch.where(spread > 0, spread, torch.ones_like(spread))
    unit = centred / spread[index]
    sq = torch.zeros_like(count).index_add_(0, index, unit * unit)
    std = spread * torch.sqrt(sq / (count - 1).clamp_min(1))
    g_max = torch.full_like(count, -float("inf")).scatter_reduce(0, index, r, "amax")
    g_min = torch.full_like(count, float("inf")).scatter_reduce(0, index, r, "amin")

    singleton = count[index] == 1
    mean_i = torch.where(singleton, 0.0, mean[index])
    std_i = torch.where(singleton, 1.0, std[index])
    adv = r - mean_i
    if norm_by_std:
        adv = adv / (std_i + eps)
    # Equal rewards carry no preference: exactly 0, whatever rounding did to the mean.
    equal = (g_max == g_min)[index] & ~singleton
    adv = torch.where(equal, 0.0, adv)
    return adv.to(rewards.dtype)
