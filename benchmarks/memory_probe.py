"""Peak memory of fwd+bwd for one case, in a process of its own.

Run by the benchmark runner as ``python -m benchmarks.memory_probe --case SPEC --impl NAME``
(``SPEC``: the JSON of :meth:`benchmarks.cases.Case.to_spec`); prints one JSON line per
implementation: ``{"peak_mb", "baseline_mb", "method", "impl", ...}``. A fresh process matters
on the CPU: the allocator of a process that already ran other implementations keeps some of
what they freed, which would blur both the baseline and the peak. ``--impl`` may be repeated
(``--quick`` does, to save process start-ups): the implementations are then measured in turn,
each against the RSS just before its run; with the fixed mmap threshold the runner sets,
large tensors are unmapped when freed, so what remains of an earlier one is small.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

import torch

from benchmarks.cases import Case
from benchmarks.implementations import IMPL_BY_NAME, LossFn, build
from benchmarks.measure import CaseSetup, peak_rss_during, probe_memory_cuda, run_once


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", required=True, help="the case, as Case.to_spec() writes it")
    parser.add_argument(
        "--impl", required=True, action="append", choices=sorted(IMPL_BY_NAME), help="repeatable"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: keep)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed runs before measuring")
    args = parser.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    case = Case.from_spec(args.case)
    impls = [IMPL_BY_NAME[name] for name in args.impl]
    device = torch.device(args.device)
    setup = CaseSetup(case, device, keep_pristine=any(i.mutates_inputs for i in impls))
    for impl in impls:
        fn = build(impl, case)
        start = time.perf_counter()
        for _ in range(max(args.warmup, impl.min_warmup)):
            run_once(fn, setup, restore=impl.mutates_inputs)
        warmup_s = time.perf_counter() - start
        setup.reset(restore=impl.mutates_inputs)

        if device.type == "cuda":
            result = probe_memory_cuda(fn, setup, restore=impl.mutates_inputs)
        else:

            def run(fn: LossFn = fn) -> None:
                loss = fn(setup.inputs)
                loss.backward()

            result = peak_rss_during(run)
        result.update({"case": case.name, "impl": impl.name, "warmup_s": warmup_s})
        print(json.dumps(result))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
