"""GFTGRPOTrainer in two processes (gloo on CPU): collective generation, the head check.

Runs in ``trl_rank_workers.py``, each with a deadline (a rank stuck in a collective its peer
skipped fails the test instead of hanging it):

- a rank whose rows all take demonstrations still calls generation. Checked under FSDP2
  (``fully_shard`` on the decoder layers and the root), where generation is collective: every
  forward all-gathers the shards, and transformers' ``generate`` keeps the ranks stepping
  together (``synced_gpus``), so a rank that skipped it would leave the other waiting. The
  model is sharded after the trainer is built and the step driven through
  ``trainer.training_step``: accelerate has no FSDP on CPU (its FSDP distributed type is
  only set for accelerator devices; ``fsdp=...`` on CPU trains with DDP), and the Trainer
  would wrap a sharded model in DDP. The same data under ``trainer.train()`` and DDP
  (generation not collective there) checks the call is made in the trainer's own loop too.
- the first-batch head check takes the same decision on every rank, and its message gives
  the largest difference over the ranks: a model whose config declares a logit scale on
  one rank only fails on both, with that rank's difference. A correct model passes it on
  both ranks (the generation tests, under DDP and FSDP2, run it on their first batch).
"""

from __future__ import annotations

import socket

import pytest
import torch

from tests import trl_rank_workers as workers

pytest.importorskip("trl")
pytest.importorskip("datasets")

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not built"
    ),
]

# Seconds the two ranks get (they take ~15 s on 2 shared cores: imports, 1 or 2 steps).
DEADLINE = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path, target, *args):
    return workers.run_ranks(
        target, (str(tmp_path / "init"), str(tmp_path), free_port(), *args), DEADLINE
    )


@pytest.mark.parametrize("shard", [True, False], ids=["fsdp2", "ddp"])
def test_a_rank_with_only_demonstrations_joins_generation(tmp_path, shard):
    ranks = run(tmp_path, workers.generation_worker, shard)
    for r, out in enumerate(ranks):
        assert out["num_processes"] == 2 and out["steps"] == 1, (r, out)
        assert out["sharded"] == shard, (r, out)
        assert shard or out["wrapper"] == "DistributedDataParallel", (r, out)
        assert torch.isfinite(out["loss"]), (r, out)
        assert out["head_checked"], r  # the head check ran on this batch and passed
    # The arrangement: rank 0's group is the policy's samples, rank 1's its demonstrations.
    assert ranks[0]["sources"] == ["self", "self"]
    assert ranks[1]["sources"] == ["expert", "teacher"]
    # Rank 0 generated its 2 rows; rank 1, with nothing to sample, still generated (one row,
    # discarded) alongside it.
    assert ranks[0]["calls"] == [2]
    assert ranks[1]["calls"] == [1]


def test_the_head_check_decides_and_reports_over_all_ranks(tmp_path):
    """Only rank 1 declares the scale: rank 0's own logits match its fused head exactly, yet
    both ranks raise (a rank raising alone would leave the other waiting in the step's
    collectives), and both report rank 1's difference, ``max |b|`` (the head is its bias).
    (That a correct model passes the check on both ranks, the tests above show.)"""
    ranks = run(tmp_path, workers.head_check_worker)
    bias_max = ranks[1]["bias_max"]
    assert ranks[0]["bias_max"] == bias_max > 0.01
    for r, out in enumerate(ranks):
        assert out["wrapper"] == "DistributedDataParallel" and out["num_processes"] == 2
        assert out["checks"] == 1 and out["steps"] == 0, (r, out)
        assert out["error"] is not None, f"rank {r} did not raise"
        assert out["error"].startswith("model: its logits differ from the fused head's"), out
        assert f") by {bias_max:.3g}: the model" in out["error"], (r, out["error"], bias_max)
