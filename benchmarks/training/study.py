"""The study's jobs and their schedule: pre-train each seed's initial policy, then every
method (full and reduced demonstration budgets) and the cold-start baselines.

Every job is a pure function of its arguments (seeded data, seeded sampling, one torch
thread), so the results do not depend on how many worker processes run them or in which
order they finish: ``--jobs 2`` and ``--jobs 1`` give the same numbers.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from . import methods, run

Job = Tuple[str, Tuple[Any, ...]]


def _call(job: Job) -> Tuple[Job, Any]:
    kind, args = job
    torch.set_num_threads(1)
    _quiet()
    if kind == "pretrain":
        return job, run.pretrain(*args)
    if kind == "method":
        return job, run.method_job(*args)
    return job, run.initial_cold_start(*args)


def _quiet() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)


def _call_indexed(item: Tuple[int, Job]) -> Tuple[int, Job, Any]:
    index, job = item
    return (index, *_call(job))


def _map(jobs: Sequence[Job], workers: int, log: Callable[[str], None]) -> List[Any]:
    """Results of ``jobs`` in their order, run on ``workers`` processes (spawned: the
    parent's torch threads are never forked)."""
    results: Dict[int, Any] = {}
    if workers <= 1:
        for i, job in enumerate(jobs):
            results[i] = _call(job)[1]
            log(_describe(job))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) as pool:
            for i, job, value in pool.imap_unordered(_call_indexed, list(enumerate(jobs))):
                results[i] = value
                log(_describe(job))
    return [results[i] for i in range(len(jobs))]


def _describe(job: Job) -> str:
    kind, args = job
    if kind == "method":
        return f"done: {args[1]} seed {args[0]} demos {args[2]:.0%}"
    return f"done: {kind} seed {args[0]}"


def machine() -> Dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def run_study(cfg: run.Config, workers: int, log: Callable[[str], None] = print) -> Dict:
    """All jobs of ``cfg``; returns the JSON-ready results (timings under ``timing``)."""
    start = time.perf_counter()
    torch.set_num_threads(1)
    _quiet()
    pre = _map([("pretrain", (seed, cfg)) for seed in cfg.seeds], workers, log)
    states = {seed: state for seed, (state, _) in zip(cfg.seeds, pre)}
    jobs: List[Job] = []
    # Longest first (self-sampling methods), so that the last jobs to start are short.
    ordered = sorted(methods.METHODS, key=lambda m: -m.self_samples)
    for seed in cfg.seeds:
        for m in ordered:
            jobs.append(("method", (seed, m.name, 1.0, states[seed], cfg)))
    for seed in cfg.seeds:
        for name in cfg.small_methods:
            jobs.append(("method", (seed, name, cfg.small_fraction, states[seed], cfg)))
        if cfg.cold_start_steps > 0:
            jobs.append(("initial_cold_start", (seed, states[seed], cfg)))
    out = _map(jobs, workers, log)
    runs, cold = [], {}
    for job, value in zip(jobs, out):
        if job[0] == "method":
            runs.append(value)
        else:
            cold[str(job[1][0])] = value
    timing = {"wall_seconds": time.perf_counter() - start, "workers": workers}
    timing["run_seconds"] = {
        f"{r['method']}/{r['seed']}/{r['fraction']}": r.pop("seconds") for r in runs
    }
    return {
        "config": cfg.as_dict(),
        "initial": {str(seed): ev for seed, (_, ev) in zip(cfg.seeds, pre)},
        "runs": runs,
        "initial_cold_start": cold,
        "machine": machine(),
        "timing": timing,
    }
