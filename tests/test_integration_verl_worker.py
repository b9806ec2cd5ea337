"""The fused GFT engine inside verl's own ``ActorRolloutRefWorker`` (CPU, gloo, no Ray).

The engine tests build verl's engine directly; this module drives the worker verl's
trainer talks to (``verl.workers.engine_workers.ActorRolloutRefWorker``, the one that
builds its actor through ``EngineRegistry``), configured the way the trainer configures
it: verl's Hydra ``ppo_trainer`` config with command-line style overrides, the fused engine
selected by ``actor_rollout_ref.model.external_lib`` and the loss by
``policy_loss.loss_mode=gft``. Batches are built as verl's legacy trainer builds them
(a ``DataProto`` with left-padded prompts and right-padded responses, converted by
``to_tensordict`` and ``left_right_2_no_padding``, the trainer's metadata attached).

Each rank runs in a spawned process (verl's platform and process group are process-wide)
and saves what the worker returned; the checks run here against fp64 references from the
same checkpoint: log-probs from a plain Hugging Face forward, the update from the
project's fp64 GFT terms (``gft_kernels.reference``) aggregated by verl's ``agg_loss``,
differentiated by autograd, clipped as the config says and stepped with the config's
AdamW.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict

import pytest
import torch
import torch.multiprocessing as mp

from tests import verl_cpu
from tests.test_integration_verl_engine import (
    ADVANTAGES,
    PROMPTS,
    TAU,
    assert_grads_match,
    reference,
    tiny_model,
)

pytestmark = pytest.mark.distributed

ROLLOUT_TEMPERATURE = 0.7
LR = 1e-3  # large enough that the step, weight decay included, shows in fp32 weights
MICRO_BATCH = 2
PROMPT_WIDTH = 4


def trainer_overrides(model_path: str) -> list:
    """What a user passes to verl's trainer for GFT with the fused engine, plus what this
    CPU test needs (no flash-attention, a model folder without a tokenizer, fp32)."""
    return [
        f"actor_rollout_ref.model.path={model_path}",
        # the fused engine and the GFT loss, as docs/verl.md tells users
        "actor_rollout_ref.model.external_lib=gft_kernels.integration.verl.use_fused_engine",
        "actor_rollout_ref.actor.policy_loss._target_="
        "gft_kernels.integration.verl.GFTPolicyLossConfig",
        "actor_rollout_ref.actor.policy_loss.loss_mode=gft",
        f"+actor_rollout_ref.actor.policy_loss.tau={TAU}",
        "actor_rollout_ref.actor.strategy=fsdp2",
        f"actor_rollout_ref.actor.optim.lr={LR}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={len(PROMPTS)}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={MICRO_BATCH}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={MICRO_BATCH}",
        "actor_rollout_ref.rollout.n=1",
        f"actor_rollout_ref.rollout.temperature={ROLLOUT_TEMPERATURE}",
        # CPU: sdpa (flash-attention is CUDA-only), fp32 compute instead of bf16 mixed
        # precision (an exact comparison), no torch.compile (slow to start on CPU)
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "+actor_rollout_ref.model.load_tokenizer=false",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.reduce_dtype=fp32",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.buffer_dtype=fp32",
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=false",
        "actor_rollout_ref.actor.use_torch_compile=false",
    ]


def trainer_config(model_path: str):
    """The trainer's config tree: verl's ``ppo_trainer`` composed and resolved, as its
    ``main_ppo`` does before it hands ``config.actor_rollout_ref`` to the workers."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="ppo_trainer", overrides=trainer_overrides(model_path))
    OmegaConf.resolve(config)
    return config


def trainer_batch(responses: list, *, old_log_probs=None):
    """The batch verl's legacy trainer hands the worker: a ``DataProto`` (left-padded
    prompts, right-padded responses, ``uid``; the rollout temperature and per-sequence
    token counts in ``meta_info``), converted by verl's own code."""
    import numpy as np
    from verl import DataProto
    from verl.workers.utils.padding import left_right_2_no_padding

    batch, width = len(PROMPTS), max(len(r) for r in responses)
    prompts = torch.zeros(batch, PROMPT_WIDTH, dtype=torch.long)
    response_ids = torch.zeros(batch, width, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompts)
    response_mask = torch.zeros_like(response_ids)
    for i, (p, r) in enumerate(zip(PROMPTS, responses)):
        prompts[i, PROMPT_WIDTH - len(p) :] = torch.tensor(p)
        prompt_mask[i, PROMPT_WIDTH - len(p) :] = 1
        response_ids[i, : len(r)] = torch.tensor(r)
        response_mask[i, : len(r)] = 1
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    tensors = {
        "prompts": prompts,
        "responses": response_ids,
        "input_ids": torch.cat([prompts, response_ids], dim=1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(1) - 1).clamp_min(0),
        "response_mask": response_mask,
    }
    if old_log_probs is not None:  # the update's batch: GRPO advantages, old log-probs
        tensors["advantages"] = (ADVANTAGES[:, None] * response_mask).float()
        tensors["old_log_probs"] = old_log_probs.float()
    data = DataProto.from_dict(
        tensors=tensors,
        non_tensors={"uid": np.array([str(i) for i in range(batch)], dtype=object)},
        meta_info={
            "temperature": ROLLOUT_TEMPERATURE,
            "global_token_num": attention_mask.sum(-1).tolist(),
        },
    )
    return left_right_2_no_padding(data.to_tensordict())


def dispatch(batch, rank: int, world: int):
    """This rank's share of a batch, as verl's data-parallel dispatch delivers it: chunked
    by verl's ``BatchData``, then serialized (Ray's object store hands each worker its own
    unlocked copy; the chunk itself is a locked view the worker cannot annotate)."""
    import pickle

    from verl.protocol import BatchData

    return pickle.loads(pickle.dumps(BatchData(batch).chunk(chunks=world)[rank]))


def compute_log_prob(worker, batch, rank: int, world: int):
    """``_compute_old_log_prob``'s call: entropy on, no loss; this rank's share of the
    batch (verl's dispatch chunks it by data-parallel rank). Returns log-probs and entropy
    of the share, padded back by verl's ``no_padding_2_padding``."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    tu.assign_non_tensor(batch, calculate_entropy=True, compute_loss=False)
    share = dispatch(batch, rank, world)
    out = worker.compute_log_prob(share)
    return {
        key: no_padding_2_padding(tu.get(out, key), share).float()
        for key in ("log_probs", "entropy")
    }


def update_actor(worker, batch, config, rank: int, world: int) -> Dict[str, Any]:
    """``_update_actor``'s call (the metadata the legacy trainer attaches); returns the
    metrics the worker reports."""
    from verl.utils import tensordict_utils as tu

    actor = config.actor_rollout_ref.actor
    mini_batch = actor.ppo_mini_batch_size * config.actor_rollout_ref.rollout.n
    tu.assign_non_tensor(
        batch,
        calculate_entropy=actor.calculate_entropy or actor.entropy_coeff != 0.0,
        distillation_use_topk=False,
        distillation_only=False,
        global_batch_size=mini_batch,
        mini_batch_size=mini_batch,
        epochs=actor.ppo_epochs,
        seed=actor.data_loader_seed,
        dataloader_kwargs={"shuffle": actor.shuffle},
        compute_loss=True,
    )
    out = worker.update_actor(dispatch(batch, rank, world))
    return dict(tu.get(out, "metrics"))


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A plain copy of an FSDP2 (DTensor) parameter or optimizer state (a collective)."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().clone()


def actor_state(worker) -> Dict[str, Any]:
    """Parameters and AdamW state by parameter name, and the learning-rate schedule."""
    engine = worker.actor.engine
    params, optim = {}, {}
    for name, param in engine.module.named_parameters():
        params[name] = full(param)
        state = engine.optimizer.state.get(param, {})
        optim[name] = {k: full(v) if torch.is_tensor(v) else v for k, v in state.items()}
    return {
        "params": params,
        "optim": optim,
        "param_group": {k: v for k, v in engine.optimizer.param_groups[0].items() if k != "params"},
        "lr_scheduler": engine.lr_scheduler.state_dict(),
    }


def new_worker(config):
    """``ActorRolloutRefWorker`` as the trainer builds it for an actor without rollout
    (``role="actor"``: the rollout engine needs vLLM or SGLang), then ``init_model``."""
    from verl.workers.engine_workers import ActorRolloutRefWorker

    worker = ActorRolloutRefWorker(config=config.actor_rollout_ref, role="actor")
    worker.init_model()
    return worker


def worker_run(rank: int, world: int, port: int, job: Dict[str, Any], out_dir: str) -> None:
    """One rank: init, log-probs, one update, checkpoint, a fresh worker loaded from it."""
    verl_cpu.init_process_group(rank, world, port)
    torch.set_num_threads(1)
    verl_cpu.skip_trl_value_head_patch()
    import torch.distributed as dist

    config = trainer_config(job["model_path"])
    worker = new_worker(config)
    result: Dict[str, Any] = {"engine": type(worker.actor.engine).__name__}
    result["before"] = actor_state(worker)
    result["log_prob"] = compute_log_prob(worker, trainer_batch(job["responses"]), rank, world)

    # The update's old log-probs are the worker's own, as in the trainer; GFT does not
    # use them (only the ppo_kl metric does).
    old = torch.zeros(len(PROMPTS), max(len(r) for r in job["responses"]))
    share = slice(rank * len(PROMPTS) // world, (rank + 1) * len(PROMPTS) // world)
    old[share] = result["log_prob"]["log_probs"]
    batch = trainer_batch(job["responses"], old_log_probs=old)
    result["metrics"] = update_actor(worker, batch, config, rank, world)
    result["after"] = actor_state(worker)
    result["log_prob_after"] = compute_log_prob(
        worker, trainer_batch(job["responses"]), rank, world
    )

    checkpoint = os.path.join(job["checkpoint_dir"], "global_step_1", "actor")
    worker.save_checkpoint(checkpoint, None, 1, None)
    result["rng_saved"] = torch.get_rng_state()
    torch.rand(100)  # move the generator on: loading must bring the saved state back

    fresh = new_worker(config)
    result["fresh_before_load"] = actor_state(fresh)["params"]
    fresh.load_checkpoint(checkpoint)
    result["rng_loaded"] = torch.get_rng_state()
    result["fresh"] = actor_state(fresh)
    result["fresh_log_prob"] = compute_log_prob(fresh, trainer_batch(job["responses"]), rank, world)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_workers(tmp_path, world: int, model_path: str, responses: list) -> list:
    out = tmp_path / f"out{world}"
    out.mkdir()
    job = {
        "model_path": model_path,
        "responses": responses,
        "checkpoint_dir": str(tmp_path / f"checkpoints{world}"),
    }
    port = verl_cpu.free_port()
    mp.spawn(worker_run, args=(world, port, job, str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def clipped(grads: Dict[str, torch.Tensor], max_norm: float):
    """The gradient after ``clip_grad_norm_`` (torch's rule, which verl's FSDP2 engine
    applies), and the norm before clipping."""
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    coef = min(1.0, max_norm / (norm.item() + 1e-6))
    return {name: g * coef for name, g in grads.items()}, norm.item()


def check_update(result, config, ref) -> None:
    """One AdamW step from zero state: its moments are the clipped fp64 gradient (exact),
    and the weights moved by AdamW's rule with the configured hyperparameters."""
    optim_config = config.actor_rollout_ref.actor.optim
    group = result["after"]["param_group"]
    assert group["lr"] == pytest.approx(optim_config.lr) and optim_config.lr == LR
    assert group["weight_decay"] == pytest.approx(optim_config.weight_decay)
    assert optim_config.weight_decay > 0  # verl's default: the decay term is checked too
    assert tuple(group["betas"]) == pytest.approx(tuple(optim_config.betas))
    beta1, beta2 = group["betas"]
    grads, norm = clipped(ref["grads"], optim_config.clip_grad)
    assert norm > optim_config.clip_grad  # the clipping branch is the one exercised

    metrics = result["metrics"]
    assert math.isclose(metrics["grad_norm"][0], norm, rel_tol=1e-5)
    assert math.isclose(metrics["loss"][0], ref["loss"], rel_tol=1e-5, abs_tol=1e-9)
    assert metrics["lr"] == [pytest.approx(LR)]

    # After one step from zero, bias-corrected: m = g and v = g * g of the clipped gradient.
    optim = result["after"]["optim"]
    m = {n: s["exp_avg"].double() / (1 - beta1) for n, s in optim.items()}
    v = {n: s["exp_avg_sq"].double() / (1 - beta2) for n, s in optim.items()}
    assert_grads_match(m, grads)
    assert_grads_match(v, {n: g * g for n, g in grads.items()})
    for name, before in result["before"]["params"].items():
        assert float(optim[name]["step"]) == 1.0, name
        # AdamW's first step: decoupled weight decay, then lr * m / (sqrt(v) + eps).
        theta = before.double()
        expected = theta * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * m[name] / (
            v[name].sqrt() + group["eps"]
        )
        torch.testing.assert_close(
            result["after"]["params"][name].double(), expected, rtol=1e-6, atol=1e-8
        )


def check_checkpoint(result) -> None:
    """The fresh worker, loaded, holds the saved weights, AdamW state, schedule and RNG,
    and computes the same log-probs as the worker that saved."""
    after, fresh = result["after"], result["fresh"]
    initial = result["fresh_before_load"]
    # The update moved the weights, so loading has something to restore.
    assert any(not torch.equal(p, initial[n]) for n, p in after["params"].items())
    for name, param in after["params"].items():
        assert torch.equal(fresh["params"][name], param), name
        for key, value in after["optim"][name].items():
            got = fresh["optim"][name][key]
            assert torch.equal(torch.as_tensor(got), torch.as_tensor(value)), (name, key)
    assert fresh["lr_scheduler"] == after["lr_scheduler"]
    assert torch.equal(result["rng_loaded"], result["rng_saved"])
    for key in ("log_probs", "entropy"):
        assert torch.equal(result["fresh_log_prob"][key], result["log_prob_after"][key])


def check_log_probs(results, responses, ref) -> None:
    """verl's log-probs and entropy (rollout temperature) equal the fp64 forward's."""
    for field, expected in (("log_probs", ref["logprobs"]), ("entropy", ref["entropy"])):
        got = torch.cat([r["log_prob"][field] for r in results])  # the ranks' shares, in order
        for b, response in enumerate(responses):
            torch.testing.assert_close(
                got[b, : len(response)].double(), expected[b], rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize(
    "world,tied",
    [(1, False), (2, True)],
    ids=["one-rank-untied-head", "two-ranks-tied-head"],
)
def test_worker_log_prob_update_and_checkpoint(tmp_path, world, tied):
    """The worker's actor lifecycle: init, ``compute_log_prob``, ``update_actor`` (one
    mini-batch of 4, micro-batches of 2: two on one rank, one on each of two), checkpoint
    save, and a fresh worker loaded from it. Two ranks also shard the weights, the AdamW
    state and the checkpoint, and reduce the gradient across ranks."""
    model_path, responses = tiny_model(tmp_path, tied=tied)
    results = run_workers(tmp_path, world, model_path, responses)
    assert all(r["engine"] == "GFTFSDPEngine" for r in results)
    config = trainer_config(model_path)
    ref = reference(model_path, responses, mode="token-mean", temperature=ROLLOUT_TEMPERATURE)
    assert 0 < ref["rectified"] < 1  # tau splits the tokens: both branches of c are used

    check_log_probs(results, responses, ref)
    for result in results:  # every rank holds the same full weights and state
        check_update(result, config, ref)
        check_checkpoint(result)
    # The GFT metrics, gathered over the ranks, one value per micro-batch (prompts 0-1,
    # then 2-3 either way): their token-weighted mean is the reference's share of
    # rectified tokens over the mini-batch.
    metrics = results[0]["metrics"]
    fractions = metrics["actor/gft_rectified_fraction"]
    tokens = [sum(len(r) for r in responses[i : i + MICRO_BATCH]) for i in (0, MICRO_BATCH)]
    assert len(fractions) == 2
    share = sum(f * n for f, n in zip(fractions, tokens)) / sum(tokens)
    assert math.isclose(share, ref["rectified"], rel_tol=1e-6)
    assert "actor/ppo_kl" in metrics and "mfu" in metrics
