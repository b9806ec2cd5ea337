"""verl_policy_loss against gft_loss_reference on per-token log-probs."""

from types import SimpleNamespace

import pytest
import torch
from helpers import reference_fp64

from gft_kernels.integration import verl_policy_loss, verl_policy_loss_with_metrics
from gft_kernels.integration.verl import resolve_tau

MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm",
         "sum")


def two_class_logits(log_prob: torch.Tensor) -> torch.Tensor:
    """(B, T, 2) logits whose softmax puts exp(log_prob) on class 0: the reference reads
    exactly ``log_prob`` for target 0, and d log_softmax_0 / d log_prob = 1 through both
    logits, so gradients with respect to ``log_prob`` compare too."""
    return torch.stack([log_prob, torch.log1p(-log_prob.exp())], dim=-1)


def make_case(batch=4, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Probabilities on both sides of tau = 0.1 (and of other taus below).
    p = torch.rand(batch, length, generator=g, dtype=torch.float64) * 0.98 + 0.01
    log_prob = p.log()
    old_log_prob = log_prob + 0.05 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    advantages = torch.randn(batch, generator=g, dtype=torch.float64)[:, None].expand(-1, length)
    advantages = advantages + 0.1 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    mask = torch.ones(batch, length, dtype=torch.float64)
    mask[0, 4:] = 0
    mask[2] = 0  # a fully masked sequence: the reference's 0/0 is defined as 0
    return old_log_prob, log_prob, advantages, mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tau", [0.1, 0.0, 0.5, 2.0])
def test_matches_reference_value_and_gradient(mode, tau):
    old_log_prob, log_prob, advantages, mask = make_case()
    lp_verl = log_prob.clone().requires_grad_(True)
    adv = advantages.clone().requires_grad_(True)
    old = old_log_prob.clone().requires_grad_(True)
    pg_loss, clipfrac, ppo_kl, clipfrac_lower = verl_policy_loss(
        old, lp_verl, adv, mask, mode, {"tau": tau}
    )
    lp_ref = log_prob.clone().requires_grad_(True)
    expected = reference_fp64(
        two_class_logits(lp_ref), torch.zeros_like(mask, dtype=torch.long), advantages, mask,
        tau=tau, loss_agg_mode=mode,
    )
    torch.testing.assert_close(pg_loss, expected, rtol=1e-10, atol=1e-12)

    grad_lp, grad_adv, grad_old = torch.autograd.grad(
        pg_loss, [lp_verl, adv, old], allow_unused=True
    )
    (grad_ref,) = torch.autograd.grad(expected, [lp_ref])
    torch.testing.assert_close(grad_lp, grad_ref, rtol=1e-10, atol=1e-12)
    # The gradient flows only through log_prob: c, A and old_log_prob are constants.
    assert grad_adv is None and grad_old is None

    valid = mask.bool()
    q = log_prob.exp()
    share = ((q <= tau) & valid).sum() / valid.sum()
    torch.testing.assert_close(clipfrac, share.to(clipfrac.dtype))
    torch.testing.assert_close(ppo_kl, (old_log_prob - log_prob)[valid].mean())
    assert clipfrac_lower.item() == 0.0


def test_gradient_is_minus_advantage_times_coefficient_over_tokens():
    # token-mean, by hand: dL/dlogp_t = -A_t * c_t / n_valid on valid tokens, 0 elsewhere.
    old_log_prob, log_prob, advantages, mask = make_case()
    log_prob.requires_grad_(True)
    loss, *_ = verl_policy_loss(old_log_prob, log_prob, advantages, mask, "token-mean", None)
    (grad,) = torch.autograd.grad(loss, [log_prob])
    q = log_prob.detach().exp()
    c = torch.where(q > 0.1, 1.0, q)
    expected = -advantages * c * mask / mask.sum()
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_tau_lookup():
    assert resolve_tau(None) == 0.1
    assert resolve_tau({}) == 0.1
    assert resolve_tau({"tau": 0.3}) == 0.3
    assert resolve_tau(SimpleNamespace(tau=0.2)) == 0.2
    assert resolve_tau(SimpleNamespace(tau=None, policy_loss=SimpleNamespace(tau=0.05))) == 0.05
    assert resolve_tau({"policy_loss": {"tau": 0.7}}) == 0.7
    with pytest.raises(ValueError, match="tau"):
        resolve_tau({"tau": -1.0})
    # The default really is what the loss uses: tau=0.1 and no config agree.
    old_log_prob, log_prob, advantages, mask = make_case()
    a = verl_policy_loss(old_log_prob, log_prob, advantages, mask, "token-mean", None)[0]
    b = verl_policy_loss(old_log_prob, log_prob, advantages, mask, "token-mean", {"tau": 0.1})[0]
    c = verl_policy_loss(old_log_prob, log_prob, advantages, mask, "token-mean", {"tau": 0.9})[0]
    assert a.item() == b.item() != c.item()


def test_defined_zero_and_no_nan():
    old_log_prob, log_prob, advantages, mask = make_case()
    log_prob = log_prob.clone()
    log_prob[2, 0] = -float("inf")  # masked position
    log_prob[1, 1] = -float("inf")  # valid token with q = 0: c = 0, contributes exactly 0
    log_prob.requires_grad_(True)
    for mode in MODES:
        loss, *_ = verl_policy_loss(old_log_prob, log_prob, advantages, mask, mode, None)
        (grad,) = torch.autograd.grad(loss, [log_prob])
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), mode
        assert grad[1, 1] == 0 and grad[2].abs().sum() == 0, mode
        empty, *_ = verl_policy_loss(
            old_log_prob, log_prob, advantages, torch.zeros_like(mask), mode, None
        )
        assert empty.item() == 0.0, mode


def test_metrics_variant_and_rollout_weights():
    old_log_prob, log_prob, advantages, mask = make_case()
    loss4 = verl_policy_loss(old_log_prob, log_prob, advantages, mask, "seq-mean-token-mean")
    loss2, metrics = verl_policy_loss_with_metrics(
        old_log_prob, log_prob, advantages, mask, "seq-mean-token-mean"
    )
    assert loss2.item() == loss4[0].item()
    assert metrics["actor/pg_clipfrac"] == pytest.approx(loss4[1].item())
    assert metrics["actor/ppo_kl"] == pytest.approx(loss4[2].item())
    assert set(metrics) >= {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    # Importance weights multiply the per-token loss (verl's rollout correction).
    w = torch.full_like(log_prob, 2.0)
    weighted = verl_policy_loss(old_log_prob, log_prob, advantages, mask, "token-mean",
                                rollout_is_weights=w)[0]
    plain = verl_policy_loss(old_log_prob, log_prob, advantages, mask, "token-mean")[0]
    torch.testing.assert_close(weighted, 2 * plain)


def test_bad_input():
    old_log_prob, log_prob, advantages, mask = make_case()
    with pytest.raises(ValueError, match="loss_agg_mode"):
        verl_policy_loss(old_log_prob, log_prob, advantages, mask, "token-sum")
    with pytest.raises(ValueError, match="advantages"):
        verl_policy_loss(old_log_prob, log_prob, advantages[:, :3], mask)
    with pytest.raises(ValueError, match="log_prob"):
        verl_policy_loss(old_log_prob, log_prob[0], advantages, mask)
