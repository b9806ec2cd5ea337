"""Group advantages against a per-group loop written with torch.mean / torch.std."""

import pytest
import torch

from gft_kernels import group_advantages


def loop_reference(rewards, ids, norm_by_std, eps):
    """The GRPO estimator, one group at a time (the published code's loop)."""
    out = torch.empty_like(rewards, dtype=torch.float64)
    for g in ids.unique():
        sel = ids == g
        r = rewards[sel].double()
        if r.numel() == 1:
            mean, std = torch.tensor(0.0), torch.tensor(1.0)
        else:
            mean, std = r.mean(), r.std()
        out[sel] = (r - mean) / (std + eps) if norm_by_std else r - mean
        if r.numel() > 1 and bool((r == r[0]).all()):
            out[sel] = 0.0
    return out


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_contiguous_groups(norm_by_std):
    rewards = torch.randn(12)
    got = group_advantages(rewards, group_size=4, norm_by_std=norm_by_std)
    ids = torch.arange(12) // 4
    torch.testing.assert_close(got.double(), loop_reference(rewards, ids, norm_by_std, 1e-6))
    assert got.dtype == rewards.dtype


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_arbitrary_group_ids(norm_by_std):
    ids = torch.tensor([7, 3, 7, 3, 3, 9, 7, -2, 3])
    rewards = torch.randn(9, dtype=torch.float64)
    got = group_advantages(rewards, ids, norm_by_std=norm_by_std, eps=1e-4)
    torch.testing.assert_close(got, loop_reference(rewards, ids, norm_by_std, 1e-4))


def test_singleton_group_keeps_raw_reward():
    got = group_advantages(torch.tensor([2.5, 1.0, 3.0]), torch.tensor([0, 1, 1]))
    torch.testing.assert_close(got[0], torch.tensor(2.5 / (1 + 1e-6)))
    no_std = group_advantages(
        torch.tensor([2.5, 1.0, 3.0]), torch.tensor([0, 1, 1]), norm_by_std=False
    )
    assert no_std[0] == 2.5


def test_equal_rewards_give_exact_zero():
    # 0.1 * 3 / 3 != 0.1 in floating point: equal groups must still be exactly 0.
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.7, 0.7])
    got = group_advantages(rewards, torch.tensor([0, 0, 0, 1, 1, 2, 2]))
    assert torch.all(got[:3] == 0) and torch.all(got[5:] == 0)
    assert got[3] > 0 > got[4]


def test_unbiased_std_values():
    # Rewards 0 and 1: mean 0.5, unbiased std sqrt(0.5).
    got = group_advantages(torch.tensor([0.0, 1.0]), group_size=2, eps=0.0)
    torch.testing.assert_close(got, torch.tensor([-0.5, 0.5]) / 0.5**0.5)


def test_integer_rewards_and_no_mutation():
    rewards = torch.tensor([1, 0, 0, 1])
    copy = rewards.clone()
    got = group_advantages(rewards, group_size=2)
    assert got.dtype == torch.float32 and torch.equal(rewards, copy)
