"""Timing and peak-memory measurement.

Time: one *run* is the loss call (``fwd``) followed by ``loss.backward()`` (``bwd``); ``fwd+bwd``
is the wall time of both. On CUDA the three marks are CUDA events (no host sync inside the
run); on CPU they are ``time.perf_counter`` readings. The implementations of a case run
round-robin, one run each per round with the start rotated every round, so that machine drift
(thermal, other tenants of a VM) hits all of them alike: first the warm-up until stable, then
the timed runs (how many of each: :mod:`benchmarks.run_policy`). Every sample is kept; tables
report the median.

Peak memory, fwd+bwd, over the baseline after setup (inputs allocated, gradients cleared):

* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` at the start, in the benchmark process.
* CPU: in a fresh subprocess per (case, implementation) (``python -m benchmarks.memory_probe``)
  because a process's allocator keeps what earlier runs freed. After setup the probe reads
  VmRSS as the baseline, resets the peak-RSS high-water mark (writing ``5`` to
  ``/proc/self/clear_refs``), runs fwd+bwd and reads VmHWM. Where the reset is not allowed, a
  thread samples VmRSS every millisecond instead (it can miss spikes shorter than that).
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.cases import Case, grad_inputs, make_inputs
from benchmarks.implementations import Impl, Inputs, LossFn
from benchmarks.run_policy import RunPolicy, Warmup

REPO_ROOT = Path(__file__).resolve().parent.parent
MB = 1024.0 * 1024.0


@dataclass
class ImplTiming:
    """Samples (ms) of one implementation on one case, or why it has none."""

    fwd: List[float] = field(default_factory=list)
    bwd: List[float] = field(default_factory=list)
    fwd_bwd: List[float] = field(default_factory=list)
    warmup: List[float] = field(default_factory=list)  # fwd+bwd of the untimed runs
    warmup_stable: Optional[bool] = None  # None: no adaptive warm-up for this case
    loss: Optional[float] = None  # loss value of the first run (before any input mutation)
    error: Optional[str] = None


# --------------------------------------------------------------------------- allocator

# mallopt parameters (malloc.h) and glibc's largest dynamic mmap threshold on 64-bit.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
STEADY_MMAP_THRESHOLD = 32 << 20


def settle_allocator() -> Optional[str]:
    """Start glibc's malloc in the state a long-running process reaches on its own.

    glibc serves large blocks with mmap and raises that threshold each time it frees such a
    block, up to 32 MiB (the trim threshold follows at twice that). Until it has risen, the
    same buffers come back as fresh pages that fault in on first touch, call after call;
    this ramp is one cause of slow first calls. Setting both thresholds to their final values
    skips it without changing the steady state: blocks up to 32 MiB are reused from the
    heap, larger ones are still mapped per allocation (what a training loop pays too).
    Returns a description for the results' metadata; None where this is not glibc or the
    environment already sets the thresholds.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, 2 * STEADY_MMAP_THRESHOLD) == 1
    except (OSError, AttributeError):
        return None
    if not ok:
        return None
    return "glibc mmap threshold 32 MiB, trim threshold 64 MiB (their steady state)"


# --------------------------------------------------------------------------- one run


class CaseSetup:
    """The inputs of a case, their gradient leaves and, if needed, pristine copies."""

    def __init__(self, case: Case, device: torch.device, keep_pristine: bool) -> None:
        self.case = case
        self.device = device
        self.inputs: Inputs = make_inputs(case, device)
        self.leaves = [self.inputs[name].requires_grad_(True) for name in grad_inputs(case)]
        # Copies to undo an implementation that writes into its inputs (Liger's CE, in-place
        # backward); restoring happens outside the timed region.
        self.pristine: Dict[str, torch.Tensor] = (
            {name: self.inputs[name].detach().clone() for name in grad_inputs(case)}
            if keep_pristine
            else {}
        )

    def reset(self, restore: bool) -> None:
        for leaf in self.leaves:
            leaf.grad = None  # like optimizer.zero_grad(set_to_none=True)
        if restore and self.pristine:
            with torch.no_grad():
                for name, src in self.pristine.items():
                    self.inputs[name].copy_(src)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(fn: LossFn, setup: CaseSetup, restore: bool) -> Tuple[float, float, float, float]:
    """One fwd+bwd run: ``(fwd_ms, bwd_ms, fwd_bwd_ms, loss)``."""
    setup.reset(restore)
    device = setup.device
    if device.type == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        _sync(device)
        marks[0].record()
        loss = fn(setup.inputs)
        marks[1].record()
        loss.backward()
        marks[2].record()
        marks[2].synchronize()
        fwd = marks[0].elapsed_time(marks[1])
        bwd = marks[1].elapsed_time(marks[2])
    else:
        t0 = time.perf_counter()
        loss = fn(setup.inputs)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        fwd, bwd = (t1 - t0) * 1e3, (t2 - t1) * 1e3
    value = float(loss.detach().float())
    del loss
    return fwd, bwd, fwd + bwd, value


def time_case(
    setup: CaseSetup,
    impls: Sequence[Tuple[Impl, LossFn]],
    policy: RunPolicy,
    on_run: Optional[Callable[[str, str], None]] = None,
) -> Dict[str, ImplTiming]:
    """Warm-up until stable, then timed runs; both round-robin over ``impls``.

    Each round runs every implementation that still needs a run once, the start rotated
    from round to round. An error ends that implementation only (reported in the table).
    """
    out = {impl.name: ImplTiming() for impl, _ in impls}
    active = list(impls)

    def attempt(impl: Impl, fn: LossFn, phase: str) -> Optional[Tuple[float, ...]]:
        if on_run is not None:
            on_run(impl.name, phase)
        try:
            return run_once(fn, setup, restore=impl.mutates_inputs)
        except Exception as err:  # reported in the table; the other impls go on
            out[impl.name].error = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            active[:] = [(i, f) for i, f in active if i.name != impl.name]
            gc.collect()  # what the failed run left in reference cycles
            return None
        finally:
            # Young generations only: a full collection costs ~0.1 s with torch loaded, more
            # than many runs; tensors are freed by reference counting anyway.
            gc.collect(1)

    def rounds(wants_run: Callable[[Impl], bool]):
        r = 0
        while True:
            todo = [(i, f) for i, f in active if wants_run(i)]
            if not todo:
                return
            shift = r % len(todo)
            yield todo[shift:] + todo[:shift]
            r += 1

    gc.collect()
    warm = {impl.name: Warmup(policy.for_impl(impl)) for impl, _ in impls}
    for order in rounds(lambda i: warm[i.name].needs_more()):
        for impl, fn in order:
            if all(i.name != impl.name for i, _ in active):
                continue
            result = attempt(impl, fn, f"warm-up {len(warm[impl.name].samples) + 1}")
            if result is None:
                continue
            warm[impl.name].add(result[2])
            if out[impl.name].loss is None:
                out[impl.name].loss = result[3]
    for impl, _ in impls:
        out[impl.name].warmup = list(warm[impl.name].samples)
        out[impl.name].warmup_stable = warm[impl.name].stable

    gc.collect()

    def wants_timed(impl: Impl) -> bool:
        return policy.wants_timed_run(out[impl.name].fwd_bwd)

    for order in rounds(wants_timed):
        for impl, fn in order:
            if all(i.name != impl.name for i, _ in active):
                continue
            timing = out[impl.name]
            result = attempt(impl, fn, f"run {len(timing.fwd_bwd) + 1}")
            if result is None:
                continue
            timing.fwd.append(result[0])
            timing.bwd.append(result[1])
            timing.fwd_bwd.append(result[2])
            if timing.loss is None:
                timing.loss = result[3]
    return out


# --------------------------------------------------------------------------- CPU memory


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        match = re.search(rf"^{key}:\s+(\d+) kB", fh.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"{key} not in /proc/self/status")
    return int(match.group(1))


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; True if the kernel allowed it and it took effect."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        # The reset sets HWM to the current RSS; allow for pages touched in between.
        return _proc_status_kb("VmHWM") <= _proc_status_kb("VmRSS") + 1024
    except OSError:
        return False


class _RssSampler(threading.Thread):
    """Fallback: VmRSS sampled every millisecond while the run executes."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kb = _proc_status_kb("VmRSS")
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_kb = max(self.peak_kb, _proc_status_kb("VmRSS"))
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak_kb, _proc_status_kb("VmRSS"))


def peak_rss_during(run: Callable[[], None]) -> Dict[str, object]:
    """Peak RSS of this process during ``run()`` over the RSS just before it."""
    gc.collect()
    baseline_kb = _proc_status_kb("VmRSS")
    if _reset_hwm():
        run()
        peak_kb = _proc_status_kb("VmHWM")
        method = "VmHWM after clear_refs reset"
    else:
        sampler = _RssSampler()
        sampler.start()
        try:
            run()
        finally:
            peak_kb = sampler.stop()
        method = "VmRSS sampled every 1 ms"
    return {
        "peak_mb": max(0, peak_kb - baseline_kb) / 1024.0,
        "baseline_mb": baseline_kb / 1024.0,
        "method": method,
    }


def probe_memory_subprocess(
    case: Case,
    impls: Sequence[Impl],
    *,
    device: str,
    threads: int,
    warmup: int,
    timeout_s: float = 1800.0,
) -> Dict[str, Dict[str, object]]:
    """Run ``python -m benchmarks.memory_probe`` for ``impls`` on one case, in turn.

    The full run gives each implementation a process of its own (one item in ``impls``);
    ``--quick`` measures all of a case's implementations in one process. Returns a result
    (or ``{"error": ...}``) per implementation name.
    """
    cmd = [sys.executable, "-m", "benchmarks.memory_probe", "--case", case.to_spec()]
    for impl in impls:
        cmd += ["--impl", impl.name]
    cmd += ["--device", device, "--threads", str(threads), "--warmup", str(warmup)]
    env = dict(os.environ)
    # The probe imports this checkout (benchmarks and gft_kernels) wherever it is run from.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    # A fixed mmap threshold turns off glibc's dynamic one, which after the warm-up frees a
    # buffer would serve the next buffers of that size from already-resident heap memory:
    # with it, every large tensor is mapped when allocated and unmapped when freed, so RSS
    # follows the live tensors.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    # Two probes may run side by side, each with all cores' worth of OpenMP threads: busy-
    # waiting threads of one probe would then starve the other (a 2 s probe took 26 s on a
    # 2-core machine). A probe measures memory, not time, so passive waiting costs nothing.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    start = time.perf_counter()
    names = [impl.name for impl in impls]
    try:
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {
            name: {"error": f"memory probe timed out after {timeout_s:.0f} s"} for name in names
        }
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            found[result.get("impl")] = result
    wall = time.perf_counter() - start
    tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    out: Dict[str, Dict[str, object]] = {}
    for name in names:
        if name in found:
            out[name] = {**found[name], "probe_wall_s": wall, "probe_impls": len(names)}
        else:
            out[name] = {"error": f"memory probe failed (rc={proc.returncode}): {tail[-300:]}"}
    return out


# --------------------------------------------------------------------------- CUDA memory


def probe_memory_cuda(fn: LossFn, setup: CaseSetup, restore: bool) -> Dict[str, object]:
    """Peak allocated CUDA memory of one fwd+bwd over the post-setup baseline."""
    setup.reset(restore)
    gc.collect()
    torch.cuda.synchronize(setup.device)
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(setup.device)
    torch.cuda.reset_peak_memory_stats(setup.device)
    loss = fn(setup.inputs)
    loss.backward()
    del loss
    torch.cuda.synchronize(setup.device)
    peak = torch.cuda.max_memory_allocated(setup.device)
    return {
        "peak_mb": max(0, peak - baseline) / MB,
        "baseline_mb": baseline / MB,
        "method": "torch.cuda.max_memory_allocated",
    }
