"""Per-source GFT metrics in verl's step log, through verl's own trainer and sampler.

The launch script's configuration builds verl's V1 trainer class (``get_trainer_cls``),
whose constructor loads :class:`GFTReplayBuffer` as its sampler. That sampler then samples
a step's batch with verl's ``ReplayBuffer.sample`` from trajectories written as verl's
agent-loop worker writes them (the hybrid agent loop's outputs, scored, ``as_dict`` plus
the session's fields, ``list_of_dict_to_tensordict``); only TransferQueue's storage is a
stand-in (the real one runs as Ray actors). The metrics go through verl's
``MetricsAggregator`` as the trainer's ``step`` sends them to the tracker.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from verl.trainer.ppo.v1 import get_trainer_cls
from verl.trainer.ppo.v1 import replay_buffer as verl_replay_buffer
from verl.trainer.ppo.v1.utils import MetricsAggregator
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

from gft_kernels.integration.verl import metrics as gft_metrics
from gft_kernels.integration.verl.metrics import GFTReplayBuffer, source_metrics
from tests.test_integration_verl_hybrid import (
    N_SELF,
    PROMPTS,
    FixedServer,
    agent_loop,
    char_tokenizer,
    reward,
    trainer_config,
)
from tests.test_integration_verl_recipe import launch_arguments


def recipe_config(tmp_path, *extra: str):
    """The launch script's configuration (with extra overrides), resolved as verl does."""
    run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    run.mkdir()
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="ppo_trainer", overrides=[*launch_arguments(run)[2:], *extra])
    OmegaConf.resolve(config)
    return config


class StoreTQ:
    """In-memory stand-in for the TransferQueue calls verl's sampler and ours make."""

    def __init__(self) -> None:
        self.partitions: Dict[str, Dict[str, Dict[str, Any]]] = {}
        self.fields: Dict[str, Dict[str, Any]] = {}

    def put(self, partition_id: str, key: str, tag: Dict[str, Any], field=None) -> None:
        self.partitions.setdefault(partition_id, {})[key] = tag
        if field is not None:
            self.fields[key] = field

    def kv_list(self, partition_id: Optional[str] = None):
        if partition_id is not None:
            return {partition_id: dict(self.partitions.get(partition_id, {}))}
        return {p: dict(items) for p, items in self.partitions.items()}

    def kv_clear(self, keys, partition_id: str) -> None:
        for key in [keys] if isinstance(keys, str) else keys:
            self.partitions.get(partition_id, {}).pop(key, None)

    def kv_batch_get(self, keys, partition_id: str, select_fields=None):
        rows = [self.fields[k] for k in keys]
        names = list(rows[0]) if select_fields is None else select_fields
        # TransferQueue drops the names a batch does not hold (metadata.select_fields).
        names = [n for n in names if n in rows[0]]
        return list_of_dict_to_tensordict([{n: row[n] for n in names} for row in rows])


def hybrid_trajectories(scored: bool = True):
    """The hybrid loop's sessions of PROMPTS as verl's agent-loop worker stores them."""
    tokenizer = char_tokenizer()
    n = N_SELF + 2
    server = FixedServer(tokenizer, {p["question"]: p["self"] for p in PROMPTS.values()})
    loop = agent_loop(trainer_config(n), tokenizer, server)
    records = []  # (uid, session, field)
    for uid, row in PROMPTS.items():
        kwargs = {
            "raw_prompt": [{"role": "user", "content": row["question"]}],
            "extra_info": {"gft_responses": row["gft_responses"]},
            "uid": uid,
            "global_steps": 1,
        }
        for i in range(n):
            output = loop.loop.run_until_complete(loop.run({}, session_id=i, **kwargs))
            text = tokenizer.decode(output.response_ids)
            if scored:  # the reward loop's result, as verl's _compute_score sets it
                output.reward_score = reward(text, row["answer"])
                output.extra_fields["reward_extra_info"] = {"acc": output.reward_score}
            field = output.as_dict()
            field.update(kwargs, session_id=i)
            field["loss_mask"] = field["response_mask"]
            records.append((uid, i, field))
    return records


def expected_metrics(records, scored: bool = True) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for source in ("self", "expert", "teacher"):
        rows = [f for _, _, f in records if f["extra_fields"]["gft_source"] == source]
        lengths = [len(f["responses"]) for f in rows]
        out[f"gft/{source}/count"] = float(len(rows))
        if scored:
            out[f"gft/{source}/score/mean"] = sum(float(f["rm_scores"].sum()) for f in rows) / len(
                rows
            )
        out[f"gft/{source}/response_length/mean"] = sum(lengths) / len(lengths)
        out[f"gft/{source}/response_length/max"] = float(max(lengths))
        out[f"gft/{source}/response_length/min"] = float(min(lengths))
    return out


@pytest.fixture(scope="module")
def recipe_trainer(tmp_path_factory):
    """verl's V1 trainer built from the launch script's configuration (no workers)."""
    config = recipe_config(tmp_path_factory.mktemp("recipe"))
    return get_trainer_cls(config.trainer.v1.trainer_mode)(config)


def fill(store: StoreTQ, records, partition_id: str = "train") -> None:
    for uid in PROMPTS:
        store.put(partition_id, uid, {"is_prompt": True, "status": "finished", "global_steps": 1})
    for uid, i, field in records:
        tag = {
            "status": "success",
            "prompt_len": len(field["prompts"]),
            "response_len": len(field["responses"]),
            "global_steps": 1,
            "min_global_steps": None,
            "max_global_steps": None,
        }
        store.put(partition_id, f"{uid}_{i}_0", tag, field)


@pytest.mark.parametrize("scored", [True, False], ids=["streaming-reward", "colocated-reward"])
def test_step_metrics_per_source_from_verls_sampler(recipe_trainer, monkeypatch, scored):
    buffer = recipe_trainer.replay_buffer
    assert isinstance(buffer, GFTReplayBuffer)  # verl's trainer loaded it from the config
    store = StoreTQ()
    monkeypatch.setattr(verl_replay_buffer, "tq", store)
    monkeypatch.setattr(gft_metrics, "tq", store)
    records = hybrid_trajectories(scored)
    fill(store, records)

    batch, metrics = buffer.sample(global_steps=1, partition_id="train", batch_size=len(PROMPTS))
    assert sorted(batch.keys) == sorted(f"{uid}_{i}_0" for uid, i, _ in records)
    expected = expected_metrics(records, scored)
    assert {k: v for k, v in metrics.items() if k.startswith("gft/")} == pytest.approx(expected)
    # See PROMPTS: 3 of 8 self samples are right, 2 of 2 expert and 1 of 2 teacher answers.
    if scored:
        assert expected["gft/self/score/mean"] == 3 / 8
        assert expected["gft/expert/score/mean"] == 1.0
        assert expected["gft/teacher/score/mean"] == 0.5

    # As PPOTrainer.step hands them on: one iteration, or two (parameter_sync_step=2).
    aggregator = MetricsAggregator()
    aggregator.add_step_metrics(dict(metrics), sample_count=len(batch.keys))
    assert aggregator.get_aggregated_metrics() == pytest.approx(metrics)
    other = source_metrics(["self", "expert"], [100, 1], [1.0, 0.0] if scored else None)
    aggregator.add_step_metrics(other, sample_count=2)
    step = aggregator.get_aggregated_metrics()
    assert step["gft/self/response_length/max"] == 100
    assert step["gft/expert/response_length/min"] == 1
    n_self = expected["gft/self/count"]
    mean = (expected["gft/self/response_length/mean"] * len(batch.keys) + 100 * 2) / (
        len(batch.keys) + 2
    )
    assert step["gft/self/response_length/mean"] == pytest.approx(mean)
    assert n_self == 2 * N_SELF


def test_validation_batches_and_untagged_rows_add_nothing(recipe_trainer, monkeypatch):
    store = StoreTQ()
    monkeypatch.setattr(verl_replay_buffer, "tq", store)
    monkeypatch.setattr(gft_metrics, "tq", store)
    fill(store, hybrid_trajectories(), partition_id="val")
    _, metrics = recipe_trainer.replay_buffer.sample(
        global_steps=1, partition_id="val", batch_size=len(PROMPTS)
    )
    assert not [k for k in metrics if k.startswith("gft/")]
    assert source_metrics([None, None], [3, 4], [1.0, 0.0]) == {}
    with pytest.raises(ValueError, match="one length and score per row"):
        source_metrics(["self"], [1, 2])


def test_unsupported_sampler_settings_are_refused_by_verls_trainer(tmp_path):
    dapo = recipe_config(
        tmp_path,
        "algorithm.filter_groups.enable=true",
        "algorithm.filter_groups.metric=acc",
    )
    with pytest.raises(ValueError, match="filter_groups"):
        get_trainer_cls(dapo.trainer.v1.trainer_mode)(dapo)
    refill = recipe_config(tmp_path, "trainer.v1.sampler.sync_refill_failed_groups=true")
    with pytest.raises(ValueError, match="sync_refill_failed_groups"):
        get_trainer_cls(refill.trainer.v1.trainer_mode)(refill)


def test_async_trainer_mode_is_refused():
    kwargs: Dict[str, List[Any]] = {}
    with pytest.raises(ValueError, match="trainer_mode"):
        GFTReplayBuffer(
            trainer_mode="colocate_async",
            trainer_config={},
            max_off_policy_threshold=None,
            max_off_policy_strategy="drop",
            sampler_kwargs=kwargs,
        )


def test_rectified_fraction_reaches_the_step_log():
    """``actor/gft_rectified_fraction`` from verl's registered ``gft`` loss, one value per
    micro-batch as verl's worker collects them (``append_to_dict``), keeps its name and is
    averaged by the V1 trainer's ``_update_actor`` (``rename_dict`` with ``actor/``, then
    ``reduce_metrics``)."""
    import math

    import torch
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.utils.metric import reduce_metrics
    from verl.utils.py_functional import append_to_dict, rename_dict
    from verl.workers.config import FSDPActorConfig

    from gft_kernels.integration.verl import GFTPolicyLossConfig

    config = FSDPActorConfig(
        strategy="fsdp2",
        rollout_n=1,
        ppo_mini_batch_size=2,
        ppo_micro_batch_size_per_gpu=1,
        use_dynamic_bsz=False,
        policy_loss=GFTPolicyLossConfig(tau=0.5),
    )
    loss_fn = get_policy_loss_fn("gft")
    collected: Dict[str, List[Any]] = {}
    # q = 0.25, 0.9, 0.4 (two of three rectified), then 0.8 and a masked 0.1 (none).
    for q, mask in (([0.25, 0.9, 0.4], [1, 1, 1]), ([0.8, 0.1, 0.8], [1, 0, 1])):
        log_prob = torch.tensor([q]).log()
        _, metrics = loss_fn(
            old_log_prob=log_prob,
            log_prob=log_prob.clone().requires_grad_(),
            advantages=torch.ones_like(log_prob),
            response_mask=torch.tensor([mask]),
            loss_agg_mode="token-mean",
            config=config,
        )
        append_to_dict(collected, metrics)
    step = reduce_metrics(rename_dict(collected, "actor/"))
    assert math.isclose(step["actor/gft_rectified_fraction"], (2 / 3 + 0) / 2, rel_tol=1e-6)
    assert not [k for k in step if k.startswith("actor/actor/")]
