"""Metrics accumulated between two logs and reduced over all data-parallel ranks.

Every metric keeps five numbers (sum, sum of squares, count, min, max) over the values
recorded since the last log; at log time one all-reduce per statistic makes them global, so
a logged mean is the mean over all ranks' values (not the mean of rank-local means) and a
logged std is the std of all values.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Tuple, Union

import torch

from .collator import SOURCE_CODES, SOURCES

Values = Union[torch.Tensor, Iterable[float], float]

# What a metric reports: {statistic: output name}; statistic in mean, std, min, max, sum,
# sum_per_step (the sum divided by the number of steps since the last log).
Report = Mapping[str, str]


class MetricsAccumulator:
    """Accumulates values per metric name; :meth:`reduce` returns the logged numbers."""

    def __init__(self) -> None:
        self._stats: Dict[str, List[float]] = {}
        self._reports: Dict[str, Dict[str, str]] = {}
        self.steps = 0

    def add(self, name: str, values: Values, report: Report) -> None:
        """Record ``values`` (a tensor, a list or a number; NaN values are skipped) under
        ``name``; ``report`` says what is logged. A metric recorded with no value still takes
        part in the reduction (its count stays 0 and nothing is logged for it)."""
        if isinstance(values, torch.Tensor):
            data = values.detach().to(torch.float64).flatten().tolist()
        elif isinstance(values, (int, float)):
            data = [float(values)]
        else:
            data = [float(v) for v in values]
        data = [v for v in data if not math.isnan(v)]
        stats = self._stats.setdefault(name, [0.0, 0.0, 0.0, math.inf, -math.inf])
        self._reports.setdefault(name, {}).update(report)
        if data:
            stats[0] += sum(data)
            stats[1] += sum(v * v for v in data)
            stats[2] += len(data)
            stats[3] = min(stats[3], min(data))
            stats[4] = max(stats[4], max(data))

    def add_ratio(self, name: str, numerator: float, denominator: float, out: str) -> None:
        """A ratio of totals (e.g. rectified tokens / tokens): logged as
        ``sum(numerator) / sum(denominator)`` over all ranks and steps."""
        self.add(name + "#num", numerator, {"sum": out + "#num"})
        self.add(name + "#den", denominator, {"sum": out + "#den"})

    def step(self) -> None:
        """One optimizer step (or evaluation batch) done: the unit of ``sum_per_step``."""
        self.steps += 1

    def __bool__(self) -> bool:
        return bool(self._stats)

    def reduce(self, device: torch.device) -> Dict[str, float]:
        """The logged numbers over all ranks; clears the accumulator.

        Collective when a process group of two or more ranks exists: every rank must call
        it at the same log (the Trainer logs on every rank).
        """
        dist = torch.distributed
        names = sorted(self._stats)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            # Ranks may have recorded different metrics (a source absent on one rank).
            gathered: List[Tuple[List[str], Dict[str, Dict[str, str]]]] = [
                None
            ] * dist.get_world_size()  # type: ignore[list-item]
            dist.all_gather_object(gathered, (names, self._reports))
            names = sorted({n for ns, _ in gathered for n in ns})
            for _, reports in gathered:
                for n, r in reports.items():
                    self._reports.setdefault(n, {}).update(r)
        table = torch.tensor(
            [self._stats.get(n, [0.0, 0.0, 0.0, math.inf, -math.inf]) for n in names]
            + [[float(self.steps), 0.0, 0.0, 0.0, 0.0]],
            dtype=torch.float64,
            device=device,
        ).reshape(len(names) + 1, 5)
        if distributed:
            sums = table[:, :3].contiguous()
            dist.all_reduce(sums)
            mins = table[:, 3].contiguous().neg()
            dist.all_reduce(mins, op=dist.ReduceOp.MAX)
            maxs = table[:, 4].contiguous()
            dist.all_reduce(maxs, op=dist.ReduceOp.MAX)
            steps = float(sums[-1, 0]) / dist.get_world_size()
            table = torch.cat([sums, (-mins)[:, None], maxs[:, None]], dim=1)
        else:
            steps = float(self.steps)
        rows = table[:-1].tolist()
        out: Dict[str, float] = {}
        for name, (total, squares, count, low, high) in zip(names, rows):
            for statistic, key in self._reports.get(name, {}).items():
                if statistic == "sum":
                    out[key] = total
                elif statistic == "sum_per_step":
                    out[key] = total / max(steps, 1.0)
                elif count == 0:
                    continue
                elif statistic == "mean":
                    out[key] = total / count
                elif statistic == "std":
                    var = (squares - total * total / count) / (count - 1) if count > 1 else 0.0
                    out[key] = math.sqrt(max(var, 0.0))
                elif statistic == "min":
                    out[key] = low
                elif statistic == "max":
                    out[key] = high
        # Ratios of totals.
        for key in [k for k in out if k.endswith("#num")]:
            base = key[: -len("#num")]
            num, den = out.pop(key), out.pop(base + "#den", 0.0)
            if den > 0:
                out[base] = num / den
        self._stats.clear()
        self._reports.clear()
        self.steps = 0
        return out


def record_batch(
    metrics: MetricsAccumulator,
    inputs: Mapping[str, torch.Tensor],
    mask: torch.Tensor,
    stats: Any,
    training: bool,
) -> None:
    """The metrics of one collated batch (see ``GFTTrainer``): rewards and advantages per
    source, zero-std groups, response tokens, and the loss pass's entropy and rectified
    share (``stats``: :class:`gft_kernels.GFTStats` of the trained tokens, or None)."""
    n_tokens = float(mask.sum())
    metrics.add("response_tokens", n_tokens, {"sum_per_step": "response_tokens"})
    if training:
        metrics.add("input_tokens", float(inputs["attention_mask"].sum()), {"sum": "#tokens"})
    if stats is not None:
        metrics.add_ratio("entropy", float(stats.entropy.sum()), n_tokens, "entropy")
        metrics.add_ratio(
            "rectified",
            float(stats.rectified_fraction) * n_tokens,
            n_tokens,
            "rectified_fraction",
        )
    rewards = inputs["rewards"].float().cpu()
    advantages = inputs["advantages"].float().cpu()
    sources = inputs["sources"].cpu()
    groups = inputs["group_ids"].cpu()
    metrics.add("reward", rewards, {"mean": "reward/mean", "std": "reward/std"})
    zero_std = [
        float(bool((rewards[groups == g] == rewards[groups == g][0]).all()))
        for g in groups.unique().tolist()
    ]
    metrics.add("zero_std", zero_std, {"mean": "frac_reward_zero_std"})
    for name in SOURCES:
        pick = sources == SOURCE_CODES[name]
        metrics.add(f"count/{name}", float(pick.sum()), {"sum_per_step": f"num_responses/{name}"})
        metrics.add(
            f"reward/{name}",
            rewards[pick],
            {"mean": f"reward/{name}/mean", "std": f"reward/{name}/std"},
        )
        metrics.add(f"advantage/{name}", advantages[pick], {"mean": f"advantage/{name}/mean"})
