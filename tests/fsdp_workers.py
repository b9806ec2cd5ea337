"""Worker processes for ``test_integration_fsdp.py``: ``GFTTrainer`` on CPU (gloo).

:func:`train` runs one training (a model loaded from a directory, a list of prompt groups, the
keywords of a ``GFTConfig``) and returns what the test compares: the loss of every step as
this process computed it, the Trainer's logged losses, the response tokens of every step, the
full parameters after training, what reached the fused head and the warnings raised. It runs
both in the spawned ranks (:func:`trainer_worker`) and, with ``world=1``, as the
single-process reference.

``run["shard"]``:

- ``"transformers"``: transformers' own FSDP2, ``from_pretrained(...,
  distributed_config=DistributedConfig(fsdp_size=world))``, trained by ``trainer.train()``
  (the Trainer leaves such a model to FSDP2 instead of wrapping it);
- ``"fully_shard"``: FSDP2 applied here, ``fully_shard`` on every decoder layer and then on
  the root (so a tied embedding and head share the root's group), steps driven through
  ``trainer.training_step`` (the Trainer would wrap this model in DDP);
- ``None``: ``trainer.train()`` on the plain model (accelerate wraps it in DDP when
  ``world > 1``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List

import torch
import torch.distributed as dist

from tests.dist_workers import rank_environment


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # older torch: no public DTensor, so no FSDP2 here either
        return False
    return isinstance(tensor, DTensor)


def _fully_shard(model: torch.nn.Module, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def train(run: Dict[str, Any], world: int, out_dir: str) -> Dict[str, Any]:
    """One training; ``run``: ``name``, ``model_dir``, ``data``, ``args`` (GFTConfig
    keywords) and ``shard`` (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    import gft_kernels.integration.loss as loss_module
    from gft_kernels.integration import GFTConfig, GFTTrainer

    shard = run["shard"]
    kwargs: Dict[str, Any] = {"attn_implementation": "sdpa"}
    if shard == "transformers":
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(fsdp_size=world)
    model = AutoModelForCausalLM.from_pretrained(run["model_dir"], **kwargs)

    head_calls: List[Dict[str, Any]] = []
    real = loss_module.fused_linear_gft_loss

    def spy(hidden, weight, *args, **kw):
        head_calls.append({"dtensor": _is_dtensor(weight), "shape": tuple(weight.shape)})
        return real(hidden, weight, *args, **kw)

    class Recording(GFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                valid = inputs["response_mask"][:, 1:].bool()
                valid &= inputs["attention_mask"][:, 1:].bool()
                step_losses.append(loss.detach().item())
                step_tokens.append(int(valid.sum()))
            return loss

    step_losses: List[float] = []
    step_tokens: List[int] = []
    args = GFTConfig(output_dir=os.path.join(out_dir, run["name"]), **run["args"])
    loss_module.fused_linear_gft_loss = spy
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = Recording(model=model, args=args, train_dataset=run["data"])
            if shard == "fully_shard":
                _fully_shard(model, world)
            head_weight = model.get_output_embeddings().weight
            # Before training: is the head weight sharded, how many of its rows live here?
            sharded = _is_dtensor(head_weight)
            local_head_rows = (head_weight.to_local() if sharded else head_weight).shape[0]
            if shard == "fully_shard":
                optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate)
                trainer.current_gradient_accumulation_steps = 1
                loader = trainer.get_train_dataloader()
                for _ in range(args.max_steps):
                    for batch in loader:  # one batch (this rank's share) per epoch
                        trainer.training_step(model, batch)
                        optimizer.step()
                        optimizer.zero_grad()
            else:
                trainer.train()
    finally:
        loss_module.fused_linear_gft_loss = real
    # Full parameters (every rank takes part in gathering the shards).
    params = {
        name: (p.full_tensor() if _is_dtensor(p) else p).detach().clone()
        for name, p in model.named_parameters()
    }
    return {
        "losses": step_losses,
        "tokens": step_tokens,
        "logged": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "logs": [h for h in trainer.state.log_history if "loss" in h],
        "params": params,
        "head_calls": head_calls,
        "head_sharded": sharded,
        "local_head_rows": local_head_rows,
        "wrapper": type(trainer.model_wrapped).__name__,
        "num_processes": trainer.accelerator.num_processes,
        # The trainer's own warnings (its messages start with the argument they concern).
        "warnings": [str(w.message) for w in caught if str(w.message).startswith("model:")],
    }


def trainer_worker(
    rank: int, world: int, init_file: str, port: int, out_dir: str, runs: List[Dict[str, Any]]
) -> None:
    # transformers and accelerate detect distributed training from these variables; the
    # process group itself is initialised here (file rendezvous) and then reused by both.
    rank_environment(rank, world, port)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {run["name"]: train(run, world, out_dir) for run in runs}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: an early teardown can abort a peer still connected
    finally:
        dist.destroy_process_group()
