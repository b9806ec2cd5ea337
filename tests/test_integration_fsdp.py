"""GFTTrainer under FSDP (and DDP) in two processes: the same training as one process.

Runs (gloo on CPU, see ``fsdp_workers.py``):

- ``fsdp_untied``: transformers' own FSDP2 (``from_pretrained(...,
  distributed_config=DistributedConfig(fsdp_size=2))``: decoder layers, the final norm with
  the head, and the root each ``fully_shard``-ed), trained by the real ``GFTTrainer.train()``;
- ``fully_shard_tied``: a tied embedding/head, ``fully_shard`` applied by the worker to the
  decoder layers and the root, steps driven through ``GFTTrainer.training_step``;
- ``ddp_tied``, ``ddp_untied``: ``GFTTrainer.train()`` on the plain model, which accelerate
  wraps in DDP.

The ``--fsdp`` flag of ``TrainingArguments`` is not used: accelerate enables FSDP only for
accelerator devices and on CPU silently trains with DDP instead. transformers' own FSDP2 is
not used for the tied model: its plan puts the embedding and the head in two FSDP groups,
which then train two diverging copies of the tied weight (plain cross-entropy training
diverges from one process too); ``fsdp_tied_transformers`` checks that the trainer warns
exactly when that happens.

Each rank gets half of the same global batch: 4 prompt groups, one step per epoch, so every
step trains on all 4 groups whatever the shuffling (2 per rank, 4 in the single process).
With ``token-mean`` normalised by the global token count, each rank's loss is its tokens'
loss sum over (global tokens / 2), so the mean of the ranks' losses is the single-process
loss and the averaged gradients are the single-process gradients: the losses of both steps
(the second one after an SGD update) and the parameters after two steps must agree.
"""

import copy
import inspect
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests import fsdp_workers as workers

transformers = pytest.importorskip("transformers")

from gft_kernels.integration import GFTTrainer  # noqa: E402
from tests.test_integration_trainer import (  # noqa: E402
    TRAINING,
    VOCAB,
    gft_args,
    groups_dataset,
    sgd_trainer,
    tiny_model,
)

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not built"
    ),
    pytest.mark.usefixtures("one_torch_thread"),
]

HIDDEN = 32
WORLD = 2

try:  # transformers' own FSDP2 (DistributedConfig(fsdp_size=...)), in recent transformers only
    import inspect

    from transformers.distributed import DistributedConfig

    # Older releases (e.g. 5.10, which verl 0.9 pins) have the class without FSDP.
    HAS_HF_FSDP = "fsdp_size" in inspect.signature(DistributedConfig).parameters
except ImportError:
    HAS_HF_FSDP = False
try:  # FSDP2's public API (torch >= 2.6)
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    HAS_FULLY_SHARD = True
except ImportError:
    HAS_FULLY_SHARD = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(per_device: int) -> dict:
    """GFTConfig's arguments (but the output folder) of each run: 2 SGD steps, token-mean."""
    return dict(
        TRAINING,
        per_device_train_batch_size=per_device,
        max_steps=2,
        optim="sgd",
        learning_rate=0.1,  # large enough that step 2 sees really different weights
        lr_scheduler_type="constant",
        gft_backend="torch",
        loss_agg_mode="token-mean",
    )


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.distributed
def test_two_process_fsdp_and_ddp_match_one_process(tmp_path):
    data = groups_dataset(4, seed=0)  # every group has unequal rewards, so nonzero advantages
    runs = []
    for name, tie, shard in [
        ("fsdp_untied", False, "transformers"),
        ("fully_shard_tied", True, "fully_shard"),
        ("ddp_tied", True, None),
        ("ddp_untied", False, None),
        ("fsdp_tied_transformers", True, "transformers"),
    ]:
        if (shard == "transformers" and not HAS_HF_FSDP) or (
            shard == "fully_shard" and not HAS_FULLY_SHARD
        ):
            continue
        model_dir = tmp_path / f"model_{name}"
        tiny_model(tie=tie, seed=1).save_pretrained(model_dir)
        runs.append(
            dict(
                name=name,
                model_dir=str(model_dir),
                data=data,
                args=train_args(4 // WORLD),
                shard=shard,
            )
        )
    # DDP with gradient accumulation: 2 ranks x batch 1 x GA 2 against 1 process x batch 4.
    model_dir = tmp_path / "model_ddp_accumulation"
    tiny_model(tie=False, seed=1).save_pretrained(model_dir)
    runs.append(
        dict(
            name="ddp_accumulation",
            model_dir=str(model_dir),
            data=data,
            args=dict(train_args(1), gradient_accumulation_steps=2),
            shard=None,
        )
    )

    mp.spawn(
        workers.trainer_worker,
        args=(WORLD, str(tmp_path / "init"), free_port(), str(tmp_path), runs),
        nprocs=WORLD,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    singles = {}
    for run in runs:
        name = run["name"]
        single = workers.train(dict(run, args=train_args(4), shard=None), 1, str(tmp_path))
        singles[name] = single
        assert single["num_processes"] == 1 and len(single["losses"]) == 2
        assert not single["warnings"]
        outs = [r[name] for r in ranks]
        if name == "ddp_accumulation":
            check_accumulation_and_metrics(run, single, outs)
            continue
        for out in outs:
            assert out["num_processes"] == WORLD
            assert len(out["losses"]) == 2, name
            # The fused op ran once per step, on the full (gathered) head weight.
            assert out["head_calls"] == [{"dtensor": False, "shape": (VOCAB, HIDDEN)}] * 2
        if run["shard"]:
            for out in outs:
                assert out["head_sharded"] and out["local_head_rows"] < VOCAB, name
                assert out["wrapper"].startswith("FSDP"), out["wrapper"]
        else:
            assert all(out["wrapper"] == "DistributedDataParallel" for out in outs)
        if name == "fsdp_tied_transformers":
            continue  # below
        assert not any(out["warnings"] for out in outs), name

        # Every step trained on the whole global batch, split unevenly in tokens (so a
        # per-rank token mean would give a different loss and different gradients).
        for step in range(2):
            tokens = [out["tokens"][step] for out in outs]
            assert sum(tokens) == single["tokens"][step], (name, step)
        assert any(outs[0]["tokens"][s] != outs[1]["tokens"][s] for s in range(2)), name

        for step in range(2):
            per_rank = [out["losses"][step] for out in outs]
            mean = sum(per_rank) / WORLD
            assert mean == pytest.approx(single["losses"][step], rel=1e-5, abs=1e-7), (name, step)
            # What the Trainer logs is that mean too (it averages the ranks' losses).
            for out in outs:
                if run["shard"] != "fully_shard":  # steps driven by hand: nothing logged
                    assert out["logged"][step] == pytest.approx(mean, rel=1e-5, abs=1e-7)
            assert single["logged"][step] == pytest.approx(single["losses"][step], rel=1e-6)

        init = transformers.AutoModelForCausalLM.from_pretrained(run["model_dir"])
        init = dict(init.named_parameters())
        moved = 0.0
        for pname, p in single["params"].items():
            for r, out in enumerate(outs):
                close(out["params"][pname], p, f"{name} rank {r} {pname}")
            moved = max(moved, (p - init[pname].detach()).abs().max().item())
        assert set(outs[0]["params"]) == set(single["params"])
        assert moved > 1e-3, name  # the two steps really changed the weights

    # transformers' FSDP2 plan with a tied embedding: the trainer's warning says whether the
    # head and the embedding are two tensors in the forward, and they are exactly when the
    # second step's loss (after one update) differs from the single process.
    if not HAS_HF_FSDP:
        return
    outs = [r["fsdp_tied_transformers"] for r in ranks]
    single = singles["fsdp_tied_transformers"]
    warned = [any("diverging copies" in w for w in out["warnings"]) for out in outs]
    assert warned[0] == warned[1]
    mean = sum(out["losses"][1] for out in outs) / WORLD
    assert (mean != pytest.approx(single["losses"][1], rel=1e-5, abs=1e-7)) == warned[0]


def check_accumulation_and_metrics(run, single, outs):
    """2 ranks x GA 2 x batch 1 train like one process on batch 4: same weights, same logged
    loss, and the logged metrics are those of all ranks' data (not of one rank's)."""
    init = transformers.AutoModelForCausalLM.from_pretrained(run["model_dir"])
    init = dict(init.named_parameters())
    for pname, p in single["params"].items():
        for r, out in enumerate(outs):
            update, reference = out["params"][pname] - init[pname], p - init[pname]
            torch.testing.assert_close(
                update,
                reference,
                rtol=1e-4,
                atol=1e-6,
                msg=lambda m, r=r, n=pname: f"rank {r} {n}: {m}",
            )
    for step in range(2):
        for out in outs:
            log, ref = out["logs"][step], single["logs"][step]
            assert log["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7), step
            for key in (
                "reward/mean",
                "reward/std",
                "reward/expert/mean",
                "response_tokens",
                "num_responses/teacher",
                "frac_reward_zero_std",
                "entropy",
                "rectified_fraction",
            ):
                assert log[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (key, step)


# -- the loss-in-head path in one process ----------------------------------------------------


@pytest.mark.parametrize(
    "tie, bias, mode", [(True, False, "token-mean"), (False, True, "seq-mean-token-mean")]
)
def test_loss_in_head_matches_the_body_path(tmp_path, monkeypatch, tie, bias, mode):
    # The path wrapped/sharded models take, forced on a plain model: same losses and weights
    # as the body + head path (which test_integration_trainer checks against the reference).
    results = {}
    for in_head in (False, True):
        monkeypatch.setattr(GFTTrainer, "_computes_loss_in_head", lambda self, m, v=in_head: v)
        model = tiny_model(tie=tie, bias=bias)
        args = gft_args(tmp_path, max_steps=2, loss_agg_mode=mode)
        trainer = sgd_trainer(model, args, groups_dataset(4), lr=0.1)
        trainer.train()
        assert "forward" not in model.get_output_embeddings().__dict__  # restored
        logs = [h for h in trainer.state.log_history if "loss" in h]
        results[in_head] = (logs, copy.deepcopy(model.state_dict()))
    (logs, params), (logs_in, params_in) = results[False], results[True]
    for key in ("loss", "entropy", "rectified_fraction", "response_tokens"):
        for a, b in zip(logs, logs_in):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    for name, p in params.items():
        close(params_in[name], p, name)


def test_loss_in_head_refuses_a_model_that_changes_the_head_output(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, *a, **kw):
            out = super().forward(*a, **kw)
            out.logits = out.logits * 2.0
            return out

    model = tiny_model()
    scaled = Scaled(model.config)
    scaled.load_state_dict(model.state_dict())
    monkeypatch.setattr(GFTTrainer, "_computes_loss_in_head", lambda self, m: True)
    # The first-batch check (run inside the head's forward) ...
    trainer = GFTTrainer(
        model=scaled, args=gft_args(tmp_path, max_steps=1), train_dataset=groups_dataset(2)
    )
    with pytest.raises(ValueError, match="logits differ"):
        trainer.train()
    # ... and, without it, the loss returned through the model's output.
    trainer = GFTTrainer(
        model=scaled,
        args=gft_args(tmp_path, max_steps=1, check_head=False),
        train_dataset=groups_dataset(2),
    )
    with pytest.raises(ValueError, match="changes the lm_head output"):
        trainer.train()
    assert "forward" not in scaled.get_output_embeddings().__dict__
