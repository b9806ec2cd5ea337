"""``python -m benchmarks.chunk_budget``: the fused head at several chunk budgets against
its GEMM floor, round-robin in one process.

Each round runs the floor (``floor:gemm``: the head's three matrix products, unchunked)
and ``fused_linear_gft_loss`` fwd+bwd once per budget, the start rotated every round so
that machine drift hits all of them alike; the first ``--warmup-rounds`` are not timed.
Prints the median and minimum per variant and their ratios to the floor's. A budget is the
bytes of one chunk's logits: each variant runs the default chunking (``chunk_size=None``)
with the CPU/CUDA budget set to it.

Example (the CPU figure in benchmarks/RESULTS.md, about 4 min on 2 cores)::

    python -m benchmarks.chunk_budget --n 2048 --budgets 256,512,1024 --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

import gft_kernels.head as head_module
from benchmarks.cases import QWEN25_05B
from benchmarks.floors import bare_gemms
from gft_kernels import fused_linear_gft_loss


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2048, help="tokens")
    parser.add_argument("--budgets", default="256,512,1024", help="chunk budgets in MiB")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds")
    parser.add_argument("--warmup-rounds", type=int, default=2)
    parser.add_argument("--backend", default="cpu")
    args = parser.parse_args(argv)

    head, n = QWEN25_05B, args.n
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(head.vocab, head.hidden, generator=gen).div_(head.hidden**0.5)
    hidden = torch.randn(n, head.hidden, generator=gen).mul_(2.0)
    weight.requires_grad_(True)
    hidden.requires_grad_(True)
    targets = torch.randint(0, head.vocab, (n,), generator=gen)
    advantages = torch.randn(n, generator=gen)
    floor = bare_gemms()

    def run_floor() -> None:
        floor({"hidden": hidden, "weight": weight}).backward()

    def fused(budget_bytes: int) -> Callable[[], None]:
        def run() -> None:
            saved = dict(head_module._CHUNK_BYTES)
            head_module._CHUNK_BYTES.update(cpu=budget_bytes, cuda=budget_bytes)
            try:
                loss = fused_linear_gft_loss(
                    hidden, weight, targets, advantages, backend=args.backend
                )
                loss.backward()
            finally:
                head_module._CHUNK_BYTES.update(saved)

        return run

    variants: Dict[str, Callable[[], None]] = {"floor:gemm": run_floor}
    for mib in (int(b) for b in args.budgets.split(",")):
        variants[f"{mib} MiB"] = fused(mib << 20)
    names = list(variants)
    samples: Dict[str, List[float]] = {k: [] for k in names}
    for r in range(args.warmup_rounds + args.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            hidden.grad = weight.grad = None
            start = time.perf_counter()
            variants[name]()
            elapsed = time.perf_counter() - start
            if r >= args.warmup_rounds:
                samples[name].append(elapsed)
    floor_median = statistics.median(samples["floor:gemm"])
    floor_min = min(samples["floor:gemm"])
    print(f"{head.model} head (H={head.hidden}, V={head.vocab}), fp32, N={n}, {args.rounds} rounds")
    for name, times in samples.items():
        median = statistics.median(times)
        print(
            f"{name:24s} median {median:7.3f} s ({median / floor_median:.3f}x floor)  "
            f"min {min(times):7.3f} s ({min(times) / floor_min:.3f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
