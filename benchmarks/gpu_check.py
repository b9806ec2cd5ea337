"""``make gpu-check``: the test suite and the benchmarks on a CUDA machine, recorded.

Steps (each printed before it runs):

1. **GPU**: ``nvidia-smi`` must list a GPU (card name, driver and memory are recorded).
2. **Environment**: a virtual environment of its own (default ``.venv-gpu``; ``make test``'s
   ``.venv`` holds a pinned CPU build of torch on machines without a GPU) with a CUDA build
   of torch: the base interpreter's torch when it has CUDA (the environment then sees the
   base site-packages), else ``pip install torch`` (from the index named by the environment
   variable ``TORCH_CUDA_INDEX`` when set). The torch found must report a CUDA version and a
   usable device, else the check stops. Then the project with its extras, and the native
   CPU kernel (the suite tests the CPU backends too).
3. **Tests**: ``python -m pytest tests`` with ``TRITON_INTERPRET`` removed from the
   environment, so the Triton kernels run compiled on the GPU. The suite's conftest sets
   ``GFT_KERNELS_SYNC_CHECKS=1`` (bad values raise ``ValueError``); the default checks,
   device-side asserts, run in a subprocess without it
   (``tests/test_device_guard.py::test_default_checks_raise_a_device_side_assert``), and
   the GPU-only capture test (``tests/test_capture_safe.py``) records both losses in a
   CUDA graph. Nothing here deselects them.
4. **Benchmarks**: ``python -m benchmarks --device cuda`` (every case, with the Liger-Kernel
   and ``torch.compile`` peers, the careful PyTorch peer and the floor rows, bare GEMMs
   included).
5. **Record**: a dated section appended to ``benchmarks/RESULTS.md``: the card, the software,
   the commands, the test summary and the benchmark tables with their target verdicts.

The record is written even when tests fail (with their summary); the exit status is then
non-zero. Outputs (logs, ``results.json``, plots) stay in ``--out``.

Without a GPU: ``--dry-run`` prints the plan; ``--record-only DIR`` writes the section from
the outputs of an earlier check in ``DIR`` (what the tests of this script use).

Only the standard library is imported: this script runs before the environment exists.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = REPO_ROOT / "benchmarks" / "RESULTS.md"
DEFAULT_VENV = ".venv-gpu"
DEFAULT_EXTRAS = "test,bench,hf,verl,dev"
INDEX_ENV = "TORCH_CUDA_INDEX"
STATE_FILE = "gpu_check.json"  # what the steps found, read back by the record step
# Probe of an interpreter's torch, printed as one JSON line.
TORCH_PROBE = (
    "import json, torch; print(json.dumps({'version': torch.__version__, "
    "'cuda': torch.version.cuda, 'available': torch.cuda.is_available(), "
    "'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))"
)


@dataclass
class Step:
    """One command of the check."""

    title: str
    argv: List[str]
    env: Dict[str, Optional[str]] = field(default_factory=dict)  # None: removed
    log: Optional[str] = None  # file name in the output folder that receives the output

    def shell(self) -> str:
        """The command as a shell line, paths inside the repository relative to it."""
        changes = [f"-u {k}" if v is None else f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        prefix = ("env " + " ".join(changes) + " ") if changes else ""
        return prefix + " ".join(shlex.quote(_relative(a)) for a in self.argv)


def _relative(arg: str) -> str:
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


def check_steps(venv: Path, out: Path, bench_args: Sequence[str]) -> List[Step]:
    """The test suite without the Triton interpreter, then the benchmarks on CUDA."""
    py = str(venv_python(venv))
    return [
        Step(
            "tests, Triton compiled on the GPU (no interpreter)",
            [py, "-m", "pytest", "tests", "-p", "no:cacheprovider"],
            env={"TRITON_INTERPRET": None},
            log="pytest.log",
        ),
        Step(
            "benchmarks on CUDA",
            # A path inside the repository is passed relative to it: the runner writes its
            # command line into the tables recorded in RESULTS.md.
            [py, "-m", "benchmarks", "--device", "cuda", "--out", _relative(str(out))]
            + list(bench_args),
            env={"TRITON_INTERPRET": None},
            log="bench.log",
        ),
    ]


# --------------------------------------------------------------------------- running


def run_step(step: Step, out: Path) -> int:
    """Run ``step`` from the repository root, its output to the terminal and its log."""
    print(f"\n== {step.title}\n$ {step.shell()}", flush=True)
    env = dict(os.environ)
    for key, value in step.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    log = open(out / step.log, "w") if step.log else None
    try:
        proc = subprocess.Popen(
            step.argv,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            if log:
                log.write(line)
        return proc.wait()
    finally:
        if log:
            log.close()


def pytest_summary(log_text: str) -> str:
    """pytest's closing line ("12 passed, 3 skipped in 40.1s"), or a note that none came."""
    pattern = re.compile(r"\d+ (passed|failed|error|errors|skipped|deselected)\b")
    lines = [ln.strip("= \n") for ln in log_text.splitlines() if pattern.search(ln)]
    return lines[-1] if lines else "no pytest summary line (see pytest.log)"


# --------------------------------------------------------------------------- the record


def record_section(state: dict, results_md: str) -> str:
    """The Markdown section for RESULTS.md from the check's state and the runner's tables."""
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
        f"{torch_info.get('cuda', '?')}); commit `{state.get('commit') or '?'}`; "
        f"started {state.get('date', '?')}",
        "- **Commands**: `make gpu-check`, which ran:",
    ]
    for step in state.get("steps", []):
        status = "" if step.get("rc") is None else f" (exit {step['rc']})"
        lines.append(f"  - `{step['command']}`{status}")
    lines.append(f"- **Tests**: {state.get('tests', 'not run')}")
    lines += ["", results_md.strip() if results_md.strip() else "No benchmark results.", ""]
    return "\n".join(lines)


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
    section = record_section(state, md.read_text() if md.exists() else "")
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
        description="Tests and benchmarks on a CUDA machine, recorded in benchmarks/RESULTS.md.",
    )
    parser.add_argument("--python", default=sys.executable, help="base interpreter")
    parser.add_argument("--venv", type=Path, default=Path(DEFAULT_VENV))
    parser.add_argument("--extras", default=DEFAULT_EXTRAS, help="project extras to install")
    parser.add_argument("--out", type=Path, default=None, help="logs and benchmark outputs")
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD)
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.record_only is not None:
        print(record_from(args.record_only, args.results_md))
        print(f"\nappended to {args.results_md}")
        return 0

    now = datetime.datetime.now(datetime.timezone.utc)
    default_out = REPO_ROOT / "benchmarks" / "out" / f"gpu-check-{now:%Y%m%d-%H%M%S}"
    out = args.out.resolve() if args.out else default_out
    venv = args.venv if args.venv.is_absolute() else REPO_ROOT / args.venv
    gpu = gpu_info()
    if gpu is None and not args.dry_run:
        print("gpu-check: nvidia-smi lists no GPU here; it needs a CUDA machine", file=sys.stderr)
        return 2
    base_torch = probe_torch(args.python)
    venv_torch = probe_torch(str(venv_python(venv))) if venv_python(venv).exists() else None
    index = os.environ.get(INDEX_ENV) or None
    setup = environment_steps(args.python, venv, base_torch, venv_torch, args.extras, index)
    checks = check_steps(venv, out, shlex.split(args.bench_args))
    if args.skip_tests:
        checks = checks[1:]

    if args.dry_run:
        print(f"gpu-check plan (GPU: {gpu['name'] if gpu else 'none found here'}):")
        for step in setup + checks:
            print(f"  {step.title}: {step.shell()}")
        print(f"  record: append a section to {_relative(str(args.results_md.resolve()))}")
        return 0

    out.mkdir(parents=True, exist_ok=True)
    state: dict = {"date": now.isoformat(timespec="seconds"), "gpu": gpu, "steps": []}
    state["commit"] = git_commit()
    for step in setup:
        rc = run_step(step, out)
        if rc != 0:
            print(f"gpu-check: '{step.title}' failed (exit {rc})", file=sys.stderr)
            return rc
    torch_info = probe_torch(str(venv_python(venv)))
    if not has_cuda_torch(torch_info):
        print(
            f"gpu-check: the torch in {venv} has no usable CUDA ({torch_info}). Remove "
            f"{venv}, or set {INDEX_ENV} to a CUDA wheel index, or provide a CUDA torch in "
            "the base interpreter.",
            file=sys.stderr,
        )
        return 3
    state["torch"] = torch_info
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
