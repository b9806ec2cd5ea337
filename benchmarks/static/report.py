"""Gate and report of ``python -m benchmarks.static.aot``: what fails, the tables, the summary.

The bandwidth gate holds the bf16 loops of sm_90 to ``--min-ceiling`` (85%) of the H100's
HBM bandwidth (:data:`benchmarks.static.machines.GATE_MACHINES`; ``--gate-machine H200``
for the H200's, the faster memory and so the harder gate, which not every loop passes
yet). Every other machine's figures are reported beside it.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.static import machines

GATED_ARCH = 90
GATED_DTYPES = ("bf16",)
MIN_CEILING = 0.85
# Vocabulary sizes of the whole-row table (Llama 2, GPT-2, Llama 3, Qwen 2, Gemma 3).
VOCABS = (32000, 50257, 128256, 151936, 262144)


def _traffic(loop: Dict[str, Any]) -> Optional[str]:
    """Why a measured loop's SASS does not move the bytes its record says; None if it does.

    A thread's loads and stores per trip must be ``bytes_per_element`` times its elements
    per trip: a record with the wrong block or warp count (elements per thread) fails here.
    """
    if loop.get("memory_bytes") is None or not loop.get("bytes_per_element") or loop.get("note"):
        return None
    expected = loop["bytes_per_element"] * loop["elements_per_thread"]
    if math.isclose(loop["memory_bytes"], expected):
        return None
    return (
        f"traffic: loop {loop['name']!r} ({loop['source']}) moves {loop['memory_bytes']:g} B "
        f"per thread per trip, its record {loop['bytes_per_element']} B x "
        f"{loop['elements_per_thread']:g} elements = {expected:g} B"
    )


def _mma(loop: Dict[str, Any]) -> Optional[str]:
    """Why a measured tensor-core loop does not run the multiply-adds its record says;
    None if it does (or it is no such loop). A dot on the FMA pipe (fp32 ``ieee``) has no
    tensor-core opcode and needs at least that many ``FFMA`` lanes."""
    if loop.get("macs_per_trip") is None or "histogram" not in loop or loop.get("note"):
        return None
    expected = loop["macs_per_trip"]
    if loop.get("mma_ops"):
        found = loop.get("macs_sass", 0.0)
        if math.isclose(found, expected):
            return None
    else:
        found = loop["histogram"].get("FFMA", 0.0) * loop["threads"]
        if found >= expected:
            return None
    return (
        f"mma: loop {loop['name']!r} ({loop['source']}) runs {found:g} multiply-adds per "
        f"trip, its record {expected:g}"
    )


def failures(row: Dict[str, Any], min_ceiling: float) -> List[str]:
    """Why a compiled (variant, arch) fails the check; empty when it passes.

    Besides spills and local memory: a loop recorded as compiled that the SASS lacks (or
    one recorded as compiled out that it has), a measured loop whose traffic disagrees
    with its record, and on the gated arch and dtypes a streaming loop below its gate.
    """
    if row["error"]:
        return [row["error"]]
    why = []
    if row["spill_stores"] or row["spill_loads"]:
        why.append(f"spills: {row['spill_stores']} B stored, {row['spill_loads']} B loaded")
    if row["local"] or row["stack"]:
        why.append(f"local memory: {row['local']} B local, {row['stack']} B stack")
    for loop in row["loops"]:
        if loop.get("source") is None:
            continue
        if loop.get("compiled", True) and not loop["sass_loops"]:
            why.append(f"missing loop: {loop['name']!r} ({loop['source']}) is not in the SASS")
        elif not loop.get("compiled", True) and loop["sass_loops"]:
            why.append(
                f"missing loop: {loop['name']!r} ({loop['source']}) is recorded as compiled "
                f"out but the SASS has {loop['sass_loops']}"
            )
        for check in (_traffic, _mma):
            found = check(loop)
            if found:
                why.append(found)
    if row["arch"] == GATED_ARCH and row["dtype"] in GATED_DTYPES:
        for loop in row["loops"]:
            # A loop record may carry its own bound (a documented, physics-set exception).
            bound = min_ceiling if loop.get("min_ceiling") is None else loop["min_ceiling"]
            if loop.get("ceiling") is not None and loop["ceiling"] < bound:
                why.append(
                    f"ceiling: loop {loop['name']!r}, {loop['instructions_per_element']:.1f} "
                    f"instr/elem, caps {loop['gate_machine']} at "
                    f"{loop['ceiling']:.0%} of HBM ({loop['bound']}-bound) < {bound:.0%}"
                )
    return why


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _models(loop: Dict[str, Any]) -> str:
    """``H100 100% hbm, H200 74% issue``: each machine's ceiling and binding pipe."""
    models = loop.get("models") or {}
    return ", ".join(f"{m} {v['ceiling']:.0%} {v['bound']}" for m, v in models.items()) or "-"


def table(rows: Sequence[Dict[str, Any]], min_ceiling: float) -> str:
    """One line per loop of each compiled (variant, arch); resources on the first."""
    head = (
        f"{'kernel':<10} {'variant':<52} {'arch':<5} {'regs':>4} {'spill':>5} {'smem':>6} "
        f"{'loop':<10} {'B/el':>4} {'el/thr':>6} {'instr':>5} {'instr/el':>8} {'mufu/el':>7} "
        f"{'fp32/el':>7} {'ceilings (binding pipe)':<28}  status"
    )
    out = [head, "-" * len(head)]
    for row in rows:
        why = failures(row, min_ceiling)
        status = "ok" if not why else "FAIL: " + "; ".join(why)
        if row["error"]:
            out.append(
                f"{row['kernel']:<10} {row['variant']:<52} sm_{row['arch']:<2} {'':>4} "
                f"{'':>5} {'':>6} {'':<10} {'':>4} {'':>6} {'':>5} {'':>8} {'':>7} {'':>7} "
                f"{'':<28}  {status}"
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
                f"{_fmt(loop.get('fp32_per_element'), '.1f'):>7} "
                f"{_models(loop):<28}  {status if first else ''}"
            )
    return "\n".join(out)


def _mma_name(opcodes: Sequence[str]) -> str:
    """``HGMMA.64x256x16``: the tensor-core opcodes without their type suffixes."""
    names = sorted({".".join(op.split(".")[:2]) for op in opcodes})
    return "+".join(names) or "FFMA (no MMA)"


def _mma_cells(models: Dict[str, Any]) -> str:
    """``H100 100% tensor (issue 41%)``: the ceiling, what binds, and the busiest other
    pipe's time as a share of the tensor pipe's (how far the loop is from binding on it)."""
    cells = []
    for name, model in models.items():
        pipe = min(model["pipes"], key=lambda p: model["pipes"][p])
        load = 1.0 / model["pipes"][pipe] if model["pipes"][pipe] else math.inf
        cells.append(f"{name} {model['ceiling']:.0%} {model['bound']} ({pipe} {load:.0%})")
    return ", ".join(cells) or "-"


def tensor_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Tensor-core kernels: per loop with ``tl.dot`` products, the tensor-core and other
    instructions per thread and trip and the fraction of the GEMM's peak they allow per
    machine; per kernel with tiles, the same per output tile (every loop's trips per
    tile, the code outside loops once per program). Empty when no row has such a loop."""
    lines = []
    for row in rows:
        tensor = [lp for lp in row.get("loops") or [] if lp.get("macs_per_trip") is not None]
        if not tensor and "tile" not in row:
            continue
        if row.get("error"):
            continue
        spill = row["spill_stores"] + row["spill_loads"]
        head = f"{row['kernel'] + '/' + row['variant']:<58} sm_{row['arch']} {row['registers']:>4}"
        head += f" {spill:>5} {row['shared']:>6}"
        pad = " " * len(head)
        first = True
        for loop in tensor:
            if "mma_per_trip" not in loop:
                cells = f"{loop['name']:<12} (not in the SASS)"
            else:
                cells = (
                    f"{loop['name']:<12} {_mma_name(loop.get('mma_ops', {})):<33} "
                    f"{loop['mma_per_trip']:>6.4g} {loop['other_per_trip']:>7.0f}  "
                    f"{_mma_cells(loop['mma_models'])}"
                )
            lines.append(f"{head if first else pad}  {cells}")
            first = False
        tile = row.get("tile")
        if tile:
            cells = (
                f"{'per tile':<12} {_mma_name(tile['mma_ops']):<33} {tile['mma']:>6.4g} "
                f"{tile['other']:>7.0f}  {_mma_cells(tile['models'])}"
            )
            lines.append(f"{head if first else pad}  {cells}")
    if not lines:
        return ""
    title = (
        f"{'kernel/variant':<58} {'arch':<5} {'regs':>4} {'spill':>5} {'smem':>6}  "
        f"{'loop':<12} {'tensor op':<33} {'mma':>6} {'other':>7}  "
        "fraction of the GEMM's peak (binding pipe)"
    )
    return "\n".join(
        [
            "",
            "Tensor-core loops (instructions per thread, per trip and per output tile; "
            "static count: no latency, occupancy, shared memory or pipelining):",
            title,
            "-" * len(title),
        ]
        + lines
    )


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
    lines = ["", "Lowest ceiling per kernel loop, dtype and arch (gate machine's model):"]
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


def machines_note(gate: Dict[int, machines.Machine]) -> str:
    lines = ["Machine model (benchmarks/static/machines.py):"]
    lines += [f"  {text}" for text in machines.describe_all()]
    lines.append("  gate: " + ", ".join(f"sm_{a} on {m.name}" for a, m in sorted(gate.items())))
    return "\n".join(lines)


_TRANSFORMS = ("softcap-wide", "softcap", "scale")


def _transform(variant: str) -> str:
    """``T!=1/softcap``: a variant label's temperature and logit transform."""
    parts = variant.split("/")
    temperature = next((p for p in parts if p.startswith("T")), "")
    return f"{temperature}/{next((t for t in _TRANSFORMS if t in parts), 'none')}"


def row_table(rows: Sequence[Dict[str, Any]], vocabs: Sequence[int] = VOCABS) -> str:
    """Whole-row ceilings per machine and vocabulary size, the lowest over the variants of
    each (kernel, pass, dtype, temperature and transform): the statistics walk, the
    gradient walk, the fused pass's two walks together (token_pass writing the gradient)
    and ``row_grad``'s gradient walk, each row walked by one program with its masked head
    and tail blocks (:func:`machines.row_ceiling`). ``loop``: the loop alone, for comparison."""
    worst: Dict[Tuple, List[Tuple[float, str]]] = {}
    for row in rows:
        if row.get("error") or row["kernel"] not in ("token_pass", "row_grad"):
            continue
        phases = {}
        for loop in row["loops"]:
            phase = machines.phase_of(loop)
            if phase is not None and loop["name"] in ("stats", "gradient"):
                phases[loop["name"]] = phase
        passes = {name: [phase] for name, phase in phases.items()}
        if len(phases) == 2:
            passes["stats+gradient"] = [phases["stats"], phases["gradient"]]
        for machine in machines.MACHINES.get(row["arch"], ()):
            for name, chain in passes.items():
                if len(chain) == 1:
                    p = chain[0]
                    loop = machines.loop_ceiling(
                        p.counts, p.block / p.threads, p.bytes_per_element, machine
                    )
                else:
                    loop = None
                values = [loop] + [machines.row_ceiling(chain, v, machine) for v in vocabs]
                key = (row["kernel"], name, row["dtype"], _transform(row["variant"]), machine.name)
                if key not in worst:
                    worst[key] = [(math.inf, "")] * len(values)
                worst[key] = [
                    min(old, (c.ceiling, c.bound) if c is not None else (math.inf, ""))
                    for old, c in zip(worst[key], values)
                ]
    if not worst:
        return ""
    head = f"{'kernel/pass':<26} {'dtype':<5} {'variants':<17} {'GPU':<5} {'loop':>10}" + "".join(
        f" {'V=' + str(v):>13}" for v in vocabs
    )
    out = [
        "",
        "Whole-row ceilings (lowest over variants; % of HBM, binding pipe; head and tail "
        "blocks at full cost):",
        head,
        "-" * len(head),
    ]
    for (kernel, name, dtype, transform, machine), values in sorted(worst.items()):
        cells = [f"{c:.0%} {b}" if c != math.inf else "-" for c, b in values]
        out.append(
            f"{kernel + '/' + name:<26} {dtype:<5} {transform:<17} {machine:<5} {cells[0]:>10}"
            + "".join(f" {c:>13}" for c in cells[1:])
        )
    return "\n".join(out)


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
