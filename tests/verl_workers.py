"""Worker processes for ``test_integration_verl_engine.py``: one verl actor update on CPU.

Each rank builds verl's own actor engine (``EngineRegistry.new``, FSDP2 on gloo, see
``verl_cpu.py``) for a checkpoint in a folder, takes its data-parallel share of one
mini-batch and runs ``engine.train_batch`` with verl's ``ppo_loss`` (the loss function
verl's actor worker hands its engine), then saves what the test compares to
``<out>/rank<k>.pt``: per step (one loss aggregation mode, temperature and input
layout each, all from the checkpoint's weights: the optimizer's learning rate is 0) the
micro-batch losses and metrics, the full gradient of every parameter and the step's peak
memory increase; optionally the log-probs of verl's inference path and the errors raised
for unsupported configurations.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any, Dict

import torch


def _actor_config(run: Dict[str, Any], **overrides: Any):
    from verl.workers.config import FSDPActorConfig

    from gft_kernels.integration.verl import GFTPolicyLossConfig

    kwargs = dict(
        strategy="fsdp2",
        rollout_n=1,
        ppo_mini_batch_size=run["global_batch_size"],
        ppo_micro_batch_size_per_gpu=run["micro_batch_size"],
        use_dynamic_bsz=False,
        policy_loss=GFTPolicyLossConfig(
            tau=run["tau"],
            logprob_temperature=run.get("logprob_temperature"),
            fused_head=run.get("fused_head"),
        ),
    )
    kwargs.update(overrides)
    return FSDPActorConfig(**kwargs)


def _train_step(engine, data, loss_function, out: Dict[str, Any]) -> None:
    with engine.train_mode(zero_grad_on_exit=False):
        out["out"] = engine.train_batch(data, loss_function=loss_function)


def actor_update(rank: int, world: int, port: int, run: Dict[str, Any], out_dir: str) -> None:
    from tests import verl_cpu

    verl_cpu.init_process_group(rank, world, port)
    import torch.distributed as dist
    from verl.workers.utils.losses import ppo_loss

    from benchmarks.measure import peak_rss_during

    if run["fused"]:
        external_lib = "gft_kernels.integration.verl.use_fused_engine"
    else:
        external_lib = None
    engine, _ = verl_cpu.build_actor_engine(
        run["model_path"],
        lr=0.0,
        use_remove_padding=True,
        external_lib=external_lib,
    )
    # This rank's data-parallel share of the mini-batch, as verl's dispatch splits it.
    share = slice(rank * len(run["prompts"]) // world, (rank + 1) * len(run["prompts"]) // world)
    extra = dict(
        global_batch_size=run["global_batch_size"],
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=run["micro_batch_size"],
        use_fused_kernels=False,
        calculate_entropy=run.get("calculate_entropy", False),
    )

    def batch(temperature: float = 1.0, nested: bool = False, **more: Any):
        if nested:  # verl's V1 trainer layout
            return verl_cpu.make_nested_batch(
                run["prompts"][share],
                run["responses"][share],
                run["advantages"][share],
                temperature=temperature,
                old_log_probs=run["old_log_probs"][share],
                extra={**extra, **more},
            )
        return verl_cpu.make_batch(
            run["prompts"][share],
            run["responses"][share],
            run["advantages"][share],
            prompt_width=run["prompt_width"],
            response_width=run["response_width"],
            temperature=temperature,
            old_log_probs=run["old_log_probs"][share],
            extra={**extra, **more},
        )

    result: Dict[str, Any] = {"engine": type(engine).__name__}
    if run.get("infer"):
        # verl's compute_log_prob path: no loss function, log-probs and entropy out.
        with engine.eval_mode():
            data = batch(
                run["steps"][0]["temperature"], calculate_entropy=True, use_remove_padding=True
            )
            out = engine.infer_batch(data, loss_function=None)
        result["infer_log_probs"] = [t.clone() for t in out["model_output"]["log_probs"].unbind()]
        result["infer_entropy"] = [t.clone() for t in out["model_output"]["entropy"].unbind()]
    if run.get("refusals"):
        errors = {}
        for name, overrides in (
            ("entropy_coeff", {"entropy_coeff": 0.01}),
            ("use_kl_loss", {"use_kl_loss": True}),
        ):
            config = _actor_config(run, **overrides)
            try:
                with engine.train_mode():
                    engine.train_batch(
                        batch(use_remove_padding=True),
                        loss_function=partial(ppo_loss, config=config),
                    )
            except ValueError as exc:
                errors[name] = str(exc)
        result["refusals"] = errors

    result["steps"] = []
    for step in run["steps"]:
        # lr = 0: every step starts from the checkpoint's weights, as the reference does.
        config = _actor_config(run, loss_agg_mode=step["mode"])
        data = batch(
            temperature=step["temperature"],
            nested=step.get("nested", False),
            use_remove_padding=step["packed"],
        )
        step_out: Dict[str, Any] = {}
        step = partial(_train_step, engine, data, partial(ppo_loss, config=config), step_out)
        # The step's own peak (the high-water mark reset just before it), not the
        # process's: setting up the engine can peak higher than a step.
        peak = peak_rss_during(step)["peak_mb"] * 2**20
        out = step_out["out"]
        # One value per micro-batch: verl merges its Metric objects, lists plain numbers.
        metrics = {
            key: [float(v) for v in (values.values if hasattr(values, "values") else values)]
            for key, values in out["metrics"].items()
            if isinstance(values, list) or hasattr(values, "values")
        }
        grads = {}
        for name, param in engine.module.named_parameters():
            grad = param.grad
            if grad is not None and hasattr(grad, "full_tensor"):
                grad = grad.full_tensor()  # a collective: every rank calls it
            grads[name] = None if grad is None else grad.detach().clone()
        result["steps"].append(
            {
                "losses": list(out["loss"]),
                "metrics": metrics,
                "grads": grads,
                "peak_rss_increase": peak,
            }
        )
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def independent_updates(index: int, runs: list, ports: list, out_dirs: list) -> None:
    """Process ``index`` runs ``runs[index]`` as its own one-rank job (for side-by-side
    peak-memory measurements: each process's peak is its own)."""
    actor_update(0, 1, ports[index], runs[index], out_dirs[index])
