"""``python -m benchmarks.chunk_budget``: the fused head at several chunk budgets against
its GEMM floor, round-robin in one process.

The suite's own machinery does the work: the inputs of the suite's fused case for the
Qwen2.5-0.5B head (``benchmarks.cases``), the ``floor:gemm`` and ``gft:<backend>``
loss functions (``benchmarks.implementations``) and the round-robin timing of
``benchmarks.measure.time_case`` with a fixed number of untimed and timed rounds. A budget
is the bytes of one chunk's logits: each variant runs the default chunking
(``chunk_size=None``) with the head's budget set to it. Prints the median and minimum per
variant and their ratios to the floor's.

Example (the CPU figure in benchmarks/RESULTS.md, about 4 min on 2 cores)::

    python -m benchmarks.chunk_budget --n 2048 --budgets 256,512,1024 --rounds 4
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from typing import List, Tuple

import torch

import gft_kernels._head as head_module
from benchmarks.cases import QWEN25_05B, Case
from benchmarks.implementations import IMPL_BY_NAME, Impl, LossFn, build
from benchmarks.measure import CaseSetup, time_case
from benchmarks.run_policy import RunPolicy


def with_budget(fn: LossFn, budget_bytes: int) -> LossFn:
    """``fn`` run with the fused head's default chunk budget set to ``budget_bytes``."""

    def run(x):
        saved = dict(head_module._CHUNK_BYTES)
        head_module._CHUNK_BYTES.update(cpu=budget_bytes, cuda=budget_bytes)
        try:
            return fn(x)
        finally:
            head_module._CHUNK_BYTES.update(saved)

    return run


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2048, help="tokens")
    parser.add_argument("--budgets", default="256,512,1024", help="chunk budgets in MiB")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds")
    parser.add_argument("--warmup-rounds", type=int, default=2)
    parser.add_argument("--backend", default="cpu")
    args = parser.parse_args(argv)

    head = QWEN25_05B
    case = Case(op="fused_linear_gft_loss", n=args.n, vocab=head.vocab, head=head)
    if args.n <= 0 or args.n % case.seq_len:
        parser.error(f"--n: expected a positive multiple of {case.seq_len} tokens, got {args.n}")
    floor = IMPL_BY_NAME["floor:gemm"]
    ours = IMPL_BY_NAME[f"gft:{args.backend}"]
    impls: List[Tuple[Impl, LossFn]] = [(floor, build(floor, case))]
    for mib in (int(b) for b in args.budgets.split(",")):
        name = f"{ours.name} {mib} MiB"
        impls.append(
            (dataclasses.replace(ours, name=name), with_budget(build(ours, case), mib << 20))
        )
    policy = RunPolicy(
        min_warmup=args.warmup_rounds,
        adaptive=False,
        repeats=args.rounds,
        max_repeats=args.rounds,
    )
    timings = time_case(CaseSetup(case, torch.device("cpu"), False), impls, policy)

    errors = {name: t.error for name, t in timings.items() if t.error}
    if errors:
        print(errors)
        return 1
    floor_ms = timings[floor.name].fwd_bwd
    print(f"{case.name}: {args.rounds} timed rounds after {args.warmup_rounds} untimed")
    for name, timing in timings.items():
        median, best = statistics.median(timing.fwd_bwd), min(timing.fwd_bwd)
        print(
            f"{name:20s} median {median / 1e3:7.3f} s "
            f"({median / statistics.median(floor_ms):.3f}x floor)  "
            f"min {best / 1e3:7.3f} s ({best / min(floor_ms):.3f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
