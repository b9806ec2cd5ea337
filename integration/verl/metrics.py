"""Per-source GFT metrics in verl's tracker: ``gft/<source>/...`` for every training step.

A GFT group mixes the policy's own samples with expert and teacher responses (see
:mod:`.hybrid`), so verl's ``critic/score/*`` and ``response_length/*`` average over all
three and hide the policy's own accuracy. :class:`GFTReplayBuffer` is verl's synchronous
V1 replay buffer (the sampler that hands each training step its batch) that adds, for each
``gft_source`` tag the hybrid agent loop writes into ``extra_fields``:

    gft/<source>/count                  rows of that source in the step's batch
    gft/<source>/score/mean             mean sequence reward (accuracy for 0/1 rewards)
    gft/<source>/response_length/mean   response tokens, as verl's response_length/*
    gft/<source>/response_length/max
    gft/<source>/response_length/min

with ``<source>`` one of ``self``, ``expert``, ``teacher``. Select it with::

    trainer.v1.sampler.custom_sampler.path=pkg://gft_kernels.integration.verl.metrics
    trainer.v1.sampler.custom_sampler.name=GFTReplayBuffer

Why the sampler: verl 0.9.1's V1 trainer merges the metrics its sampler returns into the
step's metric dict (the one ``Tracking.log`` receives), and the sampler is the one
pluggable trainer-side component that sees the whole step batch, with its agent-loop
``extra_fields`` and reward scores, before the step runs. A trainer subclass would need a
new ``trainer.v1.trainer_mode`` name, which verl compares with ``"sync"`` to choose its
sampling and data-loading behaviour; the actor only sees its data-parallel share, cut into
micro-batches, and never the rewards' sources.

The scores exist at sampling time when the reward is computed in the agent loop (verl's
streaming reward loop: rule-based rewards such as the recipe's, or a reward model on its
own resource pool); with a reward model colocated with the actor, verl scores after
sampling and only the counts and lengths are logged. verl gives a custom sampler only the
common arguments, so DAPO group filtering (``algorithm.filter_groups``) and
``trainer.v1.sampler.sync_refill_failed_groups`` are refused with it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import transfer_queue as tq
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

SOURCE_KEY = "gft_source"
PREFIX = "gft"
FIELDS = ("responses", "rm_scores", "extra_fields")


def _rows(value: Any) -> List[Any]:
    """The per-row items of a field verl fetched from TransferQueue."""
    if isinstance(value, torch.Tensor):
        return list(value.unbind(0))
    items = value.tolist() if hasattr(value, "tolist") else list(value)
    return [getattr(item, "data", item) for item in items]


def source_metrics(
    sources: Sequence[Optional[str]],
    lengths: Sequence[int],
    scores: Optional[Sequence[float]] = None,
) -> Dict[str, float]:
    """``gft/<source>/...`` metrics of one batch, one entry per row in each sequence.

    Rows whose source is None (not produced by the hybrid agent loop) are left out.
    """
    if len(lengths) != len(sources) or (scores is not None and len(scores) != len(sources)):
        raise ValueError(
            f"source_metrics: expected one length and score per row ({len(sources)} rows), "
            f"got {len(lengths)} lengths and {None if scores is None else len(scores)} scores"
        )
    metrics: Dict[str, float] = {}
    for source in sorted({s for s in sources if s is not None}):
        rows = [i for i, s in enumerate(sources) if s == source]
        length = torch.tensor([float(lengths[i]) for i in rows], dtype=torch.float64)
        name = f"{PREFIX}/{source}"
        metrics[f"{name}/count"] = float(len(rows))
        if scores is not None:
            metrics[f"{name}/score/mean"] = sum(float(scores[i]) for i in rows) / len(rows)
        metrics[f"{name}/response_length/mean"] = length.mean().item()
        metrics[f"{name}/response_length/max"] = length.max().item()
        metrics[f"{name}/response_length/min"] = length.min().item()
    return metrics


def batch_source_metrics(data: Mapping[str, Any]) -> Dict[str, float]:
    """:func:`source_metrics` of the fields verl stores per trajectory in TransferQueue.

    ``data`` holds ``responses`` (token ids; jagged per row), ``extra_fields`` (the agent
    loop's dicts, with ``gft_source``) and, once the reward ran, ``rm_scores`` (token-level,
    the sequence reward on the last token): what ``transfer_queue.kv_batch_get`` returns.
    """
    keys = set(data.keys())
    responses = data["responses"]
    if getattr(responses, "is_nested", False):
        lengths = responses.offsets().diff().tolist()
    else:
        lengths = [len(row) for row in _rows(responses)]
    extra = _rows(data["extra_fields"])
    sources = [e.get(SOURCE_KEY) if isinstance(e, Mapping) else None for e in extra]
    scores = None
    if "rm_scores" in keys:
        scores = [float(row.sum()) for row in _rows(data["rm_scores"])]
    return source_metrics(sources, lengths, scores)


def _refuse_unsupported(refill_fn: Any) -> None:
    """Refuses the sync-sampler features verl gives a custom sampler no arguments for."""
    config = getattr(getattr(refill_fn, "__self__", None), "config", None)
    if config is None:
        return
    filter_groups = config.algorithm.get("filter_groups", None)
    if filter_groups is not None and filter_groups.get("enable", False):
        raise ValueError(
            "algorithm.filter_groups.enable: verl gives a custom sampler no DAPO arguments, "
            "expected False with GFTReplayBuffer, got True"
        )
    if config.trainer.v1.sampler.get("sync_refill_failed_groups", False):
        raise ValueError(
            "trainer.v1.sampler.sync_refill_failed_groups: verl gives a custom sampler no "
            "refill arguments, expected False with GFTReplayBuffer, got True"
        )


class GFTReplayBuffer(ReplayBuffer):
    """verl's sync V1 replay buffer whose training batches also report per-source metrics.

    Sampling is verl's own (``ReplayBuffer.sample``); for the ``train`` partition the
    returned metrics gain :func:`batch_source_metrics` of the sampled trajectories, which
    verl's trainer merges into the step's metrics. Validation batches are left alone.
    """

    def __init__(self, trainer_mode: str, *args: Any, **kwargs: Any) -> None:
        if trainer_mode != "sync":
            raise ValueError(
                f"trainer.v1.trainer_mode: GFTReplayBuffer extends verl's sync replay buffer, "
                f"expected 'sync', got {trainer_mode!r}"
            )
        _refuse_unsupported(kwargs.get("refill_fn"))
        super().__init__(trainer_mode, *args, **kwargs)

    def sample(self, global_steps: int, partition_id: str, batch_size: int) -> Tuple[Any, dict]:
        batch, metrics = super().sample(global_steps, partition_id, batch_size)
        if partition_id == "train":
            metrics.update(self.gft_metrics(batch))
        return batch, metrics

    @staticmethod
    def gft_metrics(batch: Any) -> Dict[str, float]:
        """Per-source metrics of a sampled batch (``KVBatchMeta``), padding rows excluded."""
        keys = [
            key
            for key, tag in zip(batch.keys, batch.tags)
            if not (isinstance(tag, Mapping) and tag.get("is_padding", False))
        ]
        if not keys:
            return {}
        data = tq.kv_batch_get(
            keys=keys, partition_id=batch.partition_id, select_fields=list(FIELDS)
        )
        return batch_source_metrics(data)
