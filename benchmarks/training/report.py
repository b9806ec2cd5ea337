"""Tables, plots and the per-claim verdicts of a study's results (``study.run_study``).

Verdicts compare two methods seed by seed (the same seed means the same initial policy,
data and data order): the paired differences' mean and a t statistic over the seeds. A
claim is *supported* when the difference has the claimed sign with ``|t|`` at least the
two-sided 95% quantile of Student's t for the number of seeds, *contradicted* when it has
the opposite sign at that level, and *inconclusive* otherwise: a rule stated before the
numbers were seen, so the table cannot be tuned to come out one way.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import methods

# Two-sided 95% quantiles of Student's t by degrees of freedom (seeds - 1).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}

Run = Dict[str, Any]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``q`` in [0, 100]."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def run_metrics(r: Run) -> Dict[str, float]:
    """The scalar metrics of one run."""
    norms = r["history"]["grad_norm"]
    out = {f"final/{k}": v for k, v in r["final"].items()}
    out["grad/max"] = max(norms)
    out["grad/p99"] = percentile(norms, 99)
    out["grad/median"] = percentile(norms, 50)
    for k, v in r.get("cold_start", {}).items():
        out[f"cold/{k}"] = v
    return out


def by_key(results: Dict) -> Dict[Tuple[str, float], Dict[int, Dict[str, float]]]:
    """``{(method, fraction): {seed: metrics}}``."""
    table: Dict[Tuple[str, float], Dict[int, Dict[str, float]]] = {}
    for r in results["runs"]:
        table.setdefault((r["method"], r["fraction"]), {})[r["seed"]] = run_metrics(r)
    return table


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: Sequence[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


MAIN_COLUMNS = (
    ("final/greedy_acc", "held-out acc (greedy)"),
    ("final/sampled_acc", "held-out acc (sampled)"),
    ("final/kl", "KL(pi ‖ pi_0)"),
    ("final/entropy", "entropy (nats/token)"),
    ("grad/median", "grad-norm median"),
    ("grad/p99", "grad-norm p99"),
    ("grad/max", "grad-norm max"),
    ("cold/greedy_acc", "after GRPO stage: acc (greedy)"),
    ("cold/sampled_acc", "after GRPO stage: acc (sampled)"),
)


def main_table(results: Dict) -> str:
    table = by_key(results)
    head = "| method | " + " | ".join(label for _, label in MAIN_COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (len(MAIN_COLUMNS) + 1)]
    initial = list(results["initial"].values())
    init_cells = [
        fmt([e[key.split("/")[1]] for e in initial]) if key.startswith("final/") else "-"
        for key, _ in MAIN_COLUMNS
    ]
    cold0 = list(results.get("initial_cold_start", {}).values())
    if cold0:
        init_cells[-2] = fmt([e["greedy_acc"] for e in cold0])
        init_cells[-1] = fmt([e["sampled_acc"] for e in cold0])
    lines.append("| initial policy | " + " | ".join(init_cells) + " |")
    for m in methods.METHODS:
        per_seed = table.get((m.name, 1.0))
        if not per_seed:
            continue
        cells = [
            fmt([v[key] for v in per_seed.values()])
            if key in next(iter(per_seed.values()))
            else "-"
            for key, _ in MAIN_COLUMNS
        ]
        lines.append(f"| {m.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def data_table(results: Dict) -> str:
    table = by_key(results)
    small = results["config"]["small_fraction"]
    n_train = results["config"]["n_train"]
    lines = [
        f"| method | acc (greedy), {small:.0%} of demos | acc (greedy), 100% | "
        f"acc (sampled), {small:.0%} | acc (sampled), 100% |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in results["config"]["small_methods"]:
        few, full = table.get((name, small)), table.get((name, 1.0))
        if not few or not full:
            continue
        label = methods.BY_NAME[name].label
        lines.append(
            f"| {label} | {fmt([v['final/greedy_acc'] for v in few.values()])} | "
            f"{fmt([v['final/greedy_acc'] for v in full.values()])} | "
            f"{fmt([v['final/sampled_acc'] for v in few.values()])} | "
            f"{fmt([v['final/sampled_acc'] for v in full.values()])} |"
        )
    lines.append("")
    lines.append(f"({round(small * n_train)} vs {n_train} demonstration prompts.)")
    return "\n".join(lines)


@dataclass(frozen=True)
class Claim:
    """A claim of the paper as a paired comparison: ``sign * (a - b) > 0`` supports it."""

    text: str
    metric: str
    a: Tuple[str, float]
    b: Tuple[str, float]
    sign: int
    measured: str


def claims(small: float) -> List[Claim]:
    full = 1.0
    return [
        Claim(
            "SFT collapses entropy; GFT keeps the policy's entropy higher",
            "final/entropy",
            ("gft", full),
            ("sft", full),
            +1,
            "held-out entropy, GFT tau=0.1 minus SFT",
        ),
        Claim(
            "SFT's inverse-probability weights make gradient norms explode; GFT's do not",
            "grad/max",
            ("sft", full),
            ("gft", full),
            +1,
            "max per-step gradient norm, SFT minus GFT",
        ),
        Claim(
            "(same, on the tail) gradient-norm 99th percentile lower with GFT",
            "grad/p99",
            ("sft", full),
            ("gft", full),
            +1,
            "p99 gradient norm, SFT minus GFT",
        ),
        Claim(
            "DCR is what bounds the gradient (ablation)",
            "grad/max",
            ("gft_nodcr", full),
            ("gft", full),
            +1,
            "max gradient norm, GFT w/o DCR minus GFT",
        ),
        Claim(
            "GFT drifts less from the initial policy than SFT (lower KL)",
            "final/kl",
            ("sft", full),
            ("gft", full),
            +1,
            "KL(pi ‖ pi_0), SFT minus GFT",
        ),
        Claim(
            "GFT reaches higher accuracy than SFT on the same data",
            "final/greedy_acc",
            ("gft", full),
            ("sft", full),
            +1,
            "held-out greedy accuracy, GFT minus SFT",
        ),
        Claim(
            "GFT beats DFT",
            "final/greedy_acc",
            ("gft", full),
            ("dft", full),
            +1,
            "held-out greedy accuracy, GFT minus DFT",
        ),
        Claim(
            "Hybrid groups beat self samples alone (GRPO) under a sparse reward",
            "final/greedy_acc",
            ("gft", full),
            ("grpo", full),
            +1,
            "held-out greedy accuracy, GFT minus GRPO",
        ),
        Claim(
            f"Data efficiency: GFT with {small:.0%} of the demonstrations beats SFT with all",
            "final/greedy_acc",
            ("gft", small),
            ("sft", full),
            +1,
            f"held-out greedy accuracy, GFT@{small:.0%} minus SFT@100%",
        ),
        Claim(
            "GFT is a better starting point for RL than SFT",
            "cold/greedy_acc",
            ("gft", full),
            ("sft", full),
            +1,
            "greedy accuracy after the same GRPO stage, from GFT minus from SFT",
        ),
    ]


def verdict(diffs: Sequence[float], sign: int) -> Tuple[str, float]:
    n = len(diffs)
    if n < 2:
        return "inconclusive (one seed)", float("nan")
    m, s = mean_std(diffs)
    t = m / (s / math.sqrt(n)) if s > 0 else (math.inf if m != 0 else 0.0) * (1 if m >= 0 else -1)
    limit = _T95.get(n - 1, 2.0)
    if sign * t >= limit:
        return "supported", t
    if sign * t <= -limit:
        return "contradicted", t
    return "inconclusive", t


def claims_table(results: Dict) -> str:
    table = by_key(results)
    lines = [
        "| claim (paper) | measured (paired over seeds) | mean ± std | t | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in claims(results["config"]["small_fraction"]):
        a, b = table.get(c.a), table.get(c.b)
        if not a or not b:
            continue
        seeds = sorted(set(a) & set(b))
        if not seeds or c.metric not in a[seeds[0]] or c.metric not in b[seeds[0]]:
            continue
        diffs = [a[s][c.metric] - b[s][c.metric] for s in seeds]
        word, t = verdict(diffs, c.sign)
        lines.append(f"| {c.text} | {c.measured} | {fmt(diffs)} | {t:+.2f} | {word} |")
    return "\n".join(lines)


def markdown(results: Dict, command: str) -> str:
    cfg = results["config"]
    timing = results["timing"]
    return "\n\n".join(
        [
            f"Command: `{command}`; {len(cfg['seeds'])} seeds; wall time "
            f"{timing['wall_seconds']:.0f} s with {timing['workers']} worker process(es) on "
            f"{results['machine']['cpus']} CPU cores (torch {results['machine']['torch']}).",
            "### Per method (mean ± std over seeds, held-out prompts)",
            main_table(results),
            "### Accuracy against the number of demonstrations",
            data_table(results),
            "### The paper's claims against the toy study",
            claims_table(results),
        ]
    )


# -- plots ------------------------------------------------------------------------------


def _colors() -> Dict[str, str]:
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
    return {m.name: c for m, c in zip(methods.METHODS, palette)}


def plots(results: Dict, out: Path) -> List[Path]:
    """Training curves, gradient-norm distributions and KL against accuracy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _colors()
    full = [r for r in results["runs"] if r["fraction"] == 1.0]
    written = []

    # Each seed starts from its own pre-trained policy (their accuracies differ a lot), so
    # the curves show the change since step 0, mean over seeds with one standard error.
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for m in methods.METHODS:
        runs = [r for r in full if r["method"] == m.name]
        if not runs:
            continue
        steps = runs[0]["history"]["curve_steps"]
        for ax, key in zip(axes, ("curve_acc", "curve_entropy")):
            series = [[v - r["history"][key][0] for v in r["history"][key]] for r in runs]
            mean = [statistics.fmean(v) for v in zip(*series)]
            sem = [
                statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else 0.0 for v in zip(*series)
            ]
            ax.plot(steps, mean, color=colors[m.name], label=m.label, lw=1.5)
            ax.fill_between(
                steps,
                [a - b for a, b in zip(mean, sem)],
                [a + b for a, b in zip(mean, sem)],
                color=colors[m.name],
                alpha=0.12,
            )
    axes[0].set(xlabel="optimizer step", ylabel="held-out accuracy (greedy), change")
    axes[1].set(xlabel="optimizer step", ylabel="entropy along greedy answers, change")
    for ax in axes:
        ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    axes[0].legend(fontsize=7)
    fig.suptitle("change since step 0, mean ± standard error over seeds", fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out / "training_curves.png"))

    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = [m for m in methods.METHODS if any(r["method"] == m.name for r in full)]
    data = [
        [g for r in full if r["method"] == m.name for g in r["history"]["grad_norm"]] for m in names
    ]
    ax.boxplot(data, whis=(1, 99), showfliers=True, flierprops={"markersize": 2})
    ax.set_xticks(range(1, len(names) + 1), [m.label for m in names], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("per-step gradient norm")
    ax.set_title("whiskers: 1st-99th percentile, dots beyond", fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out / "grad_norms.png"))

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for m in methods.METHODS:
        runs = [r for r in full if r["method"] == m.name]
        if runs:
            ax.scatter(
                [r["final"]["kl"] for r in runs],
                [r["final"]["greedy_acc"] for r in runs],
                color=colors[m.name],
                label=m.label,
                s=18,
            )
    init = list(results["initial"].values())
    ax.axhline(statistics.fmean(e["greedy_acc"] for e in init), color="grey", ls=":", lw=1)
    ax.set(xlabel="KL(pi ‖ pi_0) on held-out samples", ylabel="held-out accuracy (greedy)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out / "kl_vs_accuracy.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt
    from PIL import Image  # matplotlib's own dependency

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    # A 64-colour palette keeps the committed plots at tens of KB (the shaded bands make the
    # full-colour PNG several times larger) with no visible change.
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=64)
    small.save(path, optimize=True)
    return path


def summary_lines(results: Dict, keys: Optional[Sequence[str]] = None) -> List[str]:
    """One console line per method: the headline metrics."""
    table = by_key(results)
    keys = keys or ("final/greedy_acc", "final/kl", "final/entropy", "grad/max")
    lines = []
    for (name, fraction), per_seed in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = [f"{k.split('/')[1]}={fmt([v[k] for v in per_seed.values()])}" for k in keys]
        lines.append(f"{methods.BY_NAME[name].label:>17} @{fraction:.0%}: " + "  ".join(cells))
    return lines
