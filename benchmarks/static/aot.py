"""``python -m benchmarks.static.aot`` (``make aot``): compile every Triton kernel variant
without a GPU.

:mod:`benchmarks.static.variants` lists every compilation the library's wrappers can
launch (``benchmarks.static.records.KernelVariant``, built by the library's own launch
builders); ``--modules`` names other modules with an ``aot_variants()``. Each record is
compiled with ``triton.compile`` for each target architecture (sm_80 and sm_90 by
default), then read (:mod:`benchmarks.static.worker`):

- registers, spills and stack from the ptxas report, local and shared memory from
  ``cuobjdump --dump-resource-usage`` (plus the shared memory Triton allocates itself);
- each hot loop from the SASS (``nvdisasm -g``), paired with its ``for`` statement by the
  source line of its backward branch: instructions per trip over the elements one thread
  handles per trip (``elements_per_iteration / (num_warps * 32)``) gives the instructions
  per element, per pipe (:mod:`benchmarks.static.sass`);
- what that allows on each GPU of the compilation's architecture, per pipe (issue, FP32,
  MUFU, compare), for the loop alone and for whole rows of common vocabulary sizes
  (:mod:`benchmarks.static.machines`: sm_80 on the A100, sm_90 on the H100 and H200).

Exits 1 on a compile failure, a spill, local memory, a loop recorded as compiled that the
SASS lacks (or the reverse), a loop whose loads and stores disagree with its record, or a
loop of a gated dtype (bf16) whose sm_90 ceiling on the H100 (``--gate-machine``) is below
``--min-ceiling`` (0.85); the table and the summary say why
(:mod:`benchmarks.static.report`). ``--report-only`` prints the same and exits 0 (the
peers' kernels, :mod:`benchmarks.static.peers`, are reported, not gated).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing
import os
import pathlib
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Optional, Sequence

from benchmarks.static import machines, report, worker

DEFAULT_ARCHS = (80, 90)
# The library's launches (benchmarks/static/variants.py: the row kernels;
# head_variants.py: the blockwise head's tensor-core kernels); --modules names others.
DEFAULT_MODULES = ("benchmarks.static.variants", "benchmarks.static.head_variants")


def load_variants(modules: Sequence[str]) -> List[Any]:
    """Every module's ``aot_variants()``, concatenated in module order."""
    variants = []
    for name in modules:
        variants.extend(importlib.import_module(name).aot_variants())
    return variants


def run(
    modules: Sequence[str],
    archs: Sequence[int],
    jobs: int,
    name_filters: Optional[Sequence[str]] = None,
    dump_dir: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """Compile and analyse every selected variant for every arch, in ``jobs`` processes."""
    variants = load_variants(modules)
    chosen = [
        i
        for i, v in enumerate(variants)
        if not name_filters or any(f in f"{v.kernel}/{v.variant}" for f in name_filters)
    ]
    tasks = [
        (i, arch)
        for i in chosen
        for arch in archs
        if variants[i].archs is None or arch in variants[i].archs
    ]
    # Batches amortise the disassembler's start-up; several per process balance the load.
    size = max(1, min(32, math.ceil(len(tasks) / (4 * max(1, jobs)))))
    batches = [tasks[i : i + size] for i in range(0, len(tasks), size)]
    rows: List[Dict[str, Any]] = []
    start = time.perf_counter()
    with ProcessPoolExecutor(
        max_workers=max(1, jobs),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=worker.init_worker,
        initargs=(load_variants, list(modules), dump_dir, cache_dir),
    ) as pool:
        futures = [pool.submit(worker.analyse_batch, batch) for batch in batches]
        for future in futures:
            rows.extend(future.result())
            print(
                f"  compiled {len(rows)}/{len(tasks)} ({time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.static.aot", description=__doc__)
    parser.add_argument("--modules", help="comma-separated modules with aot_variants()")
    parser.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)))
    parser.add_argument(
        "--filter",
        action="append",
        help="compile only variants whose 'kernel/variant' contains this (repeatable: any)",
    )
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--min-ceiling", type=float, default=report.MIN_CEILING)
    parser.add_argument(
        "--gate-machine",
        default=machines.GATE_MACHINES[report.GATED_ARCH].name,
        choices=[m.name for m in machines.MACHINES[report.GATED_ARCH]],
        help=f"whose model the sm_{report.GATED_ARCH} bandwidth gate uses",
    )
    parser.add_argument(
        "--no-rows", action="store_true", help="leave out the whole-row ceilings table"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="print the tables and failures, exit 0 (for kernels that are not ours)",
    )
    parser.add_argument("--json", help="write every result (loop histograms included) here")
    parser.add_argument("--dump-dir", help="keep each compilation's SASS and PTX here")
    parser.add_argument(
        "--cache-dir", help="reuse results whose kernel source, options and tool are unchanged"
    )
    parser.add_argument("--breakdown", action="store_true", help="print loop opcode counts")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    args = parser.parse_args(argv)
    modules = args.modules.split(",") if args.modules else list(DEFAULT_MODULES)
    archs = [int(a) for a in args.arch.split(",")]
    if args.list:
        for v in load_variants(modules):
            print(f"{v.kernel}/{v.variant}")
        return 0
    import triton

    print(f"triton {triton.__version__}; modules: {', '.join(modules)}; {args.jobs} jobs")
    rows = run(modules, archs, args.jobs, args.filter, args.dump_dir, args.cache_dir)
    if not rows:
        print(f"no variant matches --filter {args.filter!r}")
        return 1
    gate = dict(machines.GATE_MACHINES)
    gate[report.GATED_ARCH] = machines.BY_NAME[args.gate_machine]
    machines.evaluate(rows, gate)
    print(report.table(rows, args.min_ceiling))
    tensor = report.tensor_table(rows)
    if tensor:
        print(tensor)
    if args.breakdown:
        print(report.breakdown(rows))
    if not args.no_rows:
        print(report.row_table(rows))
    print(report.summary(rows, args.min_ceiling))
    print(report.machines_note(gate))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    failed = [row for row in rows if report.failures(row, args.min_ceiling)]
    if args.report_only:
        print(
            f"make aot (report only): {len(failed)} of {len(rows)} compilations would fail "
            f"the gate, triton {triton.__version__}"
        )
        return 0
    if failed:
        print(
            f"make aot: FAILED ({len(failed)} of {len(rows)} compilations, triton "
            f"{triton.__version__}; reasons above)"
        )
        return 1
    print(f"make aot: ok ({len(rows)} compilations, triton {triton.__version__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
