"""pytest-benchmark configuration of the benchmark tests (``pytest benchmarks``).

Kernels run natively: CUDA when there is a device, else the CPU backends. The Triton
interpreter (``TRITON_INTERPRET``) is deliberately not set here; it is a correctness tool and
the Triton rows are skipped on a CPU-only machine with the reason.

Each benchmark is warmed up as the runner does (until its fwd+bwd times are stable, within a
time budget: :mod:`benchmarks.run_policy`) before pytest-benchmark's timed rounds.
"""

from __future__ import annotations

from typing import Callable, Dict

import pytest
import torch

from benchmarks.cases import Case
from benchmarks.implementations import Impl, build, skip_reason
from benchmarks.measure import CaseSetup, run_once, settle_allocator
from benchmarks.run_policy import RunPolicy, Warmup
from benchmarks.runner import usable_cores

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 5
WARMUP = RunPolicy(min_warmup=1, warmup_budget_s=2.0)


def pytest_configure(config: pytest.Config) -> None:
    # All usable cores and the allocator's steady state, as the runner does; the benchmark
    # JSON records the thread count.
    torch.set_num_threads(usable_cores())
    settle_allocator()


@pytest.fixture(scope="module")
def case_setups() -> Dict[str, CaseSetup]:
    """Inputs per case, built once per test module and shared by its implementations."""
    return {}


@pytest.fixture
def run_benchmark(benchmark, case_setups: Dict[str, CaseSetup]) -> Callable:
    """Benchmark one (case, implementation, phase) with bounded pedantic rounds."""

    def run(case: Case, impl: Impl, phase: str) -> None:
        reason = skip_reason(impl, case, DEVICE, quick=False)
        if reason is not None:
            pytest.skip(reason)
        fn = build(impl, case)
        if case.name not in case_setups:
            case_setups.clear()  # one case's inputs alive at a time
            case_setups[case.name] = CaseSetup(case, DEVICE, keep_pristine=True)
        setup = case_setups[case.name]
        restore = impl.mutates_inputs

        def sync() -> None:
            if DEVICE.type == "cuda":
                torch.cuda.synchronize(DEVICE)

        def fresh():
            setup.reset(restore)
            sync()

        def forward():
            loss = fn(setup.inputs)
            sync()
            return loss

        def forward_backward():
            fn(setup.inputs).backward()
            sync()

        def backward(loss: torch.Tensor):
            loss.backward()
            sync()

        def forward_first():
            fresh()
            return (fn(setup.inputs),), {}

        benchmark.group = f"{case.name} {phase}"
        benchmark.extra_info.update(
            case=case.to_json(), impl=impl.name, phase=phase, threads=torch.get_num_threads()
        )
        warm = Warmup(WARMUP.for_impl(impl))
        while warm.needs_more():
            warm.add(run_once(fn, setup, restore)[2])
        benchmark.extra_info.update(warmup_runs=len(warm.samples), warmup_stable=warm.stable)
        if phase == "bwd":
            # The forward runs in pedantic's untimed setup; only backward() is timed.
            benchmark.pedantic(backward, setup=forward_first, rounds=ROUNDS, warmup_rounds=0)
        else:
            target = forward if phase == "fwd" else forward_backward
            benchmark.pedantic(target, setup=fresh, rounds=ROUNDS, warmup_rounds=0)

    return run
