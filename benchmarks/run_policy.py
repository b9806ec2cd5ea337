"""How many untimed (warm-up) and timed runs an implementation gets on one case.

Warm-up runs until the times are stable, within a time budget. First calls are slow for
reasons a training loop pays once: compilation, lazily built thread pools, and fresh
buffers whose pages fault in on first touch. The allocator can keep that going for several
calls (a toy fused head at N=512, H=256, V=8192 was seen at 205 ms for its first ~9 calls
and 40 ms after), so a fixed single warm-up run is not enough.

*Stable* means the last ``window`` warm-up runs did not beat the best run before them by
more than ``rel_tol``: a downward trend keeps the warm-up going, noise upward (other tenants
of a shared machine) does not. What no sample can show is a long slow plateau that ends
later; the timed phase guards against it by taking samples for at least ``min_timed_s``
(the median then ignores a short tail of slow runs).

The budget bounds the adaptive part: after the mandatory runs (``min_warmup``, e.g. one
for ``torch.compile``'s compilation) a new warm-up run starts only if the time spent so far
plus the last run's time stays within ``warmup_budget_s``. A warm-up that ends on the
budget is reported as not stable (``*`` in the tables).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence


@dataclass(frozen=True)
class RunPolicy:
    """Warm-up and sampling rules of one case (see the module docstring)."""

    # Warm-up runs always made before the adaptive part; 0 with ``adaptive=False``: none
    # at all (cases where one run costs more than ~10 s; the process is warm from the
    # smaller cases before them).
    min_warmup: int = 1
    adaptive: bool = True
    warmup_budget_s: float = 3.0
    window: int = 3
    rel_tol: float = 0.10
    max_warmup: int = 30
    repeats: int = 3  # timed runs at least
    min_timed_s: float = 0.5  # more timed runs while their total is below this ...
    max_repeats: int = 30  # ... up to this many

    def __post_init__(self) -> None:
        if self.window < 1 or self.min_warmup < 0 or self.repeats < 1:
            raise ValueError(f"RunPolicy: window >= 1, min_warmup >= 0, repeats >= 1: {self}")
        if not 0.0 <= self.rel_tol < 1.0:
            raise ValueError(f"RunPolicy.rel_tol: expected a value in [0, 1), got {self.rel_tol}")

    def for_impl(self, impl) -> RunPolicy:
        """This policy with the implementation's own mandatory warm-up (compilation)."""
        needed = max(self.min_warmup, getattr(impl, "min_warmup", 0))
        return self if needed == self.min_warmup else dataclasses.replace(self, min_warmup=needed)

    def wants_timed_run(self, samples_ms: Sequence[float]) -> bool:
        if len(samples_ms) < self.repeats:
            return True
        return len(samples_ms) < self.max_repeats and sum(samples_ms) < 1e3 * self.min_timed_s


def is_stable(samples_ms: Sequence[float], window: int, rel_tol: float) -> bool:
    """The last ``window`` runs did not beat the best earlier run by more than ``rel_tol``."""
    if len(samples_ms) <= window:
        return False
    return min(samples_ms[-window:]) >= (1.0 - rel_tol) * min(samples_ms[:-window])


class Warmup:
    """Adaptive warm-up state of one implementation on one case: feed it run times (ms)."""

    def __init__(self, policy: RunPolicy) -> None:
        self.policy = policy
        self.samples: List[float] = []

    @property
    def stable(self) -> Optional[bool]:
        """None when no adaptive warm-up ran (disabled for the case)."""
        if not self.policy.adaptive:
            return None
        return is_stable(self.samples, self.policy.window, self.policy.rel_tol)

    def needs_more(self) -> bool:
        p = self.policy
        n = len(self.samples)
        if n < p.min_warmup:
            return True
        if not p.adaptive or n >= max(p.max_warmup, p.min_warmup):
            return False
        if is_stable(self.samples, p.window, p.rel_tol):
            return False
        # Adaptive part: time spent after the mandatory runs, plus the next run's likely
        # cost (the last run's), must stay within the budget.
        spent_ms = sum(self.samples[p.min_warmup :])
        last_ms = self.samples[-1] if self.samples else 0.0
        return spent_ms + last_ms <= 1e3 * p.warmup_budget_s

    def add(self, ms: float) -> None:
        self.samples.append(ms)
