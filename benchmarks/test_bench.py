"""pytest-benchmark: ``gft_loss`` (logits level) and ``fused_linear_gft_loss`` (lm_head + loss)
against the naive reference and the peers.

Small shapes from :func:`benchmarks.cases.pytest_cases`; every implementation of
:mod:`benchmarks.implementations` that serves the case's op (unavailable ones skip with the
reason), for the forward, the backward and both.
"""

from __future__ import annotations

import pytest

from benchmarks.cases import OPS, pytest_cases
from benchmarks.implementations import impls_for
from benchmarks.report import PHASES

# (case, implementation) of both ops; the case names say the op (``gft_loss/...``,
# ``fused_linear/...``).
CASES_AND_IMPLS = [
    (case, impl) for op in OPS for case in pytest_cases(op) for impl in impls_for(op)
]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("case, impl", CASES_AND_IMPLS, ids=lambda param: param.name)
def test_benchmark(run_benchmark, case, impl, phase):
    run_benchmark(case, impl, phase)
