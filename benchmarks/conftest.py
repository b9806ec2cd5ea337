"""pytest-benchmark configuration of the benchmark tests (``pytest benchmarks``).

Kernels run natively: CUDA when there is a device, else the CPU backends. The Triton
interpreter (``TRITON_INTERPRET``) is deliberately not set here; it is a correctness tool and
the Triton rows are skipped on a CPU-only machine with the reason.
"""

from __future__ import annotations

from typing import Callable, Dict

import pytest
import torch

from benchmarks.cases import Case
from benchmarks.implementations import Impl, build, skip_reason
from benchmarks.measure import CaseSetup
from benchmarks.runner import usable_cores

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 5


def pytest_configure(config: pytest.Config) -> None:
    # All usable cores, as the runner does; the benchmark JSON records the count.
    torch.set_num_threads(usable_cores())


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
        warmup = max(1, impl.min_warmup)
        if phase == "bwd":
            # The forward runs in pedantic's untimed setup; only backward() is timed.
            benchmark.pedantic(backward, setup=forward_first, rounds=ROUNDS, warmup_rounds=warmup)
        else:
            target = forward if phase == "fwd" else forward_backward
            benchmark.pedantic(target, setup=fresh, rounds=ROUNDS, warmup_rounds=warmup)

    return run
