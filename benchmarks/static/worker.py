"""Worker side of ``python -m benchmarks.static.aot``: compile variants and read what they became.

One process handles a batch of ``(variant index, arch)`` tasks: it compiles each variant
with ``triton.compile`` for ``sm_<arch>`` (capturing the ptxas report), reads the resource
table with ``cuobjdump`` and disassembles the kernel with line information (``nvdisasm -c
-g``). Each SASS loop is paired with the source loop its backward branch's line falls in
(the innermost ``for`` statement of the kernel or of a jit function inlined into it, by
file and line range): never by position, so a loop ptxas lays out elsewhere cannot take
another's place. The PTX loops of the same source loop give the unroll factor.

The rows carry counts only (instructions and opcode families per source trip, bytes per
trip): what they allow on a GPU is computed afterwards (:mod:`benchmarks.static.machines`),
so the cache survives a change of the machine model.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import inspect
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.static import sass

_WORKER: Dict[str, Any] = {}

Task = Tuple[int, int]  # (variant index, compute capability)


def init_worker(
    variants_loader: Any, modules: Sequence[str], dump_dir: Optional[str], cache_dir: Optional[str]
) -> None:
    """Process initialiser: load the variants, point Triton at an empty cache."""
    # A fresh cache: a cached kernel would skip ptxas and leave no report to read.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="gft-aot-cache-")
    os.environ.pop("TRITON_INTERPRET", None)
    warnings.filterwarnings("ignore", message=".*FP_FUSION.*")
    _WORKER["variants"] = variants_loader(modules)
    _WORKER["dump_dir"] = dump_dir
    _WORKER["cache_dir"] = cache_dir


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def _run_tool(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def _source(variant: Any) -> Any:
    from triton.compiler import ASTSource

    return ASTSource(
        fn=variant.fn,
        signature=dict(variant.signature),
        constexprs=dict(variant.constexprs),
        attrs=dict(variant.attrs),
    )


def compile_variant(variant: Any, arch: int) -> Tuple[Any, str]:
    """(compiled kernel, ptxas report) of one variant for ``sm_<arch>``."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas' -v report to stdout
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(
            _source(variant), target=GPUTarget("cuda", arch, 32), options=variant.options()
        )
    return kernel, log.getvalue()


def describe_error(err: BaseException) -> str:
    """The first line of ``err`` (Triton: where in the source) and its root cause."""
    root = err
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    where = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__} {where}".strip()
    if root is not err:
        text += f" <- {type(root).__name__}: {str(root).strip()[:300]}"
    return text


def _cache_path(variant: Any, arch: int) -> Optional[pathlib.Path]:
    """Where the result of ``variant`` on ``arch`` is cached: a hash of all it depends on
    (kernel source with what it calls, signature, constexprs, attributes, options, loop
    records, Triton's version and this tool's code)."""
    if not _WORKER["cache_dir"] or _WORKER["dump_dir"]:
        return None
    import triton

    tool = "".join(
        pathlib.Path(module.__file__).read_text(encoding="utf-8")
        for module in (sass, sys.modules[__name__])
    )
    key = repr((_source(variant).hash(), arch, sorted(variant.options().items()), variant.loops))
    digest = hashlib.sha256((key + variant.dtype + triton.__version__ + tool).encode())
    return pathlib.Path(_WORKER["cache_dir"]) / f"{digest.hexdigest()}.json"


def analyse_batch(tasks: Sequence[Task]) -> List[Dict[str, Any]]:
    """Rows (see :func:`_resources`, plus ``loops``) for a batch of tasks, in task order."""
    rows: Dict[Task, Dict[str, Any]] = {}
    compiled = []
    for index, arch in tasks:
        variant = _WORKER["variants"][index]
        cache = _cache_path(variant, arch)
        if cache is not None and cache.exists():
            row = json.loads(cache.read_text())
            row.update(kernel=variant.kernel, variant=variant.variant)
            rows[(index, arch)] = row
            continue
        row, kernel = _resources(variant, arch)
        if kernel is None:
            rows[(index, arch)] = row
        else:
            compiled.append(((index, arch), variant, row, kernel, cache))
    for task, variant, row, kernel, cache in compiled:
        text = _disassemble_with_lines(kernel)
        try:
            row["loops"] = loop_entries(variant, text, kernel)
        except ValueError as err:  # a record that does not describe its kernel
            row["error"] = str(err)
        if variant.tiles_per_program is not None:
            row.update(tiles_per_program=variant.tiles_per_program, straight=straight_counts(text))
        if _WORKER["dump_dir"]:
            _dump(variant, task, kernel)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(row))
            tmp.replace(cache)
        rows[task] = row
    return [rows[task] for task in tasks]


def _resources(variant: Any, arch: int) -> Tuple[Dict[str, Any], Any]:
    """Compile; a row with registers, spills, stack, local and shared memory, and the kernel
    (None when the compile failed: the row's ``error`` says why)."""
    row: Dict[str, Any] = {
        "kernel": variant.kernel,
        "variant": variant.variant,
        "dtype": variant.dtype,
        "arch": arch,
        "num_warps": variant.num_warps,
        "error": None,
    }
    try:
        kernel, log = compile_variant(variant, arch)
    except Exception as err:  # a compile failure is a result, reported and gated
        row["error"] = "compile failed: " + describe_error(err)
        return row, None
    name = kernel.metadata.name
    with tempfile.TemporaryDirectory(prefix="gft-aot-") as tmp:
        cubin = pathlib.Path(tmp) / f"{name}.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = _run_tool(_tool("cuobjdump"), "--dump-resource-usage", str(cubin))
    ptxas = sass.parse_ptxas_log(log)
    resources = sass.parse_resource_usage(usage, name)
    row.update(
        registers=ptxas["registers"],
        spill_stores=ptxas["spill_stores"],
        spill_loads=ptxas["spill_loads"],
        stack=max(ptxas["stack"], resources.get("STACK", 0)),
        local=resources.get("LOCAL", 0),
        # Static shared memory (ptxas) or what Triton allocates dynamically, whichever is more.
        shared=max(resources.get("SHARED", 0), int(kernel.metadata.shared)),
        registers_cuobjdump=resources.get("REG"),
    )
    return row, kernel


def _disassemble_with_lines(kernel: Any) -> str:
    with tempfile.TemporaryDirectory(prefix="gft-aot-") as tmp:
        cubin = pathlib.Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        return _run_tool(_tool("nvdisasm"), "-c", "-g", "-ndf", str(cubin))


def _dump(variant: Any, task: Task, kernel: Any) -> None:
    out = pathlib.Path(_WORKER["dump_dir"])
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{variant.kernel}-{task[0]}-sm{task[1]}"
    (out / f"{stem}.sass").write_text(_disassemble_with_lines(kernel))
    (out / f"{stem}.ptx").write_text(kernel.asm["ptx"])


def _resolve(node: ast.AST, scope: Dict[str, Any]) -> Any:
    """The object a call's function expression names (``f`` or ``module.f``), or None."""
    if isinstance(node, ast.Name):
        return scope.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, scope)
        return getattr(base, node.attr, None) if base is not None else None
    return None


def jit_closure(fn: Any) -> List[Any]:
    """``fn`` and every jit function it calls, directly or not (first-call order)."""
    from triton.runtime.jit import JITFunction

    found: List[Any] = []
    pending = [fn]
    while pending:
        current = pending.pop(0)
        if any(current is f for f in found):
            continue
        found.append(current)
        tree = ast.parse(textwrap.dedent(inspect.getsource(current.fn)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                callee = _resolve(node.func, current.fn.__globals__)
                if isinstance(callee, JITFunction):
                    pending.append(callee)
    return found


def declared_loops(variant: Any) -> List[Tuple[Any, sass.SourceLoop]]:
    """Each of the variant's loop records with the source loop it names.

    Raises ValueError unless the records name every loop of the kernel and of the jit
    functions it calls exactly once.
    """
    loops: Dict[Tuple[str, int], sass.SourceLoop] = {}
    for fn in jit_closure(variant.fn):
        lines, first = inspect.getsourcelines(fn.fn)
        file = inspect.getsourcefile(fn.fn)
        for loop in sass.source_loops(fn.__name__, "".join(lines), file, first):
            loops[(loop.function, loop.ordinal)] = loop
    kernel = variant.fn.__name__
    named = [((spec.function or kernel, spec.ordinal), spec) for spec in variant.loops]
    keys = [key for key, _ in named]
    unknown = [key for key in keys if key not in loops]
    missing = [loop for key, loop in loops.items() if key not in keys]
    if unknown or missing or len(set(keys)) != len(keys):
        raise ValueError(
            f"loop records: {variant.kernel} names {keys}, which must name each loop once; "
            f"no such loop: {unknown}; not described: "
            + ", ".join(f"{m.function} #{m.ordinal} (line {m.first})" for m in missing)
        )
    return [(spec, loops[key]) for key, spec in named]


Found = Dict[sass.SourceLoop, List[Tuple[sass.Loop, Optional[int]]]]


def pair_by_line(text: str, ptx_loops: Sequence[sass.Loop], declared) -> Tuple[Found, list]:
    """SASS loops (``nvdisasm -c -g`` text) matched to the declared source loops by the
    source line of their backward branch (:func:`sass.attribute_loop`), each with its
    unroll factor against the PTX loops of the same source loop (None unless exactly one
    factor fits); and the SASS loops that match none."""
    ptx_by_source: Dict[sass.SourceLoop, List[sass.Loop]] = {}
    for loop in ptx_loops:
        source = sass.attribute_loop(loop, declared)
        if source is not None:
            ptx_by_source.setdefault(source, []).append(loop)
    found: Found = {}
    unmatched = []
    for loop in sass.find_loops(text):
        source = sass.attribute_loop(loop, declared)
        if source is None:
            unmatched.append(loop)
            continue
        # A function inlined twice has a PTX loop per copy: the SASS loop compiles one of
        # them, so each is compared alone (summed, they would halve the factor).
        factors = {sass.unroll_factor(loop, [p]) for p in ptx_by_source.get(source, [])}
        factors.discard(None)
        unroll = factors.pop() if len(factors) == 1 else None
        found.setdefault(source, []).append((loop, unroll))
    return found, unmatched


WARP_SIZE = 32


def straight_counts(sass_text: str) -> Dict[str, Any]:
    """Opcode families and tensor-core opcodes of the code outside every loop (a
    tensor-core kernel's once-per-program part: set-up, the last tile's epilogue...)."""
    instructions = sass.straight_line(sass_text)
    histogram = Counter(i.family for i in instructions)
    return {"histogram": dict(histogram.most_common()), "mma_ops": sass.mma_ops(instructions)}


def loop_entries(variant: Any, sass_text: str, kernel: Any) -> List[Dict[str, Any]]:
    """One entry per loop record of ``variant`` (see :func:`measure_loops`)."""
    threads = variant.num_warps * WARP_SIZE
    return measure_loops(declared_loops(variant), threads, sass_text, kernel.asm["ptx"])


def measure_loops(
    pairs: Sequence[Tuple[Any, sass.SourceLoop]], threads: int, sass_text: str, ptx_text: str
) -> List[Dict[str, Any]]:
    """One entry per ``(HotLoop record, source loop)`` pair, measured on its SASS loop(s)
    (``sass_text``: ``nvdisasm -c -g`` output), then one per SASS loop matching no record.

    ptxas unrolls simple loops (a SASS trip then runs several source trips, with the
    remainder after it); counts are per source trip. Of several SASS loops for one source
    loop (a jit function inlined twice), the most unrolled, then the longest, is reported.
    """
    declared = [source for _, source in pairs]
    found, unmatched = pair_by_line(sass_text, sass.find_ptx_loops(ptx_text), declared)
    entries = []
    for spec, source in pairs:
        loops = found.get(source, [])
        entry: Dict[str, Any] = {
            "name": spec.name,
            "source": f"{source.function}:{source.first}",
            "bytes_per_element": spec.bytes_per_element,
            "elements_per_iteration": spec.elements_per_iteration,
            "elements_per_thread": spec.elements_per_iteration / threads,
            "threads": threads,
            "compiled": spec.compiled,
            "edge_blocks": spec.edge_blocks,
            "sass_loops": len(loops),
            "min_ceiling": spec.min_ceiling,
            "macs_per_trip": spec.macs_per_trip,
            "per_tile": spec.per_tile,
        }
        entries.append(entry)
        if not loops:
            continue
        # A SASS loop that holds another loop is not the compiled form of a source loop
        # without one (ptxas may lay code of an inlined function out inside a loop that
        # carries its line): prefer the flat candidates when there are any.
        flat = [p for p in loops if not p[0].nested]
        main, unroll = max(flat or loops, key=lambda p: ((p[1] or 1), p[0].count()))
        if unroll is None:
            entry["note"] = "unroll factor unknown (taken as 1)"
        unroll = unroll or 1
        per_trip = main.count() / unroll
        entry.update(
            unroll=unroll,
            instructions=per_trip,
            nested=main.nested,
            histogram={k: v / unroll for k, v in main.histogram().most_common()},
            instructions_per_element=per_trip / entry["elements_per_thread"],
            memory_bytes=sass.memory_bytes(main) / unroll,
            mma_ops={k: v / unroll for k, v in sass.mma_ops(main.body).items()},
        )
        if spec.per_tile is not None:
            # Per tile every copy runs (a function inlined twice: both), each per source
            # trip; a copy is a SASS loop whose unroll factor is known (a barrier's retry
            # loop that carries the line of the same `for` is none), or the one measured.
            copies = [(lp, u) for lp, u in loops if u is not None] or [(main, unroll)]
            histogram: Counter = Counter()
            mma: Counter = Counter()
            for loop, factor in copies:
                histogram.update({k: v / factor for k, v in loop.histogram().items()})
                mma.update({k: v / factor for k, v in sass.mma_ops(loop.body).items()})
            entry.update(copies=len(copies), copies_histogram=dict(histogram), copies_mma=dict(mma))
    for loop in unmatched:
        entries.append(
            {
                "name": "?",
                "source": None,
                "bytes_per_element": None,
                "sass_loops": 1,
                "instructions": loop.count(),
                "note": "SASS loop not matched to a loop of the kernel or what it calls",
            }
        )
    return entries
