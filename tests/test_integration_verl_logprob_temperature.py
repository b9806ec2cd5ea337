"""``policy_loss.logprob_temperature``: log p in the update at a temperature of its own (1 in
the published fork's update), offered by the fused engine and refused by verl's logits path."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_module
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import FSDPActorConfig

from gft_kernels.integration.verl import GFTPolicyLossConfig
from gft_kernels.integration.verl.policy_loss import (
    gft_policy_loss,
    resolve_logprob_temperature,
)

OVERRIDES = [
    "actor_rollout_ref.actor.strategy=fsdp2",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.policy_loss._target_=gft_kernels.integration.verl.GFTPolicyLossConfig",
    "actor_rollout_ref.actor.policy_loss.loss_mode=gft",
]


def actor(**policy_loss):
    return FSDPActorConfig(
        strategy="fsdp2",
        rollout_n=1,
        ppo_mini_batch_size=2,
        ppo_micro_batch_size_per_gpu=1,
        use_dynamic_bsz=False,
        policy_loss=GFTPolicyLossConfig(**policy_loss),
    )


def test_set_by_a_hydra_override_and_unset_by_default():
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        for extra, expected in (
            ([], None),
            (["+actor_rollout_ref.actor.policy_loss.logprob_temperature=1.0"], 1.0),
        ):
            cfg = compose(config_name="ppo_trainer", overrides=[*OVERRIDES, *extra])
            config = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
            assert resolve_logprob_temperature(config) == expected


@pytest.mark.parametrize(
    "value,error,match",
    [
        (0.0, ValueError, r"expected a number in \(0, inf\), got 0.0"),
        (-1.0, ValueError, "got -1.0"),
        (float("inf"), ValueError, "got inf"),
        ("1", TypeError, "got str"),
        (True, TypeError, "got bool"),
    ],
)
def test_bad_values_name_the_option(value, error, match):
    with pytest.raises(error, match=f"policy_loss.logprob_temperature: .*{match}"):
        GFTPolicyLossConfig(logprob_temperature=value)


def test_verl_logits_path_refuses_it():
    """verl computes log p at the rollout temperature before the plug-in sees it: a
    temperature of the update's own would be silently ignored there, so it is refused."""
    log_prob = torch.full((2, 3), -1.0, requires_grad=True)
    args = (torch.zeros(2, 3), log_prob, torch.ones(2, 3), torch.ones(2, 3))
    loss, _ = gft_policy_loss(*args, config=actor(tau=0.1))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="policy_loss.logprob_temperature: only the fused engine"):
        gft_policy_loss(*args, config=actor(tau=0.1, logprob_temperature=1.0))


@pytest.mark.distributed
def test_fused_engine_takes_log_p_at_the_configured_temperature(tmp_path):
    """Rollout temperature 0.7 with ``logprob_temperature=1.0``: the update's loss and
    gradients are the fp64 reference's at temperature 1 (the published fork's update), not
    at 0.7."""
    from tests.test_integration_verl_engine import (
        assert_grads_match,
        make_run,
        reference,
        run_actor_update,
        tiny_model,
    )

    model_path, responses = tiny_model(tmp_path, tied=False)
    steps = [{"mode": "token-mean", "temperature": 0.7, "packed": True}]
    run = make_run(model_path, responses, steps=steps, micro_batch_size=2, logprob_temperature=1.0)
    (result,) = run_actor_update(tmp_path, world=1, **run)
    loss = sum(result["steps"][0]["losses"])
    at_one = reference(model_path, responses, mode="token-mean", temperature=1.0)
    at_rollout = reference(model_path, responses, mode="token-mean", temperature=0.7)
    assert math.isclose(loss, at_one["loss"], rel_tol=1e-5, abs_tol=1e-9)
    assert not math.isclose(loss, at_rollout["loss"], rel_tol=1e-3)
    assert_grads_match(result["steps"][0]["grads"], at_one["grads"])
