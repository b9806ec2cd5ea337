"""``python -m benchmarks.training``: the training-dynamics study (benchmarks/README.md,
section "Training dynamics"; results in benchmarks/RESULTS.md).

    python -m benchmarks.training                 # full study: 10 seeds, ~20 min on 2 busy cores
    python -m benchmarks.training --quick         # smoke test, ~30 s
    python -m benchmarks.training --replot        # tables and plots again from results.json

Writes ``results.json`` (every per-step record), ``results.md`` (tables and the per-claim
verdicts) and PNG plots into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from . import report, run, study


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 seeds, a few steps")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/training"))
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes, one torch thread each (default: 2, or 1 with --quick); "
        "the numbers do not depend on it",
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 10)")
    parser.add_argument("--backend", default="auto", choices=("auto", "cpu", "torch"))
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--replot", action="store_true", help="reuse --out/results.json")
    cli = parser.parse_args(argv)
    if cli.jobs is not None and cli.jobs < 1:
        parser.error("--jobs: expected a positive int")
    if cli.seeds is not None and cli.seeds < 1:
        parser.error("--seeds: expected a positive int")
    return cli


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cli = parse_args(argv)
    out: Path = cli.out
    command = "python -m benchmarks.training" + (" --quick" if cli.quick else "")
    if cli.replot:
        source = out / "results.json"
        if not source.is_file():
            raise SystemExit(f"--replot: no {source} (run the study with --out {out} first)")
        results = json.loads(source.read_text())
    else:
        out.mkdir(parents=True, exist_ok=True)
        cfg = run.Config.quick() if cli.quick else run.Config()
        changes = {"backend": cli.backend}
        if cli.seeds is not None:
            changes["seeds"] = tuple(range(cli.seeds))
            command += f" --seeds {cli.seeds}"
        cfg = run.Config(**{**cfg.as_dict(), **changes})
        workers = cli.jobs if cli.jobs is not None else (1 if cli.quick else 2)
        start = time.perf_counter()

        def log(message: str) -> None:
            print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)

        print(
            f"training study: {len(cfg.seeds)} seeds, {cfg.steps} steps per method, "
            f"{workers} worker(s); output in {out}",
            flush=True,
        )
        results = study.run_study(cfg, workers, log)
        (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    (out / "results.md").write_text(report.markdown(results, command) + "\n")
    if not cli.no_plots:
        report.plots(results, out)
    print("\n".join(report.summary_lines(results)))
    print(report.claims_table(results))
    print(f"wall time {results['timing']['wall_seconds']:.1f} s; written to {out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
