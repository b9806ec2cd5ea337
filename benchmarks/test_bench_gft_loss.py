"""pytest-benchmark: the logits-level ``gft_loss`` against the naive reference and the peers.

Small shapes from :func:`benchmarks.cases.pytest_cases`; every implementation of
:mod:`benchmarks.implementations` (unavailable ones skip with the reason), for the forward,
the backward and both.
"""

from __future__ import annotations

import pytest

from benchmarks.cases import pytest_cases
from benchmarks.implementations import impls_for
from benchmarks.report import PHASES

OP = "gft_loss"


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("impl", impls_for(OP), ids=lambda impl: impl.name)
@pytest.mark.parametrize("case", pytest_cases(OP), ids=lambda case: case.name)
def test_gft_loss(run_benchmark, case, impl, phase):
    run_benchmark(case, impl, phase)
