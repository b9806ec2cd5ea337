"""``make gpu-check``: the Triton tests and the GPU benchmarks on a CUDA machine, recorded.

Made for a machine that cannot reach a package index (the H200 our checks run on): by
default nothing is installed from the network. The steps, each printed before it runs and
each with a time limit, fit in about 8 minutes:

1. **GPU**: ``nvidia-smi`` must list a GPU (card name, driver and memory are recorded).
2. **Environment**: the interpreter given with ``--python`` (default: this one) with its own
   torch and Triton; the checkout runs from ``PYTHONPATH``, never installed. Optional
   packages come from a folder of wheels (``--wheels DIR``, installed with ``pip
   --no-index --no-deps`` into the output folder, first on ``PYTHONPATH``): the peers
   Liger-Kernel and Cut Cross-Entropy (pure-Python wheels), or a missing test package. A
   peer that is neither installed nor in the folder is skipped with a line that says so.
   Then the native CPU kernel is built (the suite tests the CPU backends too).
   With ``--venv DIR`` instead: an environment of its own with a CUDA torch (the base
   interpreter's, or ``pip install torch``, from ``$TORCH_CUDA_INDEX`` when set) and the
   project installed, for machines with an index and no CUDA torch.
3. **Tests**: the test modules of the Triton path (:data:`GPU_TESTS`, small shapes) with
   ``TRITON_INTERPRET`` removed, so the kernels run compiled on the GPU. The suite's
   conftest sets ``GFT_KERNELS_SYNC_CHECKS=1`` (bad values raise ``ValueError``); the
   default checks, device-side asserts, run in a subprocess without it
   (``tests/test_device_guard.py``), and ``tests/test_capture_safe.py`` records both
   losses in a CUDA graph.
4. **Sanitizer**: ``compute-sanitizer --tool memcheck`` over a few launches of every kernel
   (:mod:`benchmarks.sanitize`), when the tool is on the PATH.
5. **Benchmarks**: ``python -m benchmarks --device cuda --cases gpu-check``: bf16 at
   ``V = 151936``, N from 4096 to 16384, logits level and fused head (both head strategies,
   ``chunked`` and ``blockwise``), with the naive, careful, ``torch.compile``, Liger, Cut
   Cross-Entropy and verl peers where installed, and the floor rows (bare GEMMs); the record
   says per shape which head strategy is faster.
6. **Record**: a dated section appended to ``benchmarks/RESULTS.md``: the card, the software,
   the commands, the skipped peers, the test summary, the benchmark tables and the
   logits-level rows' achieved bandwidth as a fraction of a measured device-to-device copy.

The record is written even when a step fails (with its summary); the exit status is then
non-zero. Outputs (logs, ``results.json``, ``results.md``, plots) stay in ``--out``.

Without a GPU: ``--dry-run`` prints the plan and checks that every step resolves with what
is installed (each module its interpreter runs, each test file, each wheel, no ``pip``
without ``--no-index``), exiting 1 when one does not; ``--record-only DIR`` writes the
section from the outputs of an earlier check in ``DIR`` (what the tests of this script use).

Only the standard library is imported: this script runs before anything is set up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = REPO_ROOT / "benchmarks" / "RESULTS.md"
DEFAULT_EXTRAS = "test,bench,hf,verl,dev"
INDEX_ENV = "TORCH_CUDA_INDEX"
STATE_FILE = "gpu_check.json"  # what the steps found, read back by the record step
# Probe of an interpreter's torch, printed as one JSON line.
TORCH_PROBE = (
    "import importlib.util, json, torch; print(json.dumps({'version': torch.__version__, "
    "'cuda': torch.version.cuda, 'available': torch.cuda.is_available(), "
    "'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "
    "'triton': __import__('triton').__version__ if importlib.util.find_spec('triton') "
    "else None}))"
)
# Which of the named modules an interpreter finds (with the step's PYTHONPATH).
MODULE_PROBE = (
    "import importlib.util, json, sys\n"
    "def found(name):\n"
    "    try:\n"
    "        return importlib.util.find_spec(name) is not None\n"
    "    except Exception:\n"
    "        return False\n"
    "print(json.dumps({name: found(name) for name in sys.argv[1:]}))"
)
# Optional peers of the benchmarks: distribution name -> module. Both are pure-Python
# wheels, so a folder of wheels brings them to a machine without an index.
PEERS = (("liger-kernel", "liger_kernel"), ("cut-cross-entropy", "cut_cross_entropy"))
# The test modules that run the Triton kernels on CUDA when a GPU is present (small shapes).
GPU_TESTS = (
    "tests/test_backend_registry.py",
    "tests/test_bad_input.py",
    "tests/test_capture_safe.py",
    "tests/test_compile_options.py",
    "tests/test_dcr_boundary.py",
    "tests/test_degenerate_numbers.py",
    "tests/test_device_guard.py",
    "tests/test_dispatch.py",
    "tests/test_fma_math.py",
    "tests/test_fused_linear_gft_loss.py",
    "tests/test_gft_loss.py",
    "tests/test_gft_loss_edge_cases.py",
    "tests/test_gft_loss_properties.py",
    "tests/test_head_blockwise.py",
    "tests/test_head_nan.py",
    "tests/test_inplace_no_backward.py",
    "tests/test_nan_rule.py",
    "tests/test_no_silent_errors.py",
    "tests/test_objective.py",
    "tests/test_row_backends.py",
    "tests/test_softcap_wide.py",
    "tests/test_strided_tokens.py",
    "tests/test_triton_floor.py",
)
# Modules that name CUDA but are not part of the GPU check, and why.
GPU_TESTS_LEFT_OUT = {
    "tests/test_benchmark_gpu_check.py": "this script's own tests (no GPU needed)",
    "tests/test_benchmark_peers.py": "CPU benchmark peers",
    "tests/test_benchmark_runs.py": "the benchmark runner on CPU (step 5 runs it on CUDA)",
    "tests/test_cpu_build.py": "the native CPU kernel's build",
    "tests/test_distributed.py": "gloo process groups on CPU",
    "tests/test_integration_fsdp.py": "trainer integrations (packages the GPU machine lacks)",
    "tests/test_integration_trainer.py": "trainer integrations (packages the GPU machine lacks)",
    "tests/test_integration_trl_ranks.py": "trainer integrations (packages the GPU machine lacks)",
}
# Wall-clock limits of the steps (seconds): about 8 minutes in all.
LIMITS = {"wheels": 30, "native": 60, "tests": 180, "sanitizer": 45, "bench": 150}
TIMEOUT_RC = 124  # what a step that ran past its limit returns, like timeout(1)


@dataclass
class Step:
    """One command of the check."""

    title: str
    argv: List[str]
    env: Dict[str, Optional[str]] = field(default_factory=dict)  # None: removed
    log: Optional[str] = None  # file name in the output folder that receives the output
    timeout_s: Optional[float] = None
    required: bool = True  # a failure of a required step ends the check before the tests

    def shell(self) -> str:
        """The command as a shell line, paths inside the repository relative to it."""
        changes = [
            f"-u {k}" if v is None else f"{k}={shlex.quote(_relative_path_list(v))}"
            for k, v in self.env.items()
        ]
        prefix = ("env " + " ".join(changes) + " ") if changes else ""
        return prefix + " ".join(shlex.quote(_relative(a)) for a in self.argv)


def _relative_path_list(value: str) -> str:
    return os.pathsep.join(_relative(p) or "." for p in value.split(os.pathsep))


def _relative(arg: str) -> str:
    if arg == str(REPO_ROOT):
        return ""
    root = str(REPO_ROOT) + os.sep
    return arg[len(root) :] if arg.startswith(root) else arg


# --------------------------------------------------------------------------- discovery


def gpu_info(runner=subprocess.run) -> Optional[Dict[str, str]]:
    """Name, driver and memory of GPU 0 from ``nvidia-smi``; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = "--query-gpu=name,driver_version,memory.total"
    try:
        proc = runner(
            ["nvidia-smi", query, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln for ln in (proc.stdout or "").splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        return None
    name, driver, memory = ([p.strip() for p in lines[0].split(",")] + ["", "", ""])[:3]
    return {"name": name, "driver": driver, "memory": memory, "count": str(len(lines))}


def probe_torch(python: str) -> Optional[Dict[str, object]]:
    """What ``python``'s torch is (version, CUDA version, device); None if it has none."""
    try:
        proc = subprocess.run(
            [python, "-c", TORCH_PROBE], capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if proc.returncode == 0 and lines else None


def has_cuda_torch(info: Optional[Dict[str, object]]) -> bool:
    return bool(info and info.get("cuda") and info.get("available"))


# --------------------------------------------------------------------------- the plan


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def environment_steps(
    base_python: str,
    venv: Path,
    base_torch: Optional[Dict[str, object]],
    venv_torch: Optional[Dict[str, object]],
    extras: str,
    index: Optional[str],
) -> List[Step]:
    """Commands that give ``venv`` a CUDA torch and the project; never the pinned CPU torch.

    ``base_torch``/``venv_torch``: :func:`probe_torch` of the base interpreter and of the
    environment (None when it has no torch or does not exist yet).
    """
    py = str(venv_python(venv))
    steps: List[Step] = []
    creating = not venv_python(venv).exists()
    # A new environment sees the base interpreter's packages when its torch has CUDA.
    inherits = creating and has_cuda_torch(base_torch)
    if creating:
        argv = [base_python, "-m", "venv"] + (["--system-site-packages"] if inherits else [])
        steps.append(Step("create the environment", argv + [str(venv)]))
    if not inherits and not has_cuda_torch(venv_torch):
        argv = [py, "-m", "pip", "install", "torch"]
        if index:
            # A CPU build already there would satisfy "torch": replace it from the index.
            argv += ["--index-url", index, "--upgrade", "--force-reinstall"]
        steps.append(Step("install a CUDA build of torch", argv))
    steps.append(Step("install the project", [py, "-m", "pip", "install", "-e", f".[{extras}]"]))
    steps.append(Step("build the native CPU kernel", [py, "-m", "gft_kernels.backends.build"]))
    return steps


def probe_modules(
    python: str, names: Sequence[str], env: Optional[Dict[str, Optional[str]]] = None
) -> Dict[str, bool]:
    """Which of ``names`` ``python`` finds from the repository root with ``env`` applied
    (all False when the interpreter does not run)."""
    try:
        proc = subprocess.run(
            [python, "-c", MODULE_PROBE, *names],
            cwd=REPO_ROOT,
            env=_environment(env or {}),
            capture_output=True,
            text=True,
            timeout=120,
        )
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {name: False for name in names}


def wheel_files(wheels: Optional[Path]) -> List[Path]:
    return sorted(wheels.glob("*.whl")) if wheels is not None and wheels.is_dir() else []


def _wheel_module(path: Path) -> str:
    """The distribution of a wheel file, normalised like a module name."""
    return path.name.split("-", 1)[0].lower().replace(".", "_")


def offline_steps(
    python: str, out: Path, wheels: Optional[Path], installed: Dict[str, bool]
) -> Tuple[List[Step], Dict[str, Optional[str]], List[str]]:
    """The environment steps of an offline check: the interpreter's own torch and Triton,
    the checkout on ``PYTHONPATH``, the wheels of ``wheels`` installed without an index.

    Returns the steps, the environment every later step runs with, and one line per peer
    that is skipped (``installed``: module -> whether ``python`` already has it).
    """
    files = wheel_files(wheels)
    site = out / "site-packages"
    path = ([str(site)] if files else []) + [str(REPO_ROOT)]
    env: Dict[str, Optional[str]] = {"PYTHONPATH": os.pathsep.join(path), "TRITON_INTERPRET": None}
    steps: List[Step] = []
    if files:
        argv = [python, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(site)]
        steps.append(
            Step(
                "packages from the wheel folder (no index)",
                argv + [str(f) for f in files],
                log="wheels.log",
                timeout_s=LIMITS["wheels"],
            )
        )
    steps.append(
        Step(
            "build the native CPU kernel",
            [python, "-m", "gft_kernels.backends.build"],
            env=env,
            log="native.log",
            timeout_s=LIMITS["native"],
            required=False,
        )
    )
    in_folder = {_wheel_module(f) for f in files}
    skipped = [
        f"{dist}: not installed and no wheel in {wheels if wheels else 'a --wheels folder'}; "
        "its benchmark rows are skipped"
        for dist, module in PEERS
        if not installed.get(module) and module not in in_folder
    ]
    return steps, env, skipped


def check_steps(
    python: str,
    out: Path,
    bench_args: Sequence[str],
    env: Optional[Dict[str, Optional[str]]] = None,
    workers: int = 0,
    sanitizer: Optional[str] = None,
) -> List[Step]:
    """The Triton tests without the interpreter, the sanitizer (when ``sanitizer`` names
    compute-sanitizer) and the benchmarks on CUDA. ``workers``: pytest-xdist processes
    (0: none), which compile the kernels in parallel."""
    env = dict(env or {"TRITON_INTERPRET": None})
    parallel = ["-n", str(workers), "--dist", "loadfile"] if workers else []
    steps = [
        Step(
            "tests of the Triton path, compiled on the GPU (no interpreter)",
            [python, "-m", "pytest", *GPU_TESTS, "-p", "no:cacheprovider", *parallel],
            env=env,
            log="pytest.log",
            timeout_s=LIMITS["tests"],
        )
    ]
    if sanitizer:
        steps.append(
            Step(
                "compute-sanitizer memcheck over every kernel",
                [sanitizer, "--tool", "memcheck", "--error-exitcode", "1"]
                + [python, "-m", "benchmarks.sanitize"],
                env=env,
                log="sanitizer.log",
                timeout_s=LIMITS["sanitizer"],
            )
        )
    steps.append(
        Step(
            "benchmarks on CUDA",
            # A path inside the repository is passed relative to it: the runner writes its
            # command line into the tables recorded in RESULTS.md.
            [python, "-m", "benchmarks", "--device", "cuda", "--cases", "gpu-check"]
            + ["--out", _relative(str(out))]
            + list(bench_args),
            env=env,
            log="bench.log",
            timeout_s=LIMITS["bench"],
        )
    )
    return steps


def unresolved(
    step: Step, python_env: Dict[str, Optional[str]], brought: Sequence[str] = ()
) -> Optional[str]:
    """Why ``step`` could not run offline with what is installed (None: it can).

    The executable must exist, the module it runs with ``-m`` (and torch and Triton) must
    be found by its interpreter with the step's environment or be ``brought`` by the wheel
    folder, every file argument must exist, and ``pip`` must be told ``--no-index``.
    """
    exe = step.argv[0]
    if shutil.which(exe) is None and not Path(exe).exists():
        return f"{exe}: not found"
    paths = [a for a in step.argv[1:] if a.endswith((".py", ".whl"))]
    missing = [p for p in paths if not (REPO_ROOT / p).exists() and not Path(p).exists()]
    if missing:
        return "missing: " + ", ".join(_relative(p) for p in missing)
    if "-m" in step.argv:
        module = step.argv[step.argv.index("-m") + 1]
        if module == "pip" and "--no-index" not in step.argv:
            return "pip without --no-index would reach for the network"
        python = step.argv[step.argv.index("-m") - 1]
        needed = [module] + (["torch", "triton"] if module != "pip" else [])
        env = {**python_env, **step.env}
        found = probe_modules(python, needed, env)
        lost = [name for name in needed if not found.get(name) and name not in brought]
        if lost:
            return f"{python} does not find: {', '.join(lost)}"
    return None


# --------------------------------------------------------------------------- running


def _environment(changes: Dict[str, Optional[str]]) -> Dict[str, str]:
    env = dict(os.environ)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        elif key == "PYTHONPATH" and env.get("PYTHONPATH"):
            env[key] = value + os.pathsep + env["PYTHONPATH"]
        else:
            env[key] = value
    return env


def run_step(step: Step, out: Path) -> int:
    """Run ``step`` from the repository root, its output to the terminal and its log; a
    step past its time limit is killed and returns ``TIMEOUT_RC``."""
    print(f"\n== {step.title}\n$ {step.shell()}", flush=True)
    log = open(out / step.log, "w") if step.log else None
    timed_out = threading.Event()
    try:
        proc = subprocess.Popen(
            step.argv,
            cwd=REPO_ROOT,
            env=_environment(step.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

        def stop() -> None:
            timed_out.set()
            try:
                os.killpg(proc.pid, 9)
            except OSError:
                pass

        timer = threading.Timer(step.timeout_s, stop) if step.timeout_s else None
        if timer:
            timer.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            if log:
                log.write(line)
        rc = proc.wait()
        if timer:
            timer.cancel()
        if timed_out.is_set():
            note = f"gpu-check: '{step.title}' ran past its {step.timeout_s:.0f} s limit"
            print(note, flush=True)
            if log:
                log.write(note + "\n")
            return TIMEOUT_RC
        return rc
    finally:
        if log:
            log.close()


def pytest_summary(log_text: str) -> str:
    """pytest's closing line ("12 passed, 3 skipped in 40.1s"), or a note that none came."""
    pattern = re.compile(r"\d+ (passed|failed|error|errors|skipped|deselected)\b")
    lines = [ln.strip("= \n") for ln in log_text.splitlines() if pattern.search(ln)]
    return lines[-1] if lines else "no pytest summary line (see pytest.log)"


# --------------------------------------------------------------------------- the record


def record_section(state: dict, results_md: str, bandwidth: str = "") -> str:
    """The Markdown section for RESULTS.md from the check's state, the runner's tables and
    :func:`bandwidth_table`."""
    gpu = state.get("gpu") or {}
    torch_info = state.get("torch") or {}
    card = gpu.get("name") or torch_info.get("device") or "unknown card"
    date = state.get("date", "")[:10]
    lines = [
        f"## GPU check: {card}, {date}",
        "",
        f"- **Card**: {card}"
        + (f", {gpu['memory']}" if gpu.get("memory") else "")
        + (f", driver {gpu['driver']}" if gpu.get("driver") else "")
        + (f" ({gpu['count']} GPUs, GPU 0 used)" if gpu.get("count", "1") != "1" else ""),
        f"- **Software**: torch {torch_info.get('version', '?')} (CUDA "
        f"{torch_info.get('cuda', '?')}), triton {state.get('triton') or '?'}; "
        f"commit `{state.get('commit') or '?'}`; "
        f"started {state.get('date', '?')}",
        "- **Commands**: `make gpu-check`, which ran:",
    ]
    for step in state.get("steps", []):
        status = "" if step.get("rc") is None else f" (exit {step['rc']})"
        lines.append(f"  - `{step['command']}`{status}")
    for line in state.get("skipped", []):
        lines.append(f"- **Skipped**: {line}")
    lines.append(f"- **Tests**: {state.get('tests', 'not run')}")
    lines += ["", results_md.strip() if results_md.strip() else "No benchmark results.", ""]
    if bandwidth:
        lines += [bandwidth, ""]
    return "\n".join(lines)


def bandwidth_table(results: dict) -> str:
    """The logits-level rows' achieved bandwidth: the least traffic any implementation must
    move (read the logits once, write their gradient once: ``2 N V`` elements) over its
    forward + backward time, as a fraction of the device-to-device copy the runner measured
    on the same card. Empty when the results have no copy figure (not a CUDA run)."""
    copy = (results.get("meta") or {}).get("copy_bytes_per_s")
    if not copy:
        return ""
    sizes = {"bfloat16": 2, "float16": 2, "float32": 4}
    rows = []
    for result in results.get("results", []):
        case = result["case"]
        if case["op"] != "gft_loss":
            continue
        traffic = 2 * case["n"] * case["vocab"] * sizes.get(case["dtype"], 4)
        for name, impl in result["impls"].items():
            median = (impl.get("median_ms") or {}).get("fwd_bwd")
            if impl.get("status") != "ok" or not median:
                continue
            achieved = traffic / (median / 1e3)
            rows.append(
                f"| {case['name']} | {name} | {median:.3f} | {achieved / 1e9:.0f} | "
                f"{achieved / copy:.0%} |"
            )
    if not rows:
        return ""
    head = [
        f"Achieved bandwidth, logits level (copy: {copy / 1e9:.0f} GB/s read + written, "
        "measured on this card; traffic counted as 2 N V elements):",
        "",
        "| case | implementation | fwd+bwd ms | GB/s | of copy |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(head + rows)


# The fused-head rows compared per shape: our two head strategies and the peers that also
# keep the logits off memory (or not), against the three bare GEMMs.
HEAD_ROWS = ("gft:triton", "gft:blockwise", "verl", "cce", "liger", "naive", "floor:gemm")


def head_table(results: dict) -> str:
    """The fused-head rows side by side per shape: forward + backward time, its ratio to
    the bare GEMMs, peak extra memory, and which head strategy is faster (the default,
    ``chunked`` = ``gft:triton``, switches to ``blockwise`` only on a measured win)."""
    rows, verdicts = [], []
    for result in results.get("results", []):
        case = result["case"]
        if case["op"] != "fused_linear_gft_loss":
            continue
        times = {}
        for name in HEAD_ROWS:
            impl = result["impls"].get(name) or {}
            median = (impl.get("median_ms") or {}).get("fwd_bwd")
            if impl.get("status") == "ok" and median:
                times[name] = (median, (impl.get("memory") or {}).get("peak_mb"))
        gemm = times.get("floor:gemm", (None, None))[0]
        for name, (median, peak) in times.items():
            ratio = f"{median / gemm:.2f}" if gemm else "-"
            peak_text = f"{peak:.0f}" if peak is not None else "-"
            rows.append(f"| {case['name']} | {name} | {median:.3f} | {ratio} | {peak_text} |")
        ours = {k: times[k][0] for k in ("gft:triton", "gft:blockwise") if k in times}
        peers = {k: v[0] for k, v in times.items() if k not in ("floor:gemm", "naive")}
        if len(ours) == 2 and peers:
            best = min(peers, key=peers.get)
            faster = "blockwise" if ours["gft:blockwise"] < ours["gft:triton"] else "chunked"
            ratio = ours["gft:triton"] / ours["gft:blockwise"]
            verdicts.append(
                f"- {case['name']}: {faster} is faster (chunked / blockwise time "
                f"{ratio:.2f}); fastest of all: {best}"
            )
    if not rows:
        return ""
    head = [
        "Fused head strategies and peers (fwd+bwd; / gemm: over the three bare GEMMs; "
        "peak: extra memory over the inputs, MB):",
        "",
        "| case | implementation | fwd+bwd ms | / gemm | peak MB |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(head + rows + [""] + verdicts)


def append_record(results_path: Path, section: str) -> None:
    text = results_path.read_text() if results_path.exists() else "# Benchmark results\n"
    results_path.write_text(text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n")


def record_from(out: Path, results_path: Path) -> str:
    """Append the section for the check whose outputs are in ``out``; returns it."""
    state_path = out / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if "tests" not in state and (out / "pytest.log").exists():
        state["tests"] = pytest_summary((out / "pytest.log").read_text())
    md = out / "results.md"
    results = out / "results.json"
    tables = ""
    if results.exists():
        parsed = json.loads(results.read_text())
        tables = "\n\n".join(t for t in (bandwidth_table(parsed), head_table(parsed)) if t)
    section = record_section(state, md.read_text() if md.exists() else "", tables)
    append_record(results_path, section)
    return section


def git_commit(dirty_paths: Sequence[str] = ()) -> Optional[str]:
    """Short commit of this checkout (None when git cannot tell); with ``dirty_paths``,
    "+dirty" appended when uncommitted changes touch them (the runner's results name the
    measured code this way)."""
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        commit = proc.stdout.strip()
        if not commit or not dirty_paths:
            return commit or None
        diff = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", *dirty_paths],
            cwd=REPO_ROOT,
            capture_output=True,
            timeout=30,
        )
        return commit + ("+dirty" if diff.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/gpu_check.py",
        description="The Triton tests and the benchmarks on a CUDA machine, offline, "
        "recorded in benchmarks/RESULTS.md.",
    )
    parser.add_argument("--python", default=sys.executable, help="the interpreter to use")
    parser.add_argument(
        "--wheels",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of wheels installed with no index (peers: liger-kernel, "
        "cut-cross-entropy; or a missing test package)",
    )
    parser.add_argument(
        "--venv",
        type=Path,
        default=None,
        help="instead of the interpreter itself: an environment of its own with a CUDA "
        "torch and the project installed (needs a package index)",
    )
    parser.add_argument("--extras", default=DEFAULT_EXTRAS, help="project extras (--venv)")
    parser.add_argument("--out", type=Path, default=None, help="logs and benchmark outputs")
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan and check that every step resolves with what is installed",
    )
    parser.add_argument(
        "--record-only",
        type=Path,
        default=None,
        metavar="DIR",
        help="only append the section for the outputs in DIR",
    )
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument(
        "--bench-args", default="", help="extra arguments of python -m benchmarks (quoted)"
    )
    return parser.parse_args(argv)


def plan(
    args: argparse.Namespace, out: Path
) -> Tuple[List[Step], List[Step], Dict[str, Optional[str]], List[str]]:
    """Setup steps, check steps, the checks' environment and the skipped peers' lines."""
    peers = [module for _, module in PEERS]
    if args.venv is not None:
        venv = args.venv if args.venv.is_absolute() else REPO_ROOT / args.venv
        base_torch = probe_torch(args.python)
        venv_torch = probe_torch(str(venv_python(venv))) if venv_python(venv).exists() else None
        index = os.environ.get(INDEX_ENV) or None
        setup = environment_steps(args.python, venv, base_torch, venv_torch, args.extras, index)
        python = str(venv_python(venv))
        env: Dict[str, Optional[str]] = {"TRITON_INTERPRET": None}
        found = probe_modules(python, peers + ["xdist"]) if venv_python(venv).exists() else {}
        skipped = [f"{d}: not installed in {venv}" for d, m in PEERS if not found.get(m)]
    else:
        python = args.python
        found = probe_modules(python, peers + ["xdist"])
        setup, env, skipped = offline_steps(python, out, args.wheels, found)
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        skipped.append("compute-sanitizer: not on the PATH; the memcheck step is skipped")
    workers = min(8, os.cpu_count() or 1) if found.get("xdist") else 0
    checks = check_steps(python, out, shlex.split(args.bench_args), env, workers, sanitizer)
    if args.skip_tests:
        checks = checks[1:]
    return setup, checks, env, skipped


def dry_run(setup: List[Step], checks: List[Step], env, skipped: List[str], gpu, args) -> int:
    """Print the plan and whether each step resolves offline; 1 when one does not."""
    print(f"gpu-check plan (GPU: {gpu['name'] if gpu else 'none found here'}):")
    wheel_modules = {_wheel_module(f) for f in wheel_files(args.wheels)}
    problems = 0
    for step in setup + checks:
        reason = unresolved(step, {}, brought=wheel_modules)
        problems += reason is not None
        limit = f" (limit {step.timeout_s:.0f} s)" if step.timeout_s else ""
        print(f"  {step.title}{limit}: {step.shell()}")
        print(f"    {'does not resolve: ' + reason if reason else 'resolves offline'}")
    for line in skipped:
        print(f"  skipped: {line}")
    print(f"  record: append a section to {_relative(str(args.results_md.resolve()))}")
    total = sum(s.timeout_s or 0 for s in setup + checks)
    print(f"  time limits add up to {total:.0f} s")
    if problems:
        print(f"gpu-check: {problems} step(s) do not resolve offline", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.record_only is not None:
        print(record_from(args.record_only, args.results_md))
        print(f"\nappended to {args.results_md}")
        return 0

    now = datetime.datetime.now(datetime.timezone.utc)
    default_out = REPO_ROOT / "benchmarks" / "out" / f"gpu-check-{now:%Y%m%d-%H%M%S}"
    out = args.out.resolve() if args.out else default_out
    gpu = gpu_info()
    if gpu is None and not args.dry_run:
        print("gpu-check: nvidia-smi lists no GPU here; it needs a CUDA machine", file=sys.stderr)
        return 2
    setup, checks, env, skipped = plan(args, out)
    if args.dry_run:
        return dry_run(setup, checks, env, skipped, gpu, args)

    out.mkdir(parents=True, exist_ok=True)
    state: dict = {"date": now.isoformat(timespec="seconds"), "gpu": gpu, "steps": []}
    state["commit"] = git_commit()
    state["skipped"] = skipped
    for line in skipped:
        print(f"gpu-check: skipped: {line}")
    for step in setup:
        rc = run_step(step, out)
        state["steps"].append({"title": step.title, "command": step.shell(), "rc": rc})
        if rc != 0 and step.required:
            print(f"gpu-check: '{step.title}' failed (exit {rc})", file=sys.stderr)
            (out / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
            record_from(out, args.results_md)
            return rc
    python = checks[-1].argv[0]
    torch_info = probe_torch(python)
    if not has_cuda_torch(torch_info):
        print(
            f"gpu-check: the torch of {python} has no usable CUDA ({torch_info}). Give an "
            f"interpreter with a CUDA torch (--python), or --venv DIR with {INDEX_ENV} set "
            "to a CUDA wheel index.",
            file=sys.stderr,
        )
        return 3
    state["torch"] = torch_info
    state["triton"] = torch_info.get("triton")
    failed = 0
    for step in checks:
        rc = run_step(step, out)
        state["steps"].append({"title": step.title, "command": step.shell(), "rc": rc})
        failed = failed or rc
        if step.log == "pytest.log":
            state["tests"] = pytest_summary((out / "pytest.log").read_text())
        (out / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    section = record_from(out, args.results_md)
    print(f"\n{section}\nappended to {args.results_md}; outputs in {out}")
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
