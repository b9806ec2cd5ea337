"""Peak memory of one (case, implementation) fwd+bwd, in a process of its own.

Run by the benchmark runner as ``python -m benchmarks.memory_probe --case SPEC --impl NAME``
(``SPEC``: the JSON of :meth:`benchmarks.cases.Case.to_spec`);
prints one JSON line: ``{"peak_mb", "baseline_mb", "method", ...}``. A fresh process matters on
the CPU: the allocator of a process that already ran other implementations keeps some of what
they freed, which would blur both the baseline and the peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

import torch

from benchmarks.cases import Case
from benchmarks.implementations import IMPL_BY_NAME, build
from benchmarks.measure import CaseSetup, peak_rss_during, probe_memory_cuda, run_once


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", required=True, help="the case, as Case.to_spec() writes it")
    parser.add_argument("--impl", required=True, choices=sorted(IMPL_BY_NAME))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: keep)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed runs before measuring")
    args = parser.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    case, impl = Case.from_spec(args.case), IMPL_BY_NAME[args.impl]
    device = torch.device(args.device)
    fn = build(impl, case)
    setup = CaseSetup(case, device, keep_pristine=impl.mutates_inputs)
    start = time.perf_counter()
    for _ in range(max(args.warmup, impl.min_warmup)):
        run_once(fn, setup, restore=impl.mutates_inputs)
    warmup_s = time.perf_counter() - start
    setup.reset(restore=impl.mutates_inputs)

    if device.type == "cuda":
        result = probe_memory_cuda(fn, setup, restore=impl.mutates_inputs)
    else:

        def run() -> None:
            loss = fn(setup.inputs)
            loss.backward()

        result = peak_rss_during(run)
    result.update({"case": case.name, "impl": impl.name, "warmup_s": warmup_s})
    print(json.dumps(result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
