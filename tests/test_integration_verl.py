"""The verl policy-loss plug-in (mode "gft") through verl 0.9's own loss path.

verl's ``ppo_loss`` (what its actor worker hands the engine) is called once per
micro-batch, with the micro-batches cut by verl's own ``prepare_micro_batches`` and the
global counts set as verl's engine sets them (``batch_num_tokens`` over all ranks,
``dp_size``, ``global_batch_size``). Its summed gradients (averaged over simulated
data-parallel ranks, as DDP/FSDP average them) must equal the full-batch reference: the
published per-token GFT loss (fp64, ``q`` at temperature 1) aggregated by verl's own
``agg_loss`` over the whole mini-batch.
"""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from hydra.errors import InstantiationException
from tensordict import TensorDict
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, agg_loss
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import FSDPActorConfig
from verl.workers.engine.utils import prepare_micro_batches
from verl.workers.utils.losses import ppo_loss

from gft_kernels.integration.verl import (
    VERL_LOSS_AGG_MODES,
    GFTPolicyLossConfig,
    aggregation_weights,
    gft_policy_loss,
    resolve_tau,
)
from gft_kernels.reference import gft_token_terms_reference
from tests import verl_cpu

VOCAB = 11
TAU = 0.3
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [1, 3], [2, 2, 2], [5], [7, 8], [9, 1, 2, 3]]
RESPONSES = [[3, 4, 5, 6], [7, 8], [9, 10, 1, 2, 3], [4], [5, 6, 7], [8, 9, 10, 1, 2], [3], [4, 5]]
# Exact in fp32 (verl keeps advantages in fp32).
ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0, 2.0, -0.25, 0.75], dtype=torch.float64)
RESPONSE_WIDTH = 5


def sequence_logits(seed=0):
    """One fp64 logits leaf per sequence (every position, as a model's head gives)."""
    g = torch.Generator().manual_seed(seed)
    leaves = []
    for p, r in zip(PROMPTS, RESPONSES):
        z = torch.randn(len(p) + len(r), VOCAB, generator=g, dtype=torch.float64) * 3.0
        leaves.append(z.requires_grad_(True))
    return leaves


def full_batch():
    td = verl_cpu.make_batch(
        PROMPTS,
        RESPONSES,
        ADVANTAGES,
        prompt_width=4,
        response_width=RESPONSE_WIDTH,
        extra={"use_dynamic_bsz": False},
    )
    td["row"] = torch.arange(len(PROMPTS))  # which sequences a micro-batch holds
    return td


def model_output(micro_batch, leaves):
    """verl's model output for a micro-batch: nested per-position log-probs of the next
    token (temperature 1), built from the sequences' logits leaves."""
    ids = micro_batch["input_ids"]
    parts = []
    for row, seq in zip(micro_batch["row"].tolist(), ids.unbind()):
        z = leaves[row]
        targets = torch.roll(seq, -1)
        parts.append(torch.log_softmax(z, -1).gather(-1, targets[:, None]).squeeze(-1))
    values = torch.cat(parts)
    return {"log_probs": torch.nested.nested_tensor_from_jagged(values, ids.offsets())}


def reference(mode, leaves):
    """fp64 full-batch loss: published GFT terms, verl's agg_loss over the whole batch."""
    losses = torch.zeros(len(PROMPTS), RESPONSE_WIDTH, dtype=torch.float64)
    mask = torch.zeros(len(PROMPTS), RESPONSE_WIDTH, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        z = leaves[b][len(p) - 1 : len(p) + len(r) - 1]
        terms = gft_token_terms_reference(z, torch.tensor(r), tau=TAU)
        losses[b, : len(r)] = -ADVANTAGES[b] * terms["coef"] * terms["logprobs"]
        mask[b, : len(r)] = True
    return verl_cpu.whole_batch_agg_loss(losses, mask, mode)


def actor_config(mode):
    return FSDPActorConfig(
        strategy="fsdp2",
        rollout_n=1,
        ppo_mini_batch_size=len(PROMPTS),
        ppo_micro_batch_size_per_gpu=1,
        use_dynamic_bsz=False,
        loss_agg_mode=mode,
        policy_loss=GFTPolicyLossConfig(tau=TAU),
    )


def verl_loss_through_micro_batches(mode, leaves, *, dp_size, n_micro):
    """The summed loss of every rank's micro-batches, averaged over ranks, as verl's
    engine + DDP/FSDP would produce its gradient."""
    config = actor_config(mode)
    data = full_batch()
    total_tokens = int(data["loss_mask"].sum())  # verl all-reduces it over the ranks
    per_rank = len(PROMPTS) // dp_size
    total = 0.0
    # verl's dispatch gives each rank a contiguous share; its own chunking cuts them.
    for shard in tu.chunk_tensordict(data, dp_size):
        tu.assign_non_tensor(
            shard,
            batch_num_tokens=total_tokens,
            dp_size=dp_size,
            global_batch_size=len(PROMPTS),
            micro_batch_size_per_gpu=per_rank // n_micro,
        )
        micro_batches, _ = prepare_micro_batches(shard)
        assert len(micro_batches) == n_micro
        for micro in micro_batches:
            loss, metrics = ppo_loss(config, model_output(micro, leaves), micro)
            total = total + loss
    return total / dp_size, metrics


@pytest.mark.parametrize("mode", VERL_LOSS_AGG_MODES)
def test_registered_loss_through_verl_ppo_loss_is_split_invariant(mode):
    assert POLICY_LOSS_REGISTRY["gft"] is gft_policy_loss
    leaves = sequence_logits()
    expected = reference(mode, leaves)
    expected_grads = torch.autograd.grad(expected, leaves)
    scale = max(g.abs().max() for g in expected_grads)
    assert scale > 0
    for dp_size in (1, 2):
        for n_micro in (1, 2, 4):
            if len(PROMPTS) // dp_size < n_micro:
                continue
            loss, metrics = verl_loss_through_micro_batches(
                mode, leaves, dp_size=dp_size, n_micro=n_micro
            )
            grads = torch.autograd.grad(loss, leaves)
            torch.testing.assert_close(loss, expected, rtol=1e-7, atol=1e-12)
            for got, want in zip(grads, expected_grads):
                assert (got - want).abs().max() <= 1e-5 * scale, (mode, dp_size, n_micro)
    assert set(metrics) >= {"actor/gft_rectified_fraction", "actor/ppo_kl", "actor/pg_loss"}


def test_tau_comes_from_the_config():
    leaves = sequence_logits()
    q_all = torch.cat(
        [
            torch.softmax(z[len(p) - 1 : len(p) + len(r) - 1], -1)[range(len(r)), r].detach()
            for z, p, r in zip(leaves, PROMPTS, RESPONSES)
        ]
    )
    assert ((q_all > 0.05) & (q_all <= TAU)).any()  # changing tau changes the coefficients
    loss_tau, _ = verl_loss_through_micro_batches("token-mean", leaves, dp_size=1, n_micro=2)
    config = actor_config("token-mean")
    assert resolve_tau(config) == TAU
    other = FSDPActorConfig(
        strategy="fsdp2",
        rollout_n=1,
        ppo_mini_batch_size=8,
        ppo_micro_batch_size_per_gpu=1,
        policy_loss=GFTPolicyLossConfig(tao=0.05),
    )
    assert resolve_tau(other) == 0.05
    data = full_batch()
    tu.assign_non_tensor(
        data, batch_num_tokens=int(data["loss_mask"].sum()), dp_size=1, global_batch_size=8
    )
    a, _ = ppo_loss(config, model_output(data, leaves), data)
    b, _ = ppo_loss(other, model_output(data, leaves), data)
    torch.testing.assert_close(a, loss_tau)
    assert abs(a.item() - b.item()) > 1e-6


def test_config_from_verl_hydra_overrides():
    """``policy_loss._target_`` selects the subclass; ``tau`` and the fork's ``tao`` work."""
    from hydra import compose, initialize_config_module

    overrides = [
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.actor.policy_loss._target_="
        "gft_kernels.integration.verl.GFTPolicyLossConfig",
        "actor_rollout_ref.actor.policy_loss.loss_mode=gft",
    ]
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        for extra, tau in (
            ("+actor_rollout_ref.actor.policy_loss.tau=0.25", 0.25),
            ("+actor_rollout_ref.actor.policy_loss.tao=0.2", 0.2),
        ):
            cfg = compose(config_name="ppo_trainer", overrides=[*overrides, extra])
            actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
            assert isinstance(actor.policy_loss, GFTPolicyLossConfig)
            assert actor.policy_loss.loss_mode == "gft"
            assert resolve_tau(actor) == tau
        # Without the subclass, verl's strict PolicyLossConfig has no tau.
        cfg = compose(
            config_name="ppo_trainer",
            overrides=[*overrides[:3], "+actor_rollout_ref.actor.policy_loss.tau=0.1"],
        )
        with pytest.raises(InstantiationException, match="unexpected keyword argument 'tau'"):
            omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


@pytest.mark.parametrize("mode", VERL_LOSS_AGG_MODES)
def test_aggregation_weights_equal_verl_agg_loss(mode):
    g = torch.Generator().manual_seed(1)
    losses = torch.randn(5, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 7, generator=g) > 0.4
    mask[3] = False  # a fully masked sequence
    for info in (
        {},  # verl's own-count fallback
        {"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": 9},
        {"dp_size": 1, "batch_num_tokens": 17, "global_batch_size": 5, "loss_scale_factor": 11},
    ):
        w = aggregation_weights(mask, mode, dtype=torch.float64, **info)
        torch.testing.assert_close((w * losses).sum(), agg_loss(losses, mask, mode, **info))
        assert (w[~mask] == 0).all()


def test_defined_zero_no_nan_and_importance_weights():
    B, T = 3, 4
    log_prob = torch.log(torch.full((B, T), 0.5, dtype=torch.float64))
    log_prob[0, 3] = -float("inf")  # masked position
    log_prob[1, 1] = -float("inf")  # valid token with q = 0: c = 0, exactly 0
    log_prob.requires_grad_(True)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3] = False
    adv = torch.ones(B, T, dtype=torch.float64)
    for mode in VERL_LOSS_AGG_MODES:
        loss, metrics = gft_policy_loss(log_prob.detach(), log_prob, adv, mask, mode)
        (grad,) = torch.autograd.grad(loss, [log_prob])
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), mode
        assert grad[1, 1] == 0 and grad[0, 3] == 0, mode
        empty, _ = gft_policy_loss(log_prob.detach(), log_prob, adv, torch.zeros_like(mask), mode)
        assert empty.item() == 0.0, mode
    # q = 0.5 > tau: c = 1, so token-mean is -mean(A * log p) = log 2 over the valid tokens.
    loss, _ = gft_policy_loss(log_prob.detach(), log_prob, adv, mask & ~log_prob.isinf())
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-12)
    w = torch.full((B, T), 2.0, dtype=torch.float64)
    keep = mask & ~log_prob.isinf()
    doubled, _ = gft_policy_loss(log_prob.detach(), log_prob, adv, keep, rollout_is_weights=w)
    torch.testing.assert_close(doubled, 2 * loss)


def test_bad_input():
    lp = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        gft_policy_loss(lp, lp, lp, mask, "sum")
    with pytest.raises(ValueError, match="advantages"):
        gft_policy_loss(lp, lp, lp[:, :2], mask)
    with pytest.raises(ValueError, match="log_prob"):
        gft_policy_loss(lp[0], lp[0], lp[0], mask[0])
    with pytest.raises(ValueError, match="policy_loss.tau"):
        GFTPolicyLossConfig(tau=-0.1)
    with pytest.raises(TypeError, match="policy_loss.tau"):
        GFTPolicyLossConfig(tau="0.1")
    with pytest.raises(ValueError, match="tao"):
        GFTPolicyLossConfig(tau=0.1, tao=0.2)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        aggregation_weights(mask, "token-mean", dp_size=2)
    with pytest.raises(ValueError, match="dp_size"):
        aggregation_weights(mask, "token-sum", dp_size=0)


def run_python(code):
    """Runs ``code`` in a fresh interpreter (the ``tests`` package importable) and returns
    its last line."""
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parent.parent))
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_entry_point_registers_the_loss_at_import_verl():
    """A fresh process: ``import verl`` alone loads the declared ``verl.plugins`` entry."""
    assert (
        run_python(
            """
        import verl
        from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
        print(POLICY_LOSS_REGISTRY["gft"].__module__)
        """
        )
        == "gft_kernels.integration.verl.policy_loss"
    )


def test_integration_package_does_not_import_verl():
    assert (
        run_python(
            """
        import sys
        import gft_kernels.integration
        print("verl" in sys.modules)
        """
        )
        == "False"
    )


def test_fused_engine_selection_registers_for_the_device():
    """``external_lib=gft_kernels.integration.verl.use_fused_engine``: the fused engine wins
    verl's (device, vendor) lookup for FSDP and FSDP2; the value model keeps verl's."""
    assert (
        run_python(
            """
        from tests import verl_cpu  # the CPU platform verl resolves its device from
        from verl.workers.config import HFModelConfig
        from verl.workers.engine import EngineRegistry
        import tempfile
        path = tempfile.mkdtemp()
        verl_cpu.save_tiny_qwen2(path, tied=True)
        HFModelConfig(path=path, load_tokenizer=False,
                      external_lib="gft_kernels.integration.verl.use_fused_engine")
        names = {EngineRegistry.get_engine_cls("language_model", b).__name__
                 for b in ("fsdp", "fsdp2")}
        print(sorted(names))
        """
        )
        == "['GFTFSDPEngine']"
    )


def test_full_batch_fixture_is_verl_layout():
    # The fixture is verl's own layout: nested input ids, padded response fields.
    data = full_batch()
    assert isinstance(data, TensorDict)
    assert data["input_ids"].is_nested
    assert tuple(data["response_mask"].shape) == (len(PROMPTS), RESPONSE_WIDTH)
    assert int(data["response_mask"].sum()) == sum(len(r) for r in RESPONSES)
