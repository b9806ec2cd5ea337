"""Command line of the benchmark suite: ``python -m benchmarks [--quick] [--filter S] ...``.

For every case it warms all implementations up until their times are stable, times them
side by side (round-robin), measures their peak memory, prints one table per case group with
the ratios to the naive and careful PyTorch peers and to the case's floor, checks the
targets of :mod:`benchmarks.targets` that the run covers, and writes ``results.json``,
``results.md`` and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks import report
from benchmarks.cases import CASE_SETS, Case
from benchmarks.gpu_check import git_commit
from benchmarks.implementations import (
    Impl,
    LossFn,
    build,
    cce_version,
    impls_for,
    liger_version,
    native_cpu_reason,
    skip_reason,
)
from benchmarks.measure import (
    CaseSetup,
    ImplTiming,
    probe_memory_cuda,
    probe_memory_subprocess,
    settle_allocator,
    time_case,
)
from benchmarks.run_policy import RunPolicy
from benchmarks.targets import format_targets

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
# The code whose speed is measured: uncommitted changes there make the commit id "+dirty".
MEASURED_PATHS = ("gft_kernels", "csrc")
# A probe run is warmed up first only when it is cheap: first-call costs (thread pools, lazy
# initialisation) are small against a run of seconds, and a second run of a multi-second case
# would double the probe's time.
PROBE_WARMUP_BELOW_MS = 2000.0
# CPU memory probes run two at a time when one N x V fp32 buffer is at most this big.
PARALLEL_PROBES, PARALLEL_PROBES_MAX_LOGITS_BYTES = 2, 3 << 29
# Warm-up and sampling (benchmarks.run_policy). CPU: a warm-up budget of a few seconds per
# implementation and case, at least ~0.5 s of timed samples. CUDA runs take milliseconds:
# more runs cost nothing there, and the tolerance can be tighter.
CPU_POLICY = RunPolicy(warmup_budget_s=3.0, rel_tol=0.10, min_timed_s=0.5, max_repeats=30)
QUICK_POLICY = RunPolicy(warmup_budget_s=0.5, rel_tol=0.10, min_timed_s=0.2, max_repeats=8)
CUDA_POLICY = RunPolicy(
    min_warmup=3,
    warmup_budget_s=2.0,
    window=5,
    rel_tol=0.05,
    max_warmup=200,
    repeats=20,
    min_timed_s=0.2,
    max_repeats=200,
)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_total_gb() -> Optional[float]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return None


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def collect_meta(device: torch.device, threads: int, argv: Sequence[str]) -> dict:
    import gft_kernels

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks"] + list(argv)),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": threads,
        "memory_gb": _memory_total_gb(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": liger_version(),
        "cut_cross_entropy": cce_version(),
        "gft_kernels": getattr(gft_kernels, "__version__", None),
        "git_commit": git_commit(MEASURED_PATHS),
        "native_cpu_kernel": None,
        # Other processes on the machine skew CPU timings: the load average says how busy it was.
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cpu":
        meta["native_cpu_kernel"] = native_cpu_reason() or "available"
    else:
        from benchmarks.floors import device_copy_bandwidth

        meta["copy_bytes_per_s"] = device_copy_bandwidth(device)
    return meta


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark the GFT loss: naive reference, torch.compile, gft_kernels "
        "backends and Liger-Kernel, side by side (time and peak memory).",
    )
    parser.add_argument("--quick", action="store_true", help="small cases, few repeats")
    parser.add_argument(
        "--cases",
        choices=sorted(CASE_SETS),
        default=None,
        help="case set (default: full, or quick with --quick); gpu-check: bf16 at "
        "V=151936, N 4096-16384, what make gpu-check runs",
    )
    parser.add_argument("--filter", default=None, help="run the cases whose name contains this")
    parser.add_argument(
        "--impls", default=None, help="comma-separated implementations to run (default: all)"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: cuda if available, else cpu",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results.json and plots")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: all usable cores)"
    )
    parser.add_argument(
        "--repeats", type=int, default=0, help="exactly this many timed runs per case"
    )
    parser.add_argument(
        "--warmup-budget",
        type=float,
        default=None,
        metavar="S",
        help="seconds of adaptive warm-up per implementation and case (default: 3 on CPU, "
        "0.5 with --quick, 2 on CUDA)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--list", action="store_true", help="list the case names and exit")
    parser.add_argument(
        "--targets", action="store_true", help="print the performance targets table and exit"
    )
    parser.add_argument(
        "--replot",
        action="store_true",
        help="no runs: print the tables and redraw the plots from OUT/results.json",
    )
    return parser.parse_args(argv)


def select_cases(args: argparse.Namespace, device: str) -> List[Case]:
    cases = CASE_SETS[args.cases or ("quick" if args.quick else "full")]()
    cases = [c for c in cases if device in c.devices]
    if args.filter:
        cases = [c for c in cases if args.filter in c.name]
    return cases


def run_policy(case: Case, device: torch.device, args: argparse.Namespace) -> RunPolicy:
    """Warm-up and sampling of ``case``: the device's policy with the case's counts."""
    if device.type == "cuda":
        # Every case runs in milliseconds on a GPU: always an adaptive warm-up.
        base = CUDA_POLICY
        changes = {"repeats": max(case.repeats, base.repeats)}
    else:
        base = QUICK_POLICY if args.quick else CPU_POLICY
        changes = {
            "min_warmup": case.warmup,
            "adaptive": case.warmup > 0,
            "repeats": case.repeats,
        }
    if args.repeats > 0:  # an exact count
        changes.update(repeats=args.repeats, max_repeats=args.repeats, min_timed_s=0.0)
    if args.warmup_budget is not None:
        changes["warmup_budget_s"] = args.warmup_budget
    return dataclasses.replace(base, **changes)


def _entry(impl: Impl, status: str, reason: Optional[str] = None) -> dict:
    return {
        "status": status,
        "reason": reason,
        "ours": impl.ours,
        "floor": impl.floor,
        "description": impl.description,
        "samples_ms": {phase: [] for phase in report.PHASES},
        "warmup_ms": [],
        "warmup_stable": None,
        "median_ms": {phase: None for phase in report.PHASES},
        "loss": None,
        "memory": None,
    }


def _cpu_memory_probes(
    case: Case,
    ok: Sequence[Tuple[Impl, LossFn]],
    entries: Dict[str, dict],
    threads: int,
    progress,
    batched: bool,
) -> None:
    """Peak memory in subprocesses: one per implementation, two at a time when the case is
    small enough; with ``batched`` (``--quick``) one process for all of the case's.

    A probe measures its own process's RSS, so running two side by side does not change the
    figures; it halves the start-up overhead (interpreter, torch import) of the full run.
    Cases whose naive run alone needs most of the RAM are probed one at a time.
    """
    impls = [impl for impl, _ in ok]
    if not impls:
        return

    def probe(group: List[Impl]) -> Dict[str, dict]:
        slowest_ms = max((entries[i.name]["median_ms"]["fwd_bwd"] or 0.0) for i in group)
        return probe_memory_subprocess(
            case,
            group,
            device="cpu",
            threads=threads,
            warmup=1 if slowest_ms < PROBE_WARMUP_BELOW_MS else 0,
        )

    if batched:
        progress.set_postfix_str("memory probe (all implementations)", refresh=True)
        for name, result in probe(impls).items():
            entries[name]["memory"] = result
        return
    logits_bytes = case.n * case.vocab * 4  # fp32 N x V: the naive peak is a few of these
    workers = PARALLEL_PROBES if logits_bytes <= PARALLEL_PROBES_MAX_LOGITS_BYTES else 1
    progress.set_postfix_str(f"memory probes ({workers} at a time)", refresh=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for results in pool.map(probe, [[impl] for impl in impls]):
            for name, result in results.items():
                entries[name]["memory"] = result


def run_case(
    case: Case,
    device: torch.device,
    args: argparse.Namespace,
    threads: int,
    progress,
) -> dict:
    wanted = set(args.impls.split(",")) if args.impls else None
    entries: Dict[str, dict] = {}
    active: List[Tuple[Impl, LossFn]] = []
    for impl in impls_for(case.op):
        if wanted is not None and impl.name not in wanted:
            continue
        reason = skip_reason(impl, case, device, args.quick)
        if reason is None:
            try:
                active.append((impl, build(impl, case)))
                entries[impl.name] = _entry(impl, "ok")
                continue
            except Exception as err:  # a broken import is a row of the table, not a crash
                reason = f"{type(err).__name__}: {err}"
        entries[impl.name] = _entry(impl, "skipped", reason)

    policy = run_policy(case, device, args)
    setup = CaseSetup(case, device, keep_pristine=any(i.mutates_inputs for i, _ in active))

    def on_run(name: str, phase: str) -> None:
        progress.set_postfix_str(f"{name} {phase}", refresh=True)

    timings: Dict[str, ImplTiming] = time_case(setup, active, policy, on_run=on_run)
    for impl, _ in active:
        timing, entry = timings[impl.name], entries[impl.name]
        entry["samples_ms"] = {"fwd": timing.fwd, "bwd": timing.bwd, "fwd_bwd": timing.fwd_bwd}
        entry["median_ms"] = {p: report.median(entry["samples_ms"][p]) for p in report.PHASES}
        entry["warmup_ms"] = timing.warmup
        entry["warmup_stable"] = timing.warmup_stable
        entry["loss"] = timing.loss
        if timing.error is not None:
            entry["status"], entry["reason"] = "error", timing.error

    # Floors are bounds on time; their buffers say nothing about a loss's memory.
    ok = [
        (impl, fn) for impl, fn in active if entries[impl.name]["status"] == "ok" and not impl.floor
    ]
    if not args.no_memory:
        if device.type == "cuda":
            for impl, fn in ok:
                progress.set_postfix_str(f"{impl.name} memory", refresh=True)
                entries[impl.name]["memory"] = probe_memory_cuda(fn, setup, impl.mutates_inputs)
        del setup
        gc.collect()  # the CPU probes below need the RAM this process held for the inputs
        if device.type == "cpu":
            _cpu_memory_probes(case, ok, entries, threads, progress, batched=args.quick)
    return {"case": case.to_json(), "impls": entries}


def write_outputs(meta: dict, results: List[dict], out: Path, plots: bool = True) -> None:
    """Ratios, terminal tables, target checks, results.json, results.md and the plots."""
    report.add_ratios(results)
    print()
    print(report.format_tables(results))
    print(report.LEGEND)
    print(
        "peak = fwd+bwd peak over the inputs "
        f"({'CUDA allocator' if meta['device'] == 'cuda' else 'RSS, in a fresh subprocess'})."
    )
    print(report.loss_check_line(results))
    targets = report.target_lines(results, meta["device"])
    if targets:
        print("\nTargets covered by this run (python -m benchmarks --targets lists them all):")
        for line in targets:
            print("  " + line)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    report.write_json(written[0], meta, results)
    report.write_markdown(written[1], meta, results, targets)
    if plots:
        where = meta.get("device_name") or meta.get("cpu_model")
        label = f"{meta['device']}: {where}, {meta['torch_threads']} threads"
        written += report.write_plots(out, results, label)
    print("".join(f"\nwrote {p}" for p in written))
    if meta.get("wall_s") is not None:
        print(f"total {meta['wall_s']:.0f} s")


def replot(out: Path) -> int:
    """``--replot``: tables, Markdown and plots again from ``out/results.json``."""
    path = out / "results.json"
    if not path.is_file():
        print(f"--replot: {path} does not exist", file=sys.stderr)
        return 2
    data = json.loads(path.read_text())
    write_outputs(data["meta"], data["results"], out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.targets:
        print(format_targets())
        return 0
    if args.replot:
        return replot(args.out)
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cases = select_cases(args, device_name)
    if args.list:
        for case in cases:
            print(case.name)
        return 0
    if not cases:
        print(f"no case matches --filter {args.filter!r} (see --list)", file=sys.stderr)
        return 2
    if device_name == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    device = torch.device(device_name)
    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    allocator = settle_allocator()

    from tqdm import tqdm

    start = time.perf_counter()
    meta = collect_meta(device, threads, argv)  # builds the native CPU kernel if needed
    meta["allocator"] = allocator
    where = meta["device_name"] if device.type == "cuda" else meta["cpu_model"]
    print(
        f"device: {device.type} ({where}); {meta['usable_cores']} usable cores; "
        f"torch.set_num_threads({threads}) (all usable cores unless --threads)"
    )
    print(
        f"torch {meta['torch']}, triton {meta['triton']}, liger-kernel "
        f"{meta['liger_kernel']}, native CPU kernel: {meta['native_cpu_kernel']}"
    )
    print(f"{len(cases)} cases{' (--quick)' if args.quick else ''}; out: {args.out}")
    sys.stdout.flush()

    results: List[dict] = []
    # One step per case: how many runs a case takes is known only once its times are stable.
    with tqdm(total=len(cases), file=sys.stderr, unit="case", dynamic_ncols=True) as progress:
        for case in cases:
            progress.set_description(case.name)
            case_start = time.perf_counter()
            results.append(run_case(case, device, args, threads, progress))
            results[-1]["wall_s"] = time.perf_counter() - case_start
            progress.update(1)

    meta["wall_s"] = time.perf_counter() - start
    meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    write_outputs(meta, results, args.out, plots=not args.no_plots)
    return 0
