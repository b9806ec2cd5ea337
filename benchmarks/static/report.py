"""Gate and report of ``python -m benchmarks.static.aot``: what fails, the table, the summary."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.static import sass

GATED_ARCH = 90
GATED_DTYPES = ("bf16",)
MIN_CEILING = 0.85


def failures(row: Dict[str, Any], min_ceiling: float) -> List[str]:
    """Why a compiled (variant, arch) fails the check; empty when it passes."""
    if row["error"]:
        return [row["error"]]
    why = []
    if row["spill_stores"] or row["spill_loads"]:
        why.append(f"spills: {row['spill_stores']} B stored, {row['spill_loads']} B loaded")
    if row["local"] or row["stack"]:
        why.append(f"local memory: {row['local']} B local, {row['stack']} B stack")
    if row["arch"] == GATED_ARCH and row["dtype"] in GATED_DTYPES:
        for loop in row["loops"]:
            # A loop record may carry its own bound (a documented, physics-set exception).
            bound = loop.get("min_ceiling") or min_ceiling
            if loop.get("ceiling") is not None and loop["ceiling"] < bound:
                why.append(
                    f"ceiling: loop {loop['name']!r}, {loop['instructions_per_element']:.1f} "
                    f"instr/elem, caps {sass.MACHINES[row['arch']].name} at "
                    f"{loop['ceiling']:.0%} of HBM ({loop['bound']}-bound) < {bound:.0%}"
                )
    return why


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: Sequence[Dict[str, Any]], min_ceiling: float) -> str:
    """One line per loop of each compiled (variant, arch); resources on the first."""
    head = (
        f"{'kernel':<10} {'variant':<52} {'arch':<5} {'regs':>4} {'spill':>5} {'smem':>6} "
        f"{'loop':<10} {'B/el':>4} {'el/thr':>6} {'instr':>5} {'instr/el':>8} {'mufu/el':>7} "
        f"{'ceiling':>7}  status"
    )
    out = [head, "-" * len(head)]
    for row in rows:
        why = failures(row, min_ceiling)
        status = "ok" if not why else "FAIL: " + "; ".join(why)
        if row["error"]:
            out.append(
                f"{row['kernel']:<10} {row['variant']:<52} sm_{row['arch']:<2} {'':>4} "
                f"{'':>5} {'':>6} {'':<10} {'':>4} {'':>6} {'':>5} {'':>8} {'':>7} {'':>7}  "
                f"{status}"
            )
            continue
        loops = row["loops"] or [{"name": "(none)"}]
        for i, loop in enumerate(loops):
            first = i == 0
            out.append(
                f"{row['kernel'] if first else '':<10} {row['variant'] if first else '':<52} "
                f"{'sm_' + str(row['arch']) if first else '':<5} "
                f"{row['registers'] if first else '':>4} "
                f"{row['spill_stores'] + row['spill_loads'] if first else '':>5} "
                f"{row['shared'] if first else '':>6} {loop['name']:<10} "
                f"{_fmt(loop.get('bytes_per_element'), 'd'):>4} "
                f"{_fmt(loop.get('elements_per_thread'), '.3g'):>6} "
                f"{_fmt(loop.get('instructions'), '.4g'):>5} "
                f"{_fmt(loop.get('instructions_per_element'), '.1f'):>8} "
                f"{_fmt(loop.get('mufu_per_element'), '.2f'):>7} "
                f"{_fmt(loop.get('ceiling'), '.0%'):>7}  {status if first else ''}"
            )
    return "\n".join(out)


def summary(rows: Sequence[Dict[str, Any]], min_ceiling: float) -> str:
    """Worst ceiling per (kernel, loop, dtype, arch) and the count of each failure kind."""
    worst: Dict[Tuple, Tuple[float, str]] = {}
    for row in rows:
        for loop in row.get("loops") or []:
            if loop.get("ceiling") is None:
                continue
            key = (row["kernel"], loop["name"], row["dtype"], row["arch"])
            if key not in worst or loop["ceiling"] < worst[key][0]:
                worst[key] = (loop["ceiling"], row["variant"])
    lines = ["", "Lowest ceiling per kernel loop, dtype and arch:"]
    for (kernel, loop, dtype, arch), (value, variant) in sorted(worst.items()):
        lines.append(f"  {kernel}/{loop} {dtype} sm_{arch}: {value:.0%} ({variant})")
    kinds: Dict[str, int] = {}
    failed = 0
    for row in rows:
        why = failures(row, min_ceiling)
        failed += bool(why)
        for reason in why:
            kind = reason.split(":")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
    lines.append("")
    lines.append(f"{len(rows)} compilations, {failed} failing")
    for kind, count in sorted(kinds.items()):
        lines.append(f"  {count} x {kind}")
    return "\n".join(lines)


def machines_note() -> str:
    return "\n".join(
        f"sm_{arch} ceiling on {m.name}: {m.sms} SMs x {m.issue_per_clock} warp-instr/clk "
        f"(MUFU {m.mufu_per_clock}/clk) at {m.clock_hz / 1e9:.2f} GHz vs "
        f"{m.hbm_bytes_per_s / 1e12:.3g} TB/s HBM"
        for arch, m in sorted(sass.MACHINES.items())
    )


def breakdown(rows: Sequence[Dict[str, Any]]) -> str:
    """Opcode counts per trip of every measured loop."""
    lines = []
    for row in rows:
        for loop in row.get("loops") or []:
            if "histogram" in loop:
                counts = ", ".join(f"{k} {v:g}" for k, v in loop["histogram"].items())
                lines.append(
                    f"{row['kernel']}/{row['variant']} sm_{row['arch']} {loop['name']}: {counts}"
                )
    return "\n".join(lines)
