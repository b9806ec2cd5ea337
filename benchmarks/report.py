"""Results: ratios to the peers and the floor, terminal tables, JSON and plots.

A result is a JSON-ready dict per case: ``{"case": Case.to_json(), "impls": {name: {...}}}``
where each implementation entry holds ``status`` (``ok``/``skipped``/``error``), ``reason``,
every timing sample in ms (warm-up included), medians, the loss value and the peak memory.
:func:`add_ratios` adds the comparisons with the two peers of the same case (or of the case
named in ``baseline``): ``naive`` (the published code) and ``careful`` (plain careful
PyTorch), with the case's floor row, and the loss agreement; everything printed is derived
from those dicts. Target verdicts come from :mod:`benchmarks.targets`.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from benchmarks import targets as target_table

PHASES = ("fwd", "bwd", "fwd_bwd")
# The peers every row is compared with (speedup and memory fraction), in table order.
PEERS = ("naive", "careful")
FLOORS = ("floor:mem", "floor:gemm")
# Relative loss difference to the reference above which a row is flagged: the reference
# computes in the input dtype, so bf16 cases are only checked loosely.
LOSS_RTOL = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 2e-2}

Result = Dict[str, dict]


def median(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def is_floor(name: str, entry: dict) -> bool:
    # Older results.json files have no "floor" field: the name says it.
    return bool(entry.get("floor", name in FLOORS))


def _peer_entry(
    result: Result, by_name: Dict[str, Result], peer: str
) -> Tuple[Optional[dict], str]:
    """The ``peer`` entry this case compares with, and the case it comes from."""
    case = result["case"]
    entry = result["impls"].get(peer)
    if entry and entry["status"] == "ok":
        return entry, case["name"]
    base = case.get("baseline")
    if base and base in by_name:
        entry = by_name[base]["impls"].get(peer)
        if entry and entry["status"] == "ok":
            return entry, base
    return None, ""


def _floor_entry(result: Result) -> Optional[dict]:
    for name, entry in result["impls"].items():
        if is_floor(name, entry) and entry["status"] == "ok":
            return entry
    return None


def _vs(entry: dict, ref: dict, source: str) -> Dict[str, object]:
    ratios: Dict[str, object] = {"baseline_case": source}
    for phase in PHASES:
        mine, theirs = entry["median_ms"].get(phase), ref["median_ms"].get(phase)
        ratios[f"speedup_{phase}"] = theirs / mine if mine and theirs else None
    mem, ref_mem = _peak(entry), _peak(ref)
    ratios["memory_fraction"] = mem / ref_mem if mem is not None and ref_mem else None
    return ratios


def add_ratios(results: List[Result]) -> None:
    """Per entry: ``vs_naive``/``vs_careful`` (speedup = peer time / time, memory fraction =
    peak / peer peak), ``vs_floor`` (time / floor time) and the loss agreement with naive."""
    by_name = {r["case"]["name"]: r for r in results}
    for result in results:
        rtol = LOSS_RTOL.get(result["case"]["dtype"], 1e-3)
        floor = _floor_entry(result)
        peers = {peer: _peer_entry(result, by_name, peer) for peer in PEERS}
        for name, entry in result["impls"].items():
            for peer in PEERS:
                entry[f"vs_{peer}"] = None
            entry["vs_floor"] = None
            if entry["status"] != "ok":
                continue
            for peer, (ref, source) in peers.items():
                if ref is not None:
                    entry[f"vs_{peer}"] = _vs(entry, ref, source)
            if floor is not None and floor["median_ms"].get("fwd_bwd"):
                entry["vs_floor"] = entry["median_ms"]["fwd_bwd"] / floor["median_ms"]["fwd_bwd"]
            naive, source = peers["naive"]
            # Losses agree only where the inputs are the same: same case; floors are no loss.
            same_case = source == result["case"]["name"]
            if (
                same_case
                and not is_floor(name, entry)
                and entry.get("loss") is not None
                and naive.get("loss") is not None
            ):
                diff = abs(entry["loss"] - naive["loss"]) / max(abs(naive["loss"]), 1e-12)
                entry["loss_rel_diff"] = diff
                entry["loss_ok"] = diff <= rtol


def loss_check_line(results: List[Result]) -> str:
    """One line: do all implementations' losses agree with naive's on the same inputs?"""
    checked, bad = 0, []
    for result in results:
        for name, entry in result["impls"].items():
            if "loss_ok" in entry and name != "naive":
                checked += 1
                if not entry["loss_ok"]:
                    bad.append(f"{result['case']['name']} {name} ({entry['loss_rel_diff']:.1e})")
    tol = ", ".join(f"{k} {v:g}" for k, v in LOSS_RTOL.items())
    if bad:
        return f"loss check: {len(bad)} of {checked} differ from naive beyond rtol ({tol}): " + (
            "; ".join(bad)
        )
    return f"loss check: all {checked} losses agree with naive's (rtol {tol})"


def _peak(entry: dict) -> Optional[float]:
    mem = entry.get("memory") or {}
    return mem.get("peak_mb")


# --------------------------------------------------------------------------- tables


def _fmt_ms(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _fmt_ratio(value: Optional[float], suffix: str = "x") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


def _fmt_warmup(entry: dict) -> str:
    """Warm-up runs; ``*`` when the warm-up ended on its time budget before being stable."""
    runs = len(entry.get("warmup_ms") or [])
    return f"{runs}{'*' if entry.get('warmup_stable') is False else ''}"


def _groups(results: Iterable[Result]) -> Dict[str, List[Result]]:
    groups: Dict[str, List[Result]] = {}
    for result in results:
        groups.setdefault(result["case"]["group"], []).append(result)
    return groups


HEADERS = [
    "case",
    "implementation",
    "fwd ms",
    "bwd ms",
    "fwd+bwd ms",
    "vs naive",
    "vs careful",
    "/ floor",
    "peak MB",
    "mem/naive",
    "mem/careful",
    "n",
    "warm-up",
]
_NUMBER_COLUMNS = len(HEADERS) - 3


def _table_rows(
    group: List[Result], include_skipped: bool = True
) -> Tuple[List[List[str]], Dict[str, str]]:
    rows: List[List[str]] = []
    notes: Dict[str, str] = {}  # "impl: reason" -> footnote mark
    for result in group:
        label = _case_label(result["case"])
        for name, entry in result["impls"].items():
            if entry["status"] != "ok":
                key = f"{name}: {entry['status']}: {entry['reason']}"
                if not include_skipped:
                    notes.setdefault(key, "-")
                    continue
                mark = notes.setdefault(key, f"[{len(notes) + 1}]")
                rows.append([label, name, f"{entry['status']} {mark}"] + [""] * _NUMBER_COLUMNS)
                label = ""
                continue
            med = entry["median_ms"]
            naive = entry.get("vs_naive") or {}
            careful = entry.get("vs_careful") or {}
            flag = "" if entry.get("loss_ok", True) else " !loss"
            mem = _peak(entry)
            rows.append(
                [
                    label,
                    name + flag,
                    _fmt_ms(med["fwd"]),
                    _fmt_ms(med["bwd"]),
                    _fmt_ms(med["fwd_bwd"]),
                    _fmt_ratio(naive.get("speedup_fwd_bwd")),
                    _fmt_ratio(careful.get("speedup_fwd_bwd")),
                    _fmt_ratio(entry.get("vs_floor")),
                    "-" if mem is None else f"{mem:.0f}",
                    _fmt_ratio(naive.get("memory_fraction"), ""),
                    _fmt_ratio(careful.get("memory_fraction"), ""),
                    str(len(entry["samples_ms"]["fwd_bwd"])),
                    _fmt_warmup(entry),
                ]
            )
            label = ""
    return rows, notes


def _case_label(case: dict) -> str:
    if case["op"] == "gft_loss":
        label = f"N={case['n']} V={case['vocab']}"
    else:
        label = f"N={case['n']}"
    if case["zero_adv_share"]:
        label += f" A=0:{round(100 * case['zero_adv_share'])}%"
    return label


LEGEND = (
    "vs naive / vs careful = that peer's fwd+bwd median / this row's (speedup); / floor = "
    "fwd+bwd / the floor row's; mem/naive, mem/careful = peak / that peer's peak; "
    "n = timed samples; warm-up = untimed runs before them (* = stopped by the warm-up "
    "time budget before the times were stable)."
)


def format_tables(results: List[Result], markdown: bool = False) -> str:
    """One table per case group; ratios are fwd+bwd medians and peaks (see ``LEGEND``)."""
    out: List[str] = []
    for title, group in _groups(results).items():
        # Markdown lists what did not run under the table instead of as rows.
        rows, notes = _table_rows(group, include_skipped=not markdown)
        if markdown:
            out.append(f"### {title}\n")
            out.append("| " + " | ".join(HEADERS) + " |")
            out.append("|" + "|".join("---" for _ in HEADERS) + "|")
            for row in rows:
                out.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
            out.append("")
        else:
            # A skipped row's status spans the number columns: it does not set their width.
            timed = [r for r in rows if r[3] != "" or not r[2].startswith(("skipped", "error"))]
            widths = [
                max([len(h)] + [len(r[i]) for r in (rows if i < 2 else timed)])
                for i, h in enumerate(HEADERS)
            ]
            out.append(f"== {title} ==")
            out.append("  ".join(h.ljust(w) for h, w in zip(HEADERS, widths)))
            out.append("  ".join("-" * w for w in widths))
            for row in rows:
                if row[3] == "" and row[2].startswith(("skipped", "error")):
                    out.append(
                        "  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2]])
                    )
                else:
                    out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if markdown and notes:
            out.append("Not run here:\n")
        for key, mark in notes.items():
            out.append(f"- {key}" if markdown else f"{mark} {key}")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- targets


def target_lines(results: List[Result], device: str) -> List[str]:
    """Verdicts of the targets (:data:`benchmarks.targets.TARGETS`) this run covers."""
    return [verdict.line() for verdict in target_table.evaluate(results, device)]


# --------------------------------------------------------------------------- JSON


def write_json(path: Path, meta: dict, results: List[Result]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=1)
        fh.write("\n")


def write_markdown(path: Path, meta: dict, results: List[Result], targets: List[str]) -> None:
    """The tables and target checks as Markdown (a starting point for RESULTS.md)."""
    where = meta.get("device_name") or meta.get("cpu_model")
    lines = [
        f"Machine: {meta['device']} ({where}), {meta['usable_cores']} usable cores, "
        f"{meta['torch_threads']} torch threads; torch {meta['torch']}, triton "
        f"{meta['triton']}; {meta['date']}; `{meta['command']}` ({meta.get('wall_s', 0):.0f} s)",
        "",
        format_tables(results, markdown=True),
        LEGEND,
        "",
        loss_check_line(results),
        "",
    ]
    if targets:
        lines += ["Targets covered by this run (benchmarks/targets.py):", ""]
        lines += [f"- {line}" for line in targets] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------- plots


def _series(results: List[Result], x_key: str, fixed: Tuple[str, ...]) -> Dict[tuple, list]:
    """Cases grouped by the ``fixed`` keys (zero-advantage cases left out), longest sweeps."""
    series: Dict[tuple, list] = {}
    for result in results:
        case = result["case"]
        if case["zero_adv_share"]:
            continue
        key = tuple(case[k] for k in fixed)
        series.setdefault(key, []).append(result)
    points = {key: len({r["case"][x_key] for r in group}) for key, group in series.items()}
    # Only the longest sweeps: a two-point side series adds a panel but says little.
    most = max(points.values(), default=0)
    return {
        key: sorted(group, key=lambda r: r["case"][x_key])
        for key, group in series.items()
        if points[key] == most and most >= 2
    }


def _plot_one(
    path: Path,
    series: Dict[tuple, list],
    x_key: str,
    metric: str,
    title: str,
    key_names: Tuple[str, ...],
) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not series:
        return None
    n = len(series)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.0), squeeze=False)
    for ax, (key, group) in zip(axes[0], sorted(series.items(), key=lambda kv: str(kv[0]))):
        names: List[str] = []
        for result in group:
            for name in result["impls"]:
                if name not in names:
                    names.append(name)
        for name in names:
            xs, ys = [], []
            for result in group:
                entry = result["impls"].get(name)
                if not entry or entry["status"] != "ok":
                    continue
                y = entry["median_ms"]["fwd_bwd"] if metric == "time" else _peak(entry)
                if y is None:
                    continue
                xs.append(result["case"][x_key])
                ys.append(y)
            if xs:
                style = "-o" if name.startswith("gft:") else "--s"
                ax.plot(xs, ys, style, label=name)
        # N doubles from point to point (log2 axis); V values are uneven (linear axis). Time
        # spans decades (log axis); memory is shown linearly from 0, where in-place is ~0.
        if x_key == "n":
            ax.set_xscale("log", base=2)
        if metric == "time":
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel({"n": "tokens N", "vocab": "vocabulary V"}[x_key])
        ax.set_ylabel("fwd+bwd median (ms)" if metric == "time" else "peak memory over inputs (MB)")
        ax.set_xticks(sorted({r["case"][x_key] for r in group}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title(", ".join(f"{k}={v}" for k, v in zip(key_names, key)), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_plots(out_dir: Path, results: List[Result], device_label: str) -> List[Path]:
    """Time and peak memory against N (both ops) and against V (logits-level)."""
    paths: List[Path] = []
    logits = [r for r in results if r["case"]["op"] == "gft_loss"]
    fused = [r for r in results if r["case"]["op"] == "fused_linear_gft_loss"]
    specs = [
        ("gft_loss", logits, "n", ("dtype", "vocab"), ("dtype", "V")),
        ("gft_loss", logits, "vocab", ("dtype", "n"), ("dtype", "N")),
        ("fused_linear", fused, "n", ("model", "dtype"), ("head", "dtype")),
    ]
    for prefix, subset, x_key, fixed, key_names in specs:
        series = _series(subset, x_key, fixed)
        x_name = "N" if x_key == "n" else "V"
        for metric in ("time", "memory"):
            what = "fwd+bwd time" if metric == "time" else "peak memory (fwd+bwd)"
            path = _plot_one(
                out_dir / f"{prefix}_{metric}_vs_{x_name}.png",
                series,
                x_key,
                metric,
                f"{prefix}: {what} vs {x_name}\n{device_label}",
                key_names,
            )
            if path is not None:
                paths.append(path)
    return paths
