"""Benchmark suite of gft_kernels: a runner (``python -m benchmarks``) and pytest-benchmark tests.

Modules, one job each: :mod:`~benchmarks.cases` (shapes and inputs), :mod:`~benchmarks.
implementations` (what is compared), :mod:`~benchmarks.measure` (timing, peak memory),
:mod:`~benchmarks.memory_probe` (the per-run subprocess of the CPU memory measurement),
:mod:`~benchmarks.report` (tables, JSON, plots) and :mod:`~benchmarks.runner` (the CLI).

The ahead-of-time check of the Triton kernels (``python -m benchmarks.aot``, ``make aot``):
:mod:`~benchmarks.aot` (CLI), :mod:`~benchmarks.aot_worker` (compiling and reading kernels),
:mod:`~benchmarks.aot_report` (gate, tables) and :mod:`~benchmarks.sass` (ptxas report,
SASS and PTX listings, bandwidth ceilings).
"""
