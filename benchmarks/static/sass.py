"""Reading compiled CUDA kernels: ptxas report, resource usage, SASS loops and their traffic.

Pure text processing (no Triton, no GPU), used by :mod:`benchmarks.static.aot`:

- :func:`parse_ptxas_log` / :func:`parse_resource_usage`: registers, spills, stack, local
  and shared memory from ``ptxas -v`` and ``cuobjdump --dump-resource-usage``;
- :func:`parse_sass` / :func:`find_loops`: instructions of ``nvdisasm -c -g`` output with
  their source lines, and the loops (backward branches) among them;
- :func:`source_loops` / :func:`attribute_loop`: which ``for`` statement of the kernel's
  source a SASS loop compiles;
- :func:`memory_bytes`: the bytes a loop body's global loads and stores move per thread;
- :func:`mma_shape` / :func:`mma_ops`: the tensor-core instructions (``HMMA`` on sm_80,
  ``HGMMA`` or ``HMMA`` on sm_90) of a loop and the multiply-adds each runs per warp;
- :func:`straight_line`: the instructions outside every loop (once per program).

What a loop's counts allow on a given GPU is :mod:`benchmarks.static.machines`' business:
this module knows no machine, so a change of the model does not invalidate cached counts.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

_LINE_RE = re.compile(r'//## File "(?P<file>[^"]+)", line (?P<line>\d+)')
_INSTR_RE = re.compile(r"^\s*/\*(?P<addr>[0-9a-fA-F]+)\*/\s+(?P<text>[^;]*);")
_LABEL_RE = re.compile(r"^\s*(?P<label>\.L_x_\d+):")
_TARGET_RE = re.compile(r"`\((?P<label>\.L_x_\d+)\)")
_PRED_RE = re.compile(r"^@!?U?P[T0-9]+\s+")


@dataclass(frozen=True)
class Instruction:
    """One SASS instruction: byte address, opcode (with modifiers), source file and line."""

    addr: int
    opcode: str
    text: str
    file: Optional[str]
    line: Optional[int]
    predicated: bool = False  # under a guard predicate (``@P0``): a branch may fall through

    @property
    def family(self) -> str:
        """Opcode without modifiers: ``LDG.E.128`` -> ``LDG``."""
        return self.opcode.split(".")[0]


@dataclass
class Loop:
    """A SASS loop: the instructions from a branch target up to the backward branch to it."""

    start: int  # address of the first instruction of the body
    end: int  # address of the backward branch
    body: List[Instruction]
    nested: bool = False  # contains another loop (its body is excluded from ``body``)

    @property
    def back_edge(self) -> Instruction:
        return self.body[-1]

    def count(self) -> int:
        """Instructions issued per trip (NOPs excluded; both sides of a branch counted)."""
        return sum(1 for i in self.body if i.family != "NOP")

    def count_family(self, family: str) -> int:
        return sum(1 for i in self.body if i.family == family)

    def histogram(self) -> Counter:
        return Counter(i.family for i in self.body if i.family != "NOP")


def parse_sass(text: str) -> List[Instruction]:
    """Instructions of ``nvdisasm -c -g`` output; labels are resolved by :func:`find_loops`."""
    instructions = []
    file = line = None
    for raw in text.splitlines():
        m = _LINE_RE.search(raw)
        if m:
            file, line = m.group("file"), int(m.group("line"))
            continue
        m = _INSTR_RE.match(raw)
        if not m:
            continue
        text = m.group("text").strip()
        body = _PRED_RE.sub("", text)
        opcode = body.split()[0] if body else ""
        predicated = body != text and not text.startswith("@PT")
        instructions.append(
            Instruction(int(m.group("addr"), 16), opcode, body, file, line, predicated)
        )
    return instructions


def _labels(text: str, instruction_re: re.Pattern, label_re: re.Pattern) -> Dict[str, int]:
    """Label -> position (address or line number) of the instruction that follows it."""
    labels: Dict[str, int] = {}
    pending: List[str] = []
    for number, raw in enumerate(text.splitlines()):
        m = label_re.match(raw)
        if m:
            pending.append(m.group("label"))
            continue
        m = instruction_re.match(raw)
        if m and pending:
            position = int(m.group("addr"), 16) if "addr" in m.groupdict() else number
            for label in pending:
                labels[label] = position
            pending = []
    return labels


def _label_target(labels: Dict[str, int], family: str, target_re: re.Pattern):
    """``target_of`` for listings whose branches name labels."""

    def target_of(ins: Instruction) -> Optional[int]:
        if ins.family != family:
            return None
        m = target_re.search(ins.text)
        return labels.get(m.group("label")) if m else None

    return target_of


_ENDS_BLOCK = ("EXIT", "RET", "BRA", "JMP", "BRX", "JMX", "KILL")


def _bypasses(
    instructions: Sequence[Instruction], index: Dict[int, int], target_of, header: int, branch: int
) -> bool:
    """Whether control reaches the instruction at ``branch`` from the kernel's entry without
    passing ``header``: then the backward branch does not close a loop (its target does
    not dominate it). ptxas lays rarely taken code out of line, after the kernel's exit
    (e.g. the retry of a Hopper barrier wait), and jumps back from there into the loop
    it left: a backward branch that is no loop. ``index``: address -> position."""
    if header not in index or branch not in index:
        return False
    seen = {index[header]}
    pending = [0]
    while pending:
        i = pending.pop()
        if i in seen or i >= len(instructions):
            continue
        seen.add(i)
        if instructions[i].addr == branch:
            return True
        ins = instructions[i]
        target = target_of(ins)
        if target is not None and target in index:
            pending.append(index[target])
        if ins.predicated or ins.family not in _ENDS_BLOCK:
            pending.append(i + 1)
    return False


def _loops(
    instructions: Sequence[Instruction], target_of, natural_only: bool = False
) -> List[Loop]:
    """Loops formed by backward branches; ``target_of(ins)`` is a branch's target or None.
    ``natural_only``: a backward branch that control can reach without passing its target
    is no loop (:func:`_bypasses`; SASS listings, whose guards are known)."""
    spans: List[Tuple[int, int]] = []
    index = {ins.addr: i for i, ins in enumerate(instructions)}
    for ins in instructions:
        target = target_of(ins)
        # A branch to itself is the trap after the kernel's last EXIT, not a loop.
        if target is not None and target < ins.addr:
            if natural_only and _bypasses(instructions, index, target_of, target, ins.addr):
                continue
            spans.append((target, ins.addr))
    # Several backward branches to one label (a `continue`) form one loop: keep the last.
    by_start: Dict[int, int] = {}
    for start, end in spans:
        by_start[start] = max(end, by_start.get(start, end))
    spans = sorted(by_start.items())
    loops = []
    for start, end in spans:
        inner = [(s, e) for s, e in spans if start <= s and e <= end and (s, e) != (start, end)]
        body = [
            i
            for i in instructions
            if start <= i.addr <= end and not any(s <= i.addr <= e for s, e in inner)
        ]
        loops.append(Loop(start, end, body, nested=bool(inner)))
    return loops


def find_loops(text: str) -> List[Loop]:
    """Loops of one kernel's SASS (``nvdisasm -c -g`` text), in address order.

    A loop is a backward branch (``BRA`` to a label before it). A loop that contains
    another is marked ``nested`` and its body excludes the inner loop's instructions, so
    each instruction counts towards its innermost loop only.
    """
    labels = _labels(text, _INSTR_RE, _LABEL_RE)
    return _loops(parse_sass(text), _label_target(labels, "BRA", _TARGET_RE), natural_only=True)


_RAW_TARGET_RE = re.compile(r"\bBRA\s+(?:`\()?0x(?P<addr>[0-9a-fA-F]+)")


def split_raw_sass(text: str, starts: Sequence[int]) -> List[List[Instruction]]:
    """Split ``nvdisasm -b <arch>`` output of concatenated kernels (the kernel ``k`` starting
    at byte ``starts[k]``) into one instruction list per kernel, addresses and branch
    targets made relative to the kernel's start. Raw listings carry no source lines."""
    kernels: List[List[Instruction]] = [[] for _ in starts]
    bounds = list(starts) + [float("inf")]
    k = 0
    for raw in text.splitlines():
        m = _INSTR_RE.match(raw)
        if not m:
            continue
        addr = int(m.group("addr"), 16)
        while addr >= bounds[k + 1]:
            k += 1
        body = _PRED_RE.sub("", m.group("text").strip())
        target = _RAW_TARGET_RE.search(body)
        if target:
            relative = int(target.group("addr"), 16) - starts[k]
            body = body[: target.start("addr")] + f"{relative:x}" + body[target.end("addr") :]
        opcode = body.split()[0] if body else ""
        kernels[k].append(Instruction(addr - starts[k], opcode, body, None, None))
    return kernels


def find_raw_loops(instructions: Sequence[Instruction]) -> List[Loop]:
    """Loops of one kernel from :func:`split_raw_sass`, in address order."""

    def target_of(ins: Instruction) -> Optional[int]:
        m = _RAW_TARGET_RE.search(ins.text) if ins.family == "BRA" else None
        return int(m.group("addr"), 16) if m else None

    return _loops(instructions, target_of)


def elf_section(image: bytes, name: str) -> bytes:
    """The bytes of section ``name`` of a little-endian ELF64 image (a cubin)."""
    import struct

    if image[:4] != b"\x7fELF" or image[4] != 2:
        raise ValueError("cubin: not an ELF64 image")
    shoff = struct.unpack_from("<Q", image, 0x28)[0]
    entsize, count, names_index = struct.unpack_from("<HHH", image, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", image, shoff + i * entsize) for i in range(count)]
    names_offset = headers[names_index][4]
    for name_at, _, _, _, offset, size in headers:
        start = names_offset + name_at
        if image[start : image.index(b"\0", start)].decode() == name:
            return image[offset : offset + size]
    raise ValueError(f"cubin: no section {name!r}")


_PTX_FILE_RE = re.compile(r'^\s*\.file\s+(?P<id>\d+)\s+"(?P<path>[^"]+)"')
_PTX_LOC_RE = re.compile(r"^\s*\.loc\s+(?P<id>\d+)\s+(?P<line>\d+)")
_PTX_LABEL_RE = re.compile(r"^(?P<label>\$L__BB\w+):")
_PTX_INSTR_RE = re.compile(r"^\s+(?P<text>(?:@!?%\w+\s+)?[a-z][\w.]*[^;]*);")
_PTX_TARGET_RE = re.compile(r"(?P<label>\$L__BB\w+)")


def parse_ptx(text: str) -> List[Instruction]:
    """Instructions of a PTX listing with their ``.loc`` source lines; ``addr`` is the
    line number in ``text``."""
    files: Dict[str, str] = {}
    for raw in text.splitlines():
        m = _PTX_FILE_RE.match(raw)
        if m:
            files[m.group("id")] = m.group("path")
    instructions = []
    file = line = None
    for number, raw in enumerate(text.splitlines()):
        m = _PTX_LOC_RE.match(raw)
        if m:
            file, line = files.get(m.group("id")), int(m.group("line"))
            continue
        m = _PTX_INSTR_RE.match(raw)
        if not m:
            continue
        body = re.sub(r"^@!?%\w+\s+", "", m.group("text").strip())
        instructions.append(Instruction(number, body.split()[0], body, file, line))
    return instructions


def find_ptx_loops(text: str) -> List[Loop]:
    """Loops of one kernel's PTX, as :func:`find_loops` finds them in SASS."""
    labels = _labels(text, _PTX_INSTR_RE, _PTX_LABEL_RE)
    return _loops(parse_ptx(text), _label_target(labels, "bra", _PTX_TARGET_RE))


_LOADS_SASS = ("LDG",)
_STORES_SASS = ("STG", "ATOMG", "REDG", "RED")
_LOADS_PTX = ("ld.global",)
_STORES_PTX = ("st.global", "atom.global", "red.global")


def _is_load(i: Instruction) -> bool:
    return i.family in _LOADS_SASS or i.opcode.startswith(_LOADS_PTX)


def _is_store(i: Instruction) -> bool:
    return i.family in _STORES_SASS or i.opcode.startswith(_STORES_PTX)


def global_memory_ops(loop: Loop) -> int:
    """Global loads, stores and atomics in a SASS or PTX loop body."""
    return sum(1 for i in loop.body if _is_load(i) or _is_store(i))


def unroll_factor(sass_loop: Loop, ptx_loops: Sequence[Loop]) -> Optional[int]:
    """How many source-loop trips one trip of ``sass_loop`` runs (ptxas unrolls simple
    loops): its global loads over those of the PTX loop(s) it compiles, likewise its
    stores, and its tensor-core multiply-adds (``mma`` / ``wgmma`` in PTX, ``HMMA`` /
    ``HGMMA`` in SASS; a tensor-core loop fetches its tiles with asynchronous copies,
    which are neither). None unless every ratio is the same whole number (or there is
    none of these operations): a SASS loop whose operations do not scale together is not
    the compiled form of those PTX loops."""
    ratios = set()
    for kind in (_is_load, _is_store, _mma_macs):
        ptx = sum(_count(kind, i) for lp in ptx_loops for i in lp.body)
        ops = sum(_count(kind, i) for i in sass_loop.body)
        if ptx == ops == 0:
            continue
        if not ptx or not ops or ops % ptx:
            return None
        ratios.add(ops // ptx)
    return ratios.pop() if len(ratios) == 1 else None


def _count(kind, ins: Instruction) -> int:
    """1 per load or store, the multiply-adds of a tensor-core instruction."""
    return int(kind(ins))


# Multiply-adds per warp of an HMMA shape (``HMMA.16816``: m16 n8 k16); HGMMA names its
# warpgroup's shape (``HGMMA.64x256x16``), which the group's four warps issue together.
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "16832": (16, 8, 32)}
_HGMMA_RE = re.compile(r"^HGMMA\.(?P<m>\d+)x(?P<n>\d+)x(?P<k>\d+)")
_PTX_MMA_RE = re.compile(
    r"^(?P<op>wgmma\.mma_async|mma)\.sync\.aligned\.m(?P<m>\d+)n(?P<n>\d+)k(?P<k>\d+)"
)
WARPGROUP = 4


def mma_kind(opcode: str) -> str:
    """The tensor pipe's rate an MMA opcode runs at: ``tf32``, ``16bit`` (bf16 / fp16) or
    ``other`` (integer, fp8: not modelled)."""
    parts = set(opcode.upper().split("."))
    if "TF32" in parts:
        return "tf32"
    if parts & {"E4M3", "E5M2", "E2M1", "S8", "U8", "S4", "U4", "B1"}:
        return "other"
    return "16bit"  # BF16, F16 (SASS names no input type for fp16)


def mma_shape(ins: Instruction) -> Optional[Tuple[int, str]]:
    """``(multiply-adds per warp, kind)`` of a tensor-core instruction (SASS ``HMMA`` /
    ``HGMMA``, PTX ``mma.sync`` / ``wgmma.mma_async``); None for any other."""
    if ins.family == "HMMA":
        parts = ins.opcode.split(".")
        shape = _HMMA_SHAPES.get(parts[1]) if len(parts) > 1 else None
        if shape is None:
            return None
        m, n, k = shape
        return m * n * k, mma_kind(ins.opcode)
    if ins.family == "HGMMA":
        found = _HGMMA_RE.match(ins.opcode)
        if found is None:
            return None
        m, n, k = (int(found.group(x)) for x in "mnk")
        return m * n * k // WARPGROUP, mma_kind(ins.opcode)
    found = _PTX_MMA_RE.match(ins.opcode)
    if found is not None:
        m, n, k = (int(found.group(x)) for x in "mnk")
        macs = m * n * k // (WARPGROUP if found.group("op") != "mma" else 1)
        return macs, mma_kind(ins.opcode)
    return None


def _mma_macs(ins: Instruction) -> int:
    shape = mma_shape(ins)
    return shape[0] if shape else 0


def mma_ops(instructions: Sequence[Instruction]) -> Dict[str, int]:
    """Tensor-core instructions by full opcode (e.g. ``HMMA.16816.F32.BF16``)."""
    return dict(Counter(i.opcode for i in instructions if mma_shape(i) is not None))


def straight_line(text: str) -> List[Instruction]:
    """Instructions of a kernel's SASS outside every loop: what a program runs once (both
    sides of a branch; the alignment NOPs and the trap after the last EXIT left out)."""
    instructions = parse_sass(text)
    target_of = _label_target(_labels(text, _INSTR_RE, _LABEL_RE), "BRA", _TARGET_RE)
    spans = [(lp.start, lp.end) for lp in find_loops(text)]
    return [
        ins
        for ins in instructions
        if ins.family != "NOP"
        and target_of(ins) != ins.addr
        and not any(s <= ins.addr <= e for s, e in spans)
    ]


_WIDTH_RE = re.compile(r"\.(?:(?P<bits>128|64)|[US](?P<small>8|16))\b")


def access_bytes(ins: Instruction) -> int:
    """Bytes one thread moves with a SASS global load or store (``LDG.E.128``: 16,
    ``.64``: 8, ``.U16``/``.S16``: 2, ``.U8``/``.S8``: 1, no width: 4); 0 for others."""
    if not (ins.family in _LOADS_SASS or ins.family in _STORES_SASS):
        return 0
    m = _WIDTH_RE.search(ins.opcode)
    if m is None:
        return 4
    return int(m.group("bits") or m.group("small")) // 8


def memory_bytes(loop: Loop) -> int:
    """Bytes a thread loads and stores per trip of a SASS loop (both sides of a branch)."""
    return sum(access_bytes(i) for i in loop.body)


@dataclass(frozen=True)
class SourceLoop:
    """A ``for`` / ``while`` statement of a jit function: absolute first and last line."""

    function: str  # the function's name
    ordinal: int  # position among that function's loops, in source order
    file: str
    first: int
    last: int


def source_loops(function: str, source: str, file: str, first_line: int) -> List[SourceLoop]:
    """The loops of a function's source text, whose first line is ``first_line`` in ``file``
    (``tl.static_range`` loops excluded: the compiler unrolls them)."""
    tree = ast.parse(textwrap.dedent(source))
    nodes = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.While) or (isinstance(n, ast.For) and not _unrolled(n))
    ]
    nodes.sort(key=lambda n: (n.lineno, n.col_offset))
    offset = first_line - 1
    return [
        SourceLoop(function, i, file, n.lineno + offset, (n.end_lineno or n.lineno) + offset)
        for i, n in enumerate(nodes)
    ]


def _unrolled(node: ast.For) -> bool:
    """``for ... in tl.static_range(...)``: unrolled by the compiler, never a loop."""
    call = node.iter
    if not isinstance(call, ast.Call):
        return False
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name == "static_range"


def attribute_loop(loop: Loop, loops: Sequence[SourceLoop]) -> Optional[SourceLoop]:
    """The innermost source loop that ``loop`` compiles, or None.

    The backward branch carries the file and line of its ``for`` statement (in the kernel or
    in a jit function inlined into it); failing that, the source loop most of the body's
    instructions come from decides.
    """

    def innermost(file: Optional[str], line: Optional[int]) -> Optional[SourceLoop]:
        if line is None:
            return None
        around = [s for s in loops if s.file == file and s.first <= line <= s.last]
        return max(around, key=lambda s: s.first) if around else None

    found = innermost(loop.back_edge.file, loop.back_edge.line)
    if found is not None:
        return found
    votes = Counter(innermost(i.file, i.line) for i in loop.body)
    votes.pop(None, None)
    return votes.most_common(1)[0][0] if votes else None


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> Dict[str, int]:
    """``registers``, ``stack``, ``spill_stores``, ``spill_loads`` (bytes) from ``ptxas -v``.

    Raises ValueError when the report has no register line (no log was captured).
    """
    regs = _PTXAS_REGS.search(log)
    if regs is None:
        raise ValueError(f"ptxas log: no 'Used N registers' line in {log!r}")
    out = {"registers": int(regs.group(1)), "stack": 0, "spill_stores": 0, "spill_loads": 0}
    spill = _PTXAS_SPILL.search(log)
    if spill:
        out["stack"], out["spill_stores"], out["spill_loads"] = map(int, spill.groups())
    smem = _PTXAS_SMEM.search(log)
    out["static_smem"] = int(smem.group(1)) if smem else 0
    return out


_RESOURCE_RE = re.compile(r"Function (?P<name>\S+):\s*\n\s*(?P<fields>REG:.*)")


def parse_resource_usage(text: str, kernel: str) -> Dict[str, int]:
    """``REG``, ``STACK``, ``SHARED``, ``LOCAL``... of ``kernel`` from cuobjdump's report."""
    for m in _RESOURCE_RE.finditer(text):
        if m.group("name") == kernel:
            fields = {}
            for item in m.group("fields").split():
                key, _, value = item.partition(":")
                if value.isdigit():
                    fields[key] = int(value)
            return fields
    raise ValueError(f"resource usage: no entry for function {kernel!r} in {text!r}")
