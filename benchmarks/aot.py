"""``python -m benchmarks.aot`` (``make aot``): compile every Triton kernel variant without a GPU.

Every module of ``gft_kernels`` that defines ``aot_variants()`` lists the compilations its
wrappers can launch (:class:`gft_kernels.ops.variants.KernelVariant`). Each is compiled with
``triton.compile`` for each target architecture (sm_80 and sm_90 by default), then read:

- registers, spills and stack from the ptxas report, local and shared memory from
  ``cuobjdump --dump-resource-usage`` (plus the shared memory Triton allocates itself);
- each hot loop from the SASS (``nvdisasm``): instructions per trip over the elements one
  thread handles per trip (``elements_per_iteration / (num_warps * 32)``) gives the
  instructions per element, and with the loop's bytes per element the fraction of HBM
  bandwidth that instruction issue (and the MUFU unit) allows (:mod:`benchmarks.sass`).

Exits 1 on a compile failure, a spill, local memory, or a loop of a gated dtype (bf16) whose
sm_90 ceiling is below ``--min-ceiling`` (0.85); the table and the summary say why.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks import sass

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_ARCHS = (80, 90)
GATED_ARCH = 90
GATED_DTYPES = ("bf16",)
MIN_CEILING = 0.85


def discover_modules(package_dir: pathlib.Path = ROOT / "gft_kernels") -> List[str]:
    """Modules under ``package_dir`` whose source defines ``aot_variants`` (found by text, so
    nothing else is imported)."""
    names = []
    for path in sorted(package_dir.rglob("*.py")):
        if "def aot_variants(" in path.read_text(encoding="utf-8"):
            rel = path.relative_to(package_dir.parent).with_suffix("")
            names.append(".".join(rel.parts))
    return names


def load_variants(modules: Sequence[str]) -> List[Any]:
    """Every module's ``aot_variants()``, concatenated in module order."""
    variants = []
    for name in modules:
        variants.extend(importlib.import_module(name).aot_variants())
    return variants


# ---------------------------------------------------------------------------------------
# Worker side: one process compiles and analyses one (variant, arch) at a time.

_WORKER: Dict[str, Any] = {}


def _init_worker(modules: Sequence[str], dump_dir: Optional[str], cache_dir: Optional[str]) -> None:
    # A fresh cache: a cached kernel would skip ptxas and leave no report to read.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="gft-aot-cache-")
    os.environ.pop("TRITON_INTERPRET", None)
    warnings.filterwarnings("ignore", message=".*FP_FUSION.*")
    _WORKER["variants"] = load_variants(modules)
    _WORKER["dump_dir"] = dump_dir
    _WORKER["cache_dir"] = cache_dir


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def _compile(variant: Any, arch: int) -> Tuple[Any, str]:
    """(compiled kernel, ptxas report) of one variant for ``sm_<arch>``."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(
        fn=variant.fn,
        signature=dict(variant.signature),
        constexprs=dict(variant.constexprs),
        attrs=dict(variant.attrs),
    )
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas' -v report to stdout
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=variant.options())
    return kernel, log.getvalue()


def describe_error(err: BaseException) -> str:
    """The first line of ``err`` (Triton: where in the source) and its root cause."""
    root = err
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    where = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__} {where}"
    if root is not err:
        text += f" <- {type(root).__name__}: {str(root).strip()[:300]}"
    return text


def _cache_key(variant: Any, arch: int) -> str:
    """Hash of all a result depends on: the kernel source (with what it calls), signature,
    constexprs, attributes, options, loop records, Triton's version and this tool's code."""
    import hashlib

    import triton
    from triton.compiler import ASTSource

    src = ASTSource(
        fn=variant.fn,
        signature=dict(variant.signature),
        constexprs=dict(variant.constexprs),
        attrs=dict(variant.attrs),
    )
    tool = "".join(
        pathlib.Path(m.__file__).read_text(encoding="utf-8") for m in (sass, sys.modules[__name__])
    )
    key = repr((src.hash(), arch, sorted(variant.options().items()), variant.loops, variant.dtype))
    return hashlib.sha256((key + triton.__version__ + tool).encode()).hexdigest()


def analyse(index: int, arch: int) -> Dict[str, Any]:
    """Compile variant ``index`` for ``sm_<arch>`` and read resources and loops (worker).

    With a cache directory, a result whose inputs have not changed is read back instead.
    """
    variant = _WORKER["variants"][index]
    cache = None
    if _WORKER["cache_dir"] and not _WORKER["dump_dir"]:
        cache = pathlib.Path(_WORKER["cache_dir"]) / f"{_cache_key(variant, arch)}.json"
        if cache.exists():
            row = json.loads(cache.read_text())
            row.update(kernel=variant.kernel, variant=variant.variant)
            return row
    row = _analyse(variant, index, arch)
    if cache is not None and not (row["error"] or "").startswith("compile failed"):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(row))
        tmp.replace(cache)
    return row


def _analyse(variant: Any, index: int, arch: int) -> Dict[str, Any]:
    row: Dict[str, Any] = {
        "kernel": variant.kernel,
        "variant": variant.variant,
        "dtype": variant.dtype,
        "arch": arch,
        "num_warps": variant.num_warps,
        "error": None,
    }
    try:
        kernel, log = _compile(variant, arch)
    except Exception as err:  # a compile failure is a result, reported and gated
        row["error"] = "compile failed: " + describe_error(err)
        return row
    name = kernel.metadata.name
    with tempfile.TemporaryDirectory(prefix="gft-aot-") as tmp:
        cubin = pathlib.Path(tmp) / f"{name}.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        sass_text = subprocess.run(
            [_tool("nvdisasm"), "-c", "-g", "-ndf", str(cubin)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    if _WORKER["dump_dir"]:
        out = pathlib.Path(_WORKER["dump_dir"])
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{variant.kernel}-{index}-sm{arch}"
        (out / f"{stem}.sass").write_text(sass_text)
        (out / f"{stem}.ptx").write_text(kernel.asm["ptx"])
        row["dump"] = str(out / stem)
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
    try:
        row["loops"] = _loops(variant, arch, sass_text, kernel.asm["ptx"])
    except ValueError as err:  # a record that does not describe its kernel
        row["error"] = str(err)
    return row


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
            f"{variant.kernel}: loop records {keys} must name each loop once; "
            f"no such loop: {unknown}; not described: "
            + ", ".join(f"{m.function} #{m.ordinal} (line {m.first})" for m in missing)
        )
    return [(spec, loops[key]) for key, spec in named]


def _by_source(loops: Sequence[sass.Loop], declared: Sequence[sass.SourceLoop]):
    """Group loops by the source loop they compile; the unmatched ones separately."""
    found: Dict[sass.SourceLoop, List[sass.Loop]] = {}
    unmatched = []
    for loop in loops:
        source = sass.attribute_loop(loop, declared)
        if source is None:
            unmatched.append(loop)
        else:
            found.setdefault(source, []).append(loop)
    return found, unmatched


def _loops(variant: Any, arch: int, sass_text: str, ptx_text: str) -> List[Dict[str, Any]]:
    """One entry per loop of the kernel's body, measured on its SASS loop(s).

    ptxas unrolls simple loops (a SASS trip then runs several source trips, with a
    remainder after it); the unroll factor comes from the global memory operations of the
    SASS loop over those of the PTX loop, and counts are given per source trip. Of several
    SASS loops for one source loop, the most unrolled (the one long rows spend their time
    in) is reported.
    """
    pairs = declared_loops(variant)
    declared = [source for _, source in pairs]
    machine = sass.MACHINES.get(arch)
    threads = variant.num_warps * (machine.warp_size if machine else 32)
    found, unmatched = _by_source(sass.find_loops(sass_text), declared)
    ptx_found, _ = _by_source(sass.find_ptx_loops(ptx_text), declared)
    entries = []
    for spec, source in pairs:
        loops = found.get(source, [])
        entry: Dict[str, Any] = {
            "name": spec.name,
            "source": f"{source.function}:{source.first}",
            "bytes_per_element": spec.bytes_per_element,
            "elements_per_thread": spec.elements_per_iteration / threads,
            "sass_loops": len(loops),
        }
        entries.append(entry)
        if not loops:
            entry["note"] = "no SASS loop (a single trip, or compiled out)"
            continue
        unrolls = [sass.unroll_factor(lp, ptx_found.get(source, [])) for lp in loops]
        main, unroll = max(zip(loops, unrolls), key=lambda p: ((p[1] or 1), p[0].count()))
        if unroll is None:
            entry["note"] = "unroll factor unknown (taken as 1)"
        unroll = unroll or 1
        per_trip = main.count() / unroll
        entry.update(
            unroll=unroll,
            instructions=per_trip,
            mufu=main.count_family("MUFU") / unroll,
            nested=main.nested,
            histogram={k: v / unroll for k, v in main.histogram().most_common()},
            instructions_per_element=per_trip / entry["elements_per_thread"],
        )
        if machine and spec.bytes_per_element:
            bounds = sass.ceiling(
                per_trip,
                entry["mufu"],
                entry["elements_per_thread"],
                spec.bytes_per_element,
                machine,
            )
            entry.update(
                mufu_per_element=bounds.mufu_per_element,
                ceiling_issue=bounds.issue,
                ceiling_mufu=bounds.mufu,
                ceiling=bounds.ceiling,
                bound=bounds.bound,
            )
    for loop in unmatched:
        entries.append(
            {
                "name": "?",
                "source": f"{loop.back_edge.file}:{loop.back_edge.line}",
                "bytes_per_element": None,
                "sass_loops": 1,
                "instructions": loop.count(),
                "note": "SASS loop not matched to a loop of the kernel's body",
            }
        )
    return entries


# ---------------------------------------------------------------------------------------
# Gate and report.


def failures(row: Dict[str, Any], min_ceiling: float) -> List[str]:
    """Why a compiled (variant, arch) fails the check; empty when it passes."""
    if row["error"]:
        return [row["error"]]
    why = []
    if row["spill_stores"] or row["spill_loads"]:
        why.append(f"spills {row['spill_stores']} B stored / {row['spill_loads']} B loaded")
    if row["local"] or row["stack"]:
        why.append(f"local memory {row['local']} B, stack {row['stack']} B")
    if row["arch"] == GATED_ARCH and row["dtype"] in GATED_DTYPES:
        for loop in row["loops"]:
            if loop.get("ceiling") is not None and loop["ceiling"] < min_ceiling:
                why.append(
                    f"loop {loop['name']!r}: {loop['instructions_per_element']:.1f} instr/elem "
                    f"caps {sass.MACHINES[row['arch']].name} at {loop['ceiling']:.0%} of HBM "
                    f"({loop['bound']}-bound) < {min_ceiling:.0%}"
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
            kind = reason.split(":")[0] if ":" in reason else reason.split()[0]
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


def run(
    modules: Sequence[str],
    archs: Sequence[int],
    jobs: int,
    name_filters: Optional[Sequence[str]] = None,
    dump_dir: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """Compile and analyse every selected variant for every arch, in ``jobs`` processes."""
    variants = load_variants(modules)
    chosen = [
        i
        for i, v in enumerate(variants)
        if not name_filters or any(f in f"{v.kernel}/{v.variant}" for f in name_filters)
    ]
    tasks = [(i, arch) for i in chosen for arch in archs]
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    rows: List[Dict[str, Any]] = []
    start = time.perf_counter()
    with ProcessPoolExecutor(
        max_workers=max(1, jobs),
        mp_context=context,
        initializer=_init_worker,
        initargs=(list(modules), dump_dir, cache_dir),
    ) as pool:
        futures = [pool.submit(analyse, i, arch) for i, arch in tasks]
        for n, future in enumerate(futures, 1):
            rows.append(future.result())
            if n % 50 == 0 or n == len(futures):
                print(
                    f"  compiled {n}/{len(futures)} ({time.perf_counter() - start:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aot", description=__doc__)
    parser.add_argument("--modules", help="comma-separated modules with aot_variants()")
    parser.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)))
    parser.add_argument(
        "--filter",
        action="append",
        help="compile only variants whose 'kernel/variant' contains this (repeatable: any)",
    )
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--min-ceiling", type=float, default=MIN_CEILING)
    parser.add_argument("--json", help="write every result (loop histograms included) here")
    parser.add_argument("--dump-dir", help="keep each compilation's SASS and PTX here")
    parser.add_argument(
        "--cache-dir", help="reuse results whose kernel source, options and tool are unchanged"
    )
    parser.add_argument("--breakdown", action="store_true", help="print loop opcode counts")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    args = parser.parse_args(argv)
    modules = args.modules.split(",") if args.modules else discover_modules()
    archs = [int(a) for a in args.arch.split(",")]
    if args.list:
        for v in load_variants(modules):
            print(f"{v.kernel}/{v.variant}")
        return 0
    import triton

    print(f"triton {triton.__version__}; modules: {', '.join(modules)}; {args.jobs} jobs")
    rows = run(modules, archs, args.jobs, args.filter, args.dump_dir, args.cache_dir)
    if not rows:
        print(f"no variant matches --filter {args.filter!r}")
        return 1
    print(table(rows, args.min_ceiling))
    if args.breakdown:
        for row in rows:
            for loop in row.get("loops") or []:
                if "histogram" in loop:
                    counts = ", ".join(f"{k} {v:g}" for k, v in loop["histogram"].items())
                    print(
                        f"{row['kernel']}/{row['variant']} sm_{row['arch']} {loop['name']}: "
                        f"{counts}"
                    )
    print(summary(rows, args.min_ceiling))
    print(machines_note())
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    failed = [row for row in rows if failures(row, args.min_ceiling)]
    if failed:
        print(f"make aot: FAILED ({len(failed)} of {len(rows)} compilations; reasons above)")
        return 1
    print("make aot: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
