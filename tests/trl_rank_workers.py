"""Worker processes for ``test_integration_trl_ranks.py``: ``GFTGRPOTrainer`` on 2 CPU ranks.

Each worker sets the variables transformers and accelerate read to detect distributed
training, initialises gloo itself (file rendezvous, then reused by accelerate), runs one
scenario and saves what the test checks to ``rank<r>.pt``. :func:`run_ranks` spawns them
with a deadline: a rank waiting forever in a collective its peer never joins is the failure
these tests look for, and must end the test rather than hang it.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.dist_workers import rank_environment

WORLD = 2


def run_ranks(target: Callable[..., None], args: tuple, timeout: float) -> List[Dict[str, Any]]:
    """Run ``target(rank, WORLD, *args)`` in ``WORLD`` spawned processes and return what each
    saved; fails (after killing them) when they are not all done within ``timeout`` s."""
    out_dir = args[1]
    context = mp.start_processes(target, args=(WORLD, *args), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"the {WORLD} ranks did not finish within {timeout:.0f} s (one waits in a "
                    "collective its peer never joined?)"
                )
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


def _start(rank: int, world: int, init_file: str, port: int) -> None:
    rank_environment(rank, world, port)
    # A short collective timeout: a rank left waiting errors out instead of sleeping until
    # run_ranks kills it.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )


def _finish(rank: int, out_dir: str, result: Dict[str, Any]) -> None:
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    # Every rank leaves together: an early teardown can abort a peer still connected.
    dist.barrier()
    dist.destroy_process_group()


def _config(out_dir: str, **overrides: Any):
    """The TRL tests' one-SGD-step config with groups of 2 (one group per rank), prompts in
    dataset order (so which rank gets which prompt is known)."""
    from tests.test_integration_trl import config

    return config(
        out_dir,
        per_device_train_batch_size=2,
        num_generations=2,
        shuffle_dataset=False,
        **overrides,
    )


def _count_generate(model: torch.nn.Module, calls: List[int]) -> None:
    """Record the number of rows of each ``model.generate`` call (TRL's plain path calls the
    unwrapped model's ``generate``)."""
    real = model.generate

    def generate(*args: Any, **kwargs: Any):
        calls.append(int(kwargs["input_ids"].shape[0]))
        return real(*args, **kwargs)

    model.generate = generate


def _fully_shard(model: torch.nn.Module, world: int) -> None:
    """FSDP2 on CPU: every decoder layer, then the root (the tied embedding and head in its
    group); the model's forward all-gathers the shards, so every forward is collective."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def generation_worker(
    rank: int, world: int, init_file: str, out_dir: str, port: int, shard: bool
) -> None:
    """One training step on prompt groups where rank 1 holds only demonstrations.

    ``shard``: FSDP2 (``fully_shard``) on the model after the trainer is built, and the step
    driven through ``trainer.training_step`` (accelerate would wrap the model in DDP: it has
    no FSDP on CPU); else ``trainer.train()`` under accelerate's DDP."""
    import datasets

    from gft_kernels.integration.trl import GFTGRPOTrainer
    from tests.test_integration_sampling import chat_tokenizer
    from tests.test_integration_trl import right_answer, tiny_model

    _start(rank, world, init_file, port)
    # Prompt 0 (rank 0's group) has no demonstrations, prompt 1 (rank 1's) one expert and one
    # teacher: a group of 2 is then all demonstrations.
    data = datasets.Dataset.from_list(
        [
            {"prompt": "3 + 4 =", "expert": None, "teacher": None},
            {"prompt": "1 + 1 =", "expert": "2", "teacher": "3"},
        ]
    )
    model = tiny_model()
    calls: List[int] = []
    _count_generate(model, calls)
    seen: Dict[str, Any] = {}

    class Recording(GFTGRPOTrainer):
        def _compute_loss(self, model, inputs):
            seen["sources"] = [self.sources[int(c)] for c in inputs["gft_sources"]]
            value = super()._compute_loss(model, inputs)
            seen["loss"], seen["head_checked"] = value.detach(), self._head_checked
            return value

    trainer = Recording(
        model=model,
        reward_funcs=[right_answer],
        args=_config(out_dir, max_steps=1),
        train_dataset=data,
        processing_class=chat_tokenizer(),
    )
    if shard:
        _fully_shard(model, world)
        trainer.current_gradient_accumulation_steps = 1
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.training_step(model, batch, None)
        steps = 1
    else:
        trainer.train()
        steps = trainer.state.global_step
    _finish(
        rank,
        out_dir,
        dict(
            calls=calls,
            steps=steps,
            num_processes=trainer.accelerator.num_processes,
            wrapper=type(trainer.model_wrapped).__name__,
            sharded=type(model.lm_head.weight).__name__ == "DTensor",
            **seen,
        ),
    )


def head_check_worker(rank: int, world: int, init_file: str, out_dir: str, port: int) -> None:
    """The first-batch head check under DDP, with a model whose config declares a logit scale
    on rank 1 only (what the fused head would apply, the model's forward does not).

    The head's weight is zero, so every position's logits are its bias: the model's own
    logits are ``b`` everywhere, and the fused head's on rank 1 are ``2 b``; rank 1 is off by
    exactly ``max |b|`` whatever row is checked, rank 0 by 0."""
    import warnings

    from gft_kernels.integration.trl import GFTGRPOTrainer
    from tests.test_integration_sampling import chat_tokenizer
    from tests.test_integration_trl import dataset, right_answer, tiny_model

    class Checked(GFTGRPOTrainer):
        checks = 0

        def _check_head(self, *args, **kwargs):
            self.checks += 1
            return super()._check_head(*args, **kwargs)

    _start(rank, world, init_file, port)
    model = tiny_model(tie=False, bias=True)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    if rank == 1:
        model.config.logit_scale = 2.0  # read as Cohere's multiplier; Llama ignores it
    trainer = Checked(
        model=model,
        reward_funcs=[right_answer],
        args=_config(out_dir, max_steps=1),
        train_dataset=dataset(2),
        processing_class=chat_tokenizer(),
    )
    error = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            trainer.train()
        except ValueError as e:
            error = str(e)
    _finish(
        rank,
        out_dir,
        dict(
            error=error,
            checks=trainer.checks,
            steps=trainer.state.global_step,
            bias_max=model.lm_head.bias.detach().abs().max().item(),
            wrapper=type(trainer.model_wrapped).__name__,
            num_processes=trainer.accelerator.num_processes,
        ),
    )
