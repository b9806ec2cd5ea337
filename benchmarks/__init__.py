"""Benchmark suite of gft_kernels: a runner (``python -m benchmarks``) and pytest-benchmark tests.

Modules, one job each: :mod:`~benchmarks.cases` (shapes and inputs), :mod:`~benchmarks.
implementations` (what is compared), :mod:`~benchmarks.careful_torch` (the careful PyTorch
peer), :mod:`~benchmarks.floors` (the floor rows: memory passes, bare GEMMs),
:mod:`~benchmarks.run_policy` (warm-up until stable, how many timed runs),
:mod:`~benchmarks.measure` (timing, peak memory), :mod:`~benchmarks.memory_probe` (the
subprocess of the CPU memory measurement), :mod:`~benchmarks.targets` (the performance targets
and their verdicts), :mod:`~benchmarks.report` (tables, JSON, plots),
:mod:`~benchmarks.runner` (the CLI) and :mod:`~benchmarks.gpu_check` (``make gpu-check``).

The ahead-of-time check of the Triton kernels (``make aot``) is a static gate, not a
benchmark run: :mod:`benchmarks.static`.
"""
