"""What a loop's instruction counts allow on a given GPU: a per-architecture, per-pipe model.

A loop (or a whole row) is bound by HBM bandwidth or by one of the SM's pipes, whichever
is slowest; each figure here is the fraction of HBM bandwidth the pipe allows, and the
ceiling is the lowest of them, capped at 1. It assumes every pipe busy every clock (no
stalls, full occupancy, both sides of a branch counted): an upper bound, not a prediction.

Rates per SM per clock, in thread results (a warp instruction is 32), from NVIDIA's
published figures (the CUDA C++ Programming Guide's arithmetic-throughput table and the
A100 / H100 / H200 data sheets):

- ``issue``: every instruction; 4 schedulers issue one warp instruction each: 128.
- ``fp32``: 32-bit floating-point add, multiply and multiply-add (SASS ``FADD``, ``FMUL``,
  ``FFMA``, any modifiers): 64 on compute capability 8.0 (A100: 2 warp instructions per
  clock, half the issue rate), 128 on 9.0 (Hopper: the issue rate, so it binds only
  through issue).
- ``mufu``: the special-function unit (``MUFU.EX2/LG2/RCP/RSQ/SIN/COS/TANH``...): 16.
- ``compare``: "compare, minimum, maximum", 64 on both (``FSETP``, ``ISETP``, ``FMNMX``,
  ``IMNMX``): not the FP32 pipe, whose rate doubles on Hopper while this class's does not.

Everything else counts towards issue only: the integer, logic, shift, select and move
instructions (``IMAD``, ``IADD3``, ``LOP3``, ``SHF``, ``LEA``, ``PRMT``, ``FSEL``, ``SEL``,
``MOV``...), conversions (``F2FP``, ``F2F``, ``I2F``...; the guide's 16-per-clock
"other conversions" row does not say which SASS forms it covers), memory, branch and
uniform-datapath (``U*``) instructions. That is where the model is unsure: classing any of
them with a pipe could only lower a ceiling, so leaving them out keeps it an upper bound.

Clock: the maximum boost clock, 1.98 GHz on Hopper (H100 SXM5 and H200), 1.41 GHz on the
A100. That is optimistic: a sustained clock under load may be lower (an H200 measured
here ran at 1.98 GHz under a bf16 GEMM; HBM-bound kernels draw less power than a GEMM,
but nothing guarantees the boost clock). Every pipe scales with the clock, HBM does not.

Tensor-core loops (``tl.dot``; :func:`mma_ceiling`) are held to the GEMM's peak instead of
HBM bandwidth: the tensor pipe's dense rate per SM per clock is derived from the data
sheets' dense figures at the clocks above (A100 SXM4: 312 TFLOPS bf16/fp16, 156 tf32;
H100 SXM5 and H200: 989 bf16/fp16, 494.5 tf32): 1024 multiply-adds per SM per clock on
the A100 (bf16), 1892 on Hopper. NVIDIA's Hopper figure is quoted at a lower clock (989
TFLOPS is 2048 per clock at 1.83 GHz): at 1.98 GHz the model's tensor pipe is 8% slower
per clock than the hardware's, so the other pipes look relatively cheaper and the
ceilings stay optimistic. The fraction does not depend on the clock (every pipe scales
with it). An FMA-pipe dot (fp32 ``input_precision="ieee"``: ``FFMA``, no tensor core)
is held to the FP32 pipe instead.

sm_80 compilations are modelled on the A100, sm_90 on both the H100 and the H200 (same
SM, 43% more bandwidth on the H200, so its ceilings are 0.70 times the H100's where not
capped). The gate uses :data:`GATE_MACHINES`: the H100 on sm_90, what every loop holds
today. The H200 (faster memory, so a harder bound for the same instructions) is reported
beside it; ``--gate-machine H200`` gates on it, which the soft-capped loops and the
16-bit T != 1 statistics do not pass yet (benchmarks/README.md lists them with their
figures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from benchmarks.static import sass

# SASS opcode families (``Instruction.family``: the opcode without modifiers) per pipe.
PIPES: Dict[str, Tuple[str, ...]] = {
    "fp32": ("FFMA", "FADD", "FMUL"),
    "mufu": ("MUFU",),
    "compare": ("FSETP", "ISETP", "FMNMX", "IMNMX"),
}


@dataclass(frozen=True)
class Machine:
    """One GPU: SMs, the clock assumed, HBM bandwidth and each pipe's thread results per
    SM per clock (``issue``: warp instructions per clock times the warp size)."""

    name: str
    arch: int
    sms: int
    clock_hz: float
    hbm_bytes_per_s: float
    fp32_lanes: int
    issue_per_clock: int = 4
    mufu_lanes: int = 16
    compare_lanes: int = 64
    warp_size: int = 32
    tensor_flops: float = 0.0  # dense bf16/fp16 tensor-core FLOP/s (data sheet)
    tf32_flops: float = 0.0  # dense tf32 tensor-core FLOP/s

    def mma_per_clock(self, kind: str) -> float:
        """Tensor-core multiply-adds per SM per clock for ``kind`` (``16bit``, ``tf32``;
        0 for another: not modelled), derived from the dense FLOP/s at the model's clock."""
        flops = {"16bit": self.tensor_flops, "tf32": self.tf32_flops}.get(kind, 0.0)
        return flops / 2 / (self.sms * self.clock_hz)

    def lanes(self) -> Dict[str, int]:
        return {
            "issue": self.issue_per_clock * self.warp_size,
            "fp32": self.fp32_lanes,
            "mufu": self.mufu_lanes,
            "compare": self.compare_lanes,
        }

    def describe(self) -> str:
        return (
            f"{self.name} (sm_{self.arch}): {self.sms} SMs at {self.clock_hz / 1e9:.2f} GHz "
            f"(max boost: optimistic), {self.hbm_bytes_per_s / 1e12:.3g} TB/s HBM; per SM "
            f"per clock {self.issue_per_clock} warp-instr issue, {self.fp32_lanes} FP32, "
            f"{self.mufu_lanes} MUFU, {self.compare_lanes} compare/min/max; tensor "
            f"{self.tensor_flops / 1e12:.4g} TFLOPS bf16 ({self.mma_per_clock('16bit'):.0f} "
            f"MAC/SM/clk), {self.tf32_flops / 1e12:.4g} tf32 ({self.mma_per_clock('tf32'):.0f})"
        )


A100 = Machine(
    "A100", 80, 108, 1.41e9, 2.039e12, fp32_lanes=64, tensor_flops=312e12, tf32_flops=156e12
)
H100 = Machine(
    "H100", 90, 132, 1.98e9, 3.35e12, fp32_lanes=128, tensor_flops=989e12, tf32_flops=494.5e12
)
H200 = Machine(
    "H200", 90, 132, 1.98e9, 4.8e12, fp32_lanes=128, tensor_flops=989e12, tf32_flops=494.5e12
)
MACHINES: Dict[int, Tuple[Machine, ...]] = {80: (A100,), 90: (H100, H200)}
GATE_MACHINES: Dict[int, Machine] = {80: A100, 90: H100}
BY_NAME: Dict[str, Machine] = {m.name: m for ms in MACHINES.values() for m in ms}


def pipe_counts(histogram: Mapping[str, float]) -> Dict[str, float]:
    """Instructions per pipe (``issue``: all of them) of an opcode-family histogram."""
    counts = {"issue": float(sum(v for k, v in histogram.items() if k != "NOP"))}
    for pipe, families in PIPES.items():
        counts[pipe] = float(sum(histogram.get(f, 0) for f in families))
    return counts


@dataclass
class Ceiling:
    """Fraction of HBM bandwidth (or of the GEMM's peak) each pipe allows (uncapped), and
    the lowest, capped."""

    pipes: Dict[str, float]
    limit: str = "hbm"  # what binds when no pipe does

    @property
    def ceiling(self) -> float:
        return min(1.0, min(self.pipes.values()))

    @property
    def bound(self) -> str:
        """The binding pipe, or :attr:`limit` when every pipe allows full speed."""
        pipe = min(self.pipes, key=lambda p: self.pipes[p])
        return self.limit if self.pipes[pipe] >= 1.0 else pipe


def _fraction(work: float, lanes: int, machine: Machine, hbm_seconds: float) -> float:
    if not work:
        return math.inf
    return hbm_seconds / (work / (machine.sms * machine.clock_hz * lanes))


def loop_ceiling(
    counts: Mapping[str, float],
    elements_per_thread: float,
    bytes_per_element: float,
    machine: Machine,
) -> Ceiling:
    """Bounds of a loop whose trip runs ``counts[pipe]`` instructions per thread over
    ``elements_per_thread`` elements: pipe ``p`` handles ``sms * clock * lanes_p /
    (counts[p] / elements_per_thread)`` elements per second, times the bytes per element,
    over HBM bandwidth."""
    return Ceiling(
        {
            pipe: _fraction(
                counts.get(pipe, 0.0) / elements_per_thread,
                lanes,
                machine,
                bytes_per_element / machine.hbm_bytes_per_s,
            )
            for pipe, lanes in machine.lanes().items()
        }
    )


def blocks_per_row(n_cols: int, block: int, edge_blocks: int) -> int:
    """Blocks a walk runs over a row: the whole blocks of its loop plus its masked head and
    tail (``edge_blocks``, each at a full block's cost, the tail run even when empty); a
    masked loop (``edge_blocks`` 0) runs ``ceil(n_cols / block)``. Rows are taken as
    aligned (a head of 0 elements)."""
    if edge_blocks:
        return n_cols // block + edge_blocks
    return -(-n_cols // block)


@dataclass(frozen=True)
class Phase:
    """One walk over a row: per-trip counts per thread, threads, block, edges, traffic."""

    counts: Mapping[str, float]
    threads: int
    block: int
    edge_blocks: int
    bytes_per_element: float


def row_ceiling(phases: Sequence[Phase], n_cols: int, machine: Machine) -> Ceiling:
    """Bounds of rows of ``n_cols`` elements, each walked by one program through ``phases``
    in turn (e.g. the fused pass's statistics, then its gradient): per pipe, the time of
    every phase's blocks (head and tail included) against the time HBM needs for all the
    phases' bytes. Programs at different phases overlap, so pipe time adds over phases
    and the slowest pipe binds."""
    hbm_seconds = n_cols * sum(p.bytes_per_element for p in phases) / machine.hbm_bytes_per_s
    out = {}
    for pipe, lanes in machine.lanes().items():
        work = sum(
            blocks_per_row(n_cols, p.block, p.edge_blocks) * p.counts.get(pipe, 0.0) * p.threads
            for p in phases
        )
        out[pipe] = _fraction(work, lanes, machine, hbm_seconds)
    return Ceiling(out)


def phase_of(loop: Mapping[str, Any]) -> Optional[Phase]:
    """The :class:`Phase` of a measured loop entry of a row (None: not measured)."""
    if "histogram" not in loop or not loop.get("bytes_per_element"):
        return None
    return Phase(
        pipe_counts(loop["histogram"]),
        loop["threads"],
        loop["elements_per_iteration"],
        loop.get("edge_blocks", 0),
        loop["bytes_per_element"],
    )


def evaluate(rows: Sequence[Dict[str, Any]], gate: Mapping[int, Machine]) -> None:
    """Add each loop's bounds per machine (``models``) and, from ``gate[arch]``'s model,
    its ``ceiling``, ``bound`` and ``gate_machine``, in place; then the tensor-core
    figures (:func:`evaluate_mma`)."""
    for row in rows:
        machines = MACHINES.get(row.get("arch"), ())
        for loop in row.get("loops") or []:
            if "histogram" not in loop:
                continue
            counts = pipe_counts(loop["histogram"])
            per_element = {k: v / loop["elements_per_thread"] for k, v in counts.items()}
            loop["mufu_per_element"] = per_element["mufu"]
            loop["fp32_per_element"] = per_element["fp32"]
            if not loop.get("bytes_per_element"):
                continue
            models = {}
            for machine in machines:
                bounds = loop_ceiling(
                    counts, loop["elements_per_thread"], loop["bytes_per_element"], machine
                )
                models[machine.name] = {
                    "ceiling": bounds.ceiling,
                    "bound": bounds.bound,
                    "pipes": {k: min(v, 1e9) for k, v in bounds.pipes.items()},
                }
            loop["models"] = models
            chosen = gate.get(row["arch"])
            if chosen is not None and chosen.name in models:
                loop["gate_machine"] = chosen.name
                loop["ceiling"] = models[chosen.name]["ceiling"]
                loop["bound"] = models[chosen.name]["bound"]
    evaluate_mma(rows)


def mma_macs(mma_ops: Mapping[str, float], warps: int) -> Dict[str, float]:
    """Multiply-adds per kind (``16bit``, ``tf32``, ``other``) that tensor-core opcodes run
    (``mma_ops``: opcode -> instructions per thread, as each warp issues them) over
    ``warps`` warps."""
    out: Dict[str, float] = {}
    for opcode, count in mma_ops.items():
        shape = sass.mma_shape(sass.Instruction(0, opcode, opcode, None, None))
        if shape is not None:
            macs, kind = shape
            out[kind] = out.get(kind, 0.0) + count * macs * warps
    return out


def mma_ceiling(
    histogram: Mapping[str, float],
    mma_ops: Mapping[str, float],
    warps: int,
    machine: Machine,
    ffma_macs: float = 0.0,
) -> Ceiling:
    """Fraction of the GEMM's peak the code allows: the tensor pipe's time for the
    multiply-adds of ``mma_ops`` over each pipe's time for all of ``histogram`` (opcode
    families per thread, as :func:`pipe_counts` takes them), ``warps`` warps issuing it.

    Per SM per clock a pipe ``p`` runs ``lanes_p`` thread results (issue: 4 warp
    instructions), the tensor pipe :meth:`Machine.mma_per_clock` multiply-adds. Without
    tensor-core opcodes, ``ffma_macs`` (the dots' multiply-adds, run as ``FFMA``) are held
    to the FP32 pipe. A static count: latency, occupancy, shared-memory bandwidth and
    pipelining are not modelled (every pipe busy every clock, both sides of a branch)."""
    by_kind = mma_macs(mma_ops, warps)
    if by_kind:
        useful = sum(
            macs / machine.mma_per_clock(kind) if machine.mma_per_clock(kind) else math.inf
            for kind, macs in by_kind.items()
        )
        limit = "tensor"
    else:
        useful = ffma_macs / machine.fp32_lanes
        limit = "fp32-dot"
    threads = warps * machine.warp_size
    pipes = {}
    for pipe, count in pipe_counts(histogram).items():
        clocks = count * threads / machine.lanes()[pipe]
        pipes[pipe] = useful / clocks if clocks else math.inf
    return Ceiling(pipes, limit)


def _mma_split(histogram: Mapping[str, float], mma_ops: Mapping[str, float]) -> Tuple[float, float]:
    """(tensor-core instructions, every other instruction) per thread."""
    mma = float(sum(mma_ops.values()))
    return mma, pipe_counts(histogram)["issue"] - mma


def _mma_models(
    histogram: Mapping[str, float],
    mma_ops: Mapping[str, float],
    warps: int,
    machines: Sequence[Machine],
    ffma_macs: float,
) -> Dict[str, Dict[str, Any]]:
    out = {}
    for machine in machines:
        bounds = mma_ceiling(histogram, mma_ops, warps, machine, ffma_macs)
        out[machine.name] = {
            "ceiling": bounds.ceiling,
            "bound": bounds.bound,
            "pipes": {k: min(v, 1e9) for k, v in bounds.pipes.items()},
        }
    return out


def evaluate_mma(rows: Sequence[Dict[str, Any]]) -> None:
    """Tensor-core figures, in place: per tensor-core loop (a record with
    ``macs_per_trip``) its tensor-core and other instructions per trip, the multiply-adds
    the SASS runs per trip and program, and ``mma_models`` (:func:`mma_ceiling` per
    machine of the row's arch); per row with ``tiles_per_program``, ``tile``: the same
    per output tile (each loop's copies times its trips per tile, plus the code outside
    loops over the tiles per program)."""
    for row in rows:
        machines = MACHINES.get(row.get("arch"), ())
        warps = row.get("num_warps", 4)
        for loop in row.get("loops") or []:
            if loop.get("macs_per_trip") is None or "histogram" not in loop:
                continue
            mma_ops = loop.get("mma_ops", {})
            loop["mma_per_trip"], loop["other_per_trip"] = _mma_split(loop["histogram"], mma_ops)
            loop["macs_sass"] = sum(mma_macs(mma_ops, warps).values())
            ffma = 0.0 if mma_ops else float(loop["macs_per_trip"])
            loop["mma_models"] = _mma_models(loop["histogram"], mma_ops, warps, machines, ffma)
        if row.get("tiles_per_program") is None or row.get("error"):
            continue
        per_program = 1.0 / row["tiles_per_program"]
        histogram = {k: v * per_program for k, v in row["straight"]["histogram"].items()}
        mma_ops = {k: v * per_program for k, v in row["straight"]["mma_ops"].items()}
        ffma = 0.0
        for loop in row.get("loops") or []:
            if "copies_histogram" not in loop or not loop.get("per_tile"):
                continue
            trips = loop["per_tile"]
            for key, value in loop["copies_histogram"].items():
                histogram[key] = histogram.get(key, 0.0) + trips * value
            for key, value in loop["copies_mma"].items():
                mma_ops[key] = mma_ops.get(key, 0.0) + trips * value
            ffma += trips * loop["copies"] * (loop.get("macs_per_trip") or 0)
        if mma_ops:
            ffma = 0.0
        mma, other = _mma_split(histogram, mma_ops)
        row["tile"] = {
            "mma": mma,
            "other": other,
            "macs": sum(mma_macs(mma_ops, warps).values()) or ffma,
            "mma_ops": sorted(mma_ops),
            "models": _mma_models(histogram, mma_ops, warps, machines, ffma),
        }


def describe_all() -> List[str]:
    return [m.describe() for ms in MACHINES.values() for m in ms]
