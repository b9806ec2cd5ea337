"""``make gpu-check``'s script, the parts that run without a GPU: the plan and the record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

CUDA_TORCH = {"version": "2.13.0+cu128", "cuda": "12.8", "available": True, "device": "H100"}
CPU_TORCH = {"version": "2.13.0+cpu", "cuda": None, "available": False, "device": None}


def _titles(steps):
    return [s.title for s in steps]


def test_new_environment_inherits_a_cuda_torch_of_the_base(tmp_path):
    steps = gpu_check.environment_steps(
        "python3", tmp_path / "venv", CUDA_TORCH, None, "test,bench", None
    )
    assert steps[0].argv == [
        "python3",
        "-m",
        "venv",
        "--system-site-packages",
        str(tmp_path / "venv"),
    ]
    assert "install a CUDA build of torch" not in _titles(steps)
    assert all("torch==" not in " ".join(s.argv) for s in steps)


def test_cpu_only_base_gets_torch_installed_never_the_pin(tmp_path):
    steps = gpu_check.environment_steps(
        "python3", tmp_path / "venv", CPU_TORCH, None, "test,bench", None
    )
    assert "--system-site-packages" not in steps[0].argv
    install = steps[_titles(steps).index("install a CUDA build of torch")]
    assert install.argv[-1] == "torch"  # unpinned: the platform's default build
    # With an index for CUDA wheels, a CPU build already there is replaced from it.
    steps = gpu_check.environment_steps(
        "python3", tmp_path / "venv", CPU_TORCH, None, "test", "https://example.invalid/cu128"
    )
    install = steps[_titles(steps).index("install a CUDA build of torch")]
    assert install.argv[-4:] == [
        "--index-url",
        "https://example.invalid/cu128",
        "--upgrade",
        "--force-reinstall",
    ]


def test_existing_environment_with_cuda_torch_is_reused(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    steps = gpu_check.environment_steps("python3", venv, CPU_TORCH, CUDA_TORCH, "test", None)
    assert _titles(steps) == ["install the project", "build the native CPU kernel"]
    assert steps[0].argv[-1] == ".[test]"


def test_checks_run_without_the_triton_interpreter(tmp_path):
    tests, bench = gpu_check.check_steps("python3", tmp_path / "out", ["--no-plots"])
    assert tests.env == {"TRITON_INTERPRET": None}
    assert tests.shell().startswith("env -u TRITON_INTERPRET ")
    assert tests.argv[1:3] == ["-m", "pytest"]
    assert tests.argv[3 : 3 + len(gpu_check.GPU_TESTS)] == list(gpu_check.GPU_TESTS)
    assert bench.argv[1:7] == ["-m", "benchmarks", "--device", "cuda", "--cases", "gpu-check"]
    assert bench.argv[-1] == "--no-plots"
    # Inside the repository the output folder is named relative to it (the runner records
    # its command line in the tables).
    inside = gpu_check.REPO_ROOT / "benchmarks" / "out" / "x"
    _, bench = gpu_check.check_steps("python3", inside, [])
    assert bench.argv[-2:] == ["--out", "benchmarks/out/x"]
    # With pytest-xdist the kernels compile in parallel; with compute-sanitizer a memcheck
    # step runs the sanitizer's launches under the same interpreter.
    tests, sanitizer, _ = gpu_check.check_steps("py", tmp_path, [], None, 8, "/x/compute-sanitizer")
    assert tests.argv[-4:] == ["-n", "8", "--dist", "loadfile"]
    assert sanitizer.argv[:5] == [
        "/x/compute-sanitizer",
        "--tool",
        "memcheck",
        "--error-exitcode",
        "1",
    ]
    assert sanitizer.argv[-3:] == ["py", "-m", "benchmarks.sanitize"]
    assert all(step.timeout_s for step in (tests, sanitizer))


def test_offline_plan_installs_nothing_from_an_index(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "liger_kernel-0.6.4-py3-none-any.whl").write_text("")
    out = tmp_path / "out"
    steps, env, skipped = gpu_check.offline_steps("py", out, wheels, installed={})
    install, native = steps
    site = str(out / "site-packages")
    assert install.argv == ["py", "-m", "pip", "install", "--no-index", "--no-deps"] + [
        "--target",
        site,
        str(wheels / "liger_kernel-0.6.4-py3-none-any.whl"),
    ]
    assert native.argv == ["py", "-m", "gft_kernels.backends.build"] and not native.required
    # The checkout runs from PYTHONPATH (after the wheels' folder), never installed.
    assert env["PYTHONPATH"].split(os.pathsep) == [
        str(out / "site-packages"),
        str(gpu_check.REPO_ROOT),
    ]
    assert env["TRITON_INTERPRET"] is None
    assert len(skipped) == 1 and skipped[0].startswith("cut-cross-entropy: not installed")
    # Without a folder nothing is installed; an installed peer is not skipped.
    steps, env, skipped = gpu_check.offline_steps(
        "py", out, None, installed={"cut_cross_entropy": True}
    )
    assert [s.title for s in steps] == ["build the native CPU kernel"]
    assert env["PYTHONPATH"] == str(gpu_check.REPO_ROOT)
    assert [line.split(":")[0] for line in skipped] == ["liger-kernel"]
    every = [" ".join(s.argv) for s in steps]
    assert not any("pip install" in c and "--no-index" not in c for c in every)


def test_a_step_that_would_need_the_network_or_a_missing_file_does_not_resolve(tmp_path):
    python = sys.executable
    ok = gpu_check.Step("t", [python, "-m", "pytest", "tests/test_gft_loss.py"])
    assert gpu_check.unresolved(ok, {}) is None
    online = gpu_check.Step("w", [python, "-m", "pip", "install", "liger-kernel"])
    assert "--no-index" in gpu_check.unresolved(online, {})
    missing = gpu_check.Step("t", [python, "-m", "pytest", "tests/test_not_there.py"])
    assert gpu_check.unresolved(missing, {}) == "missing: tests/test_not_there.py"
    absent = gpu_check.Step("m", [python, "-m", "no_such_module_here"])
    assert "does not find: no_such_module_here" in gpu_check.unresolved(absent, {})
    # A module that a wheel of the folder brings resolves.
    assert gpu_check.unresolved(absent, {}, brought=["no_such_module_here"]) is None
    assert "not found" in gpu_check.unresolved(gpu_check.Step("x", ["/no/such/exe"]), {})


def test_the_offline_dry_run_resolves_with_what_is_installed(tmp_path):
    """What CI proves of the offline path: with pip forbidden an index, every step of the
    plan (this interpreter, the checkout on PYTHONPATH) finds what it runs."""
    script = str(gpu_check.REPO_ROOT / "benchmarks" / "gpu_check.py")
    env = {**os.environ, "PIP_NO_INDEX": "1"}
    cmd = [sys.executable, script, "--dry-run", "--python", sys.executable]
    cmd += ["--out", str(tmp_path / "o"), "--results-md", str(tmp_path / "R.md")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("resolves offline") == 3  # native build, tests, benchmarks
    assert "does not resolve" not in proc.stdout
    assert "pip install" not in proc.stdout  # no wheel folder: nothing installed
    assert not (tmp_path / "o").exists() and not (tmp_path / "R.md").exists()
    total = float(proc.stdout.split("time limits add up to ")[1].split()[0])
    assert total <= 8 * 60
    # With a wheel folder and compute-sanitizer too, every step's limit together.
    assert sum(gpu_check.LIMITS.values()) <= 8 * 60


def test_gpu_tests_cover_every_module_that_runs_on_cuda():
    root = gpu_check.REPO_ROOT
    named = set(gpu_check.GPU_TESTS) | set(gpu_check.GPU_TESTS_LEFT_OUT)
    for path in sorted((root / "tests").glob("test_*.py")):
        text = path.read_text()
        on_cuda = any(k in text for k in ("device_for", "HAS_CUDA", '"cuda"', ".cuda"))
        rel = f"tests/{path.name}"
        assert not on_cuda or rel in named, f"{rel} runs on CUDA but gpu-check does not name it"
    for rel in named:
        assert (root / rel).exists(), rel
    assert not set(gpu_check.GPU_TESTS) & set(gpu_check.GPU_TESTS_LEFT_OUT)


def test_a_step_past_its_limit_is_stopped(tmp_path):
    step = gpu_check.Step("sleep", [sys.executable, "-c", "import time; time.sleep(60)"])
    step.timeout_s = 1
    step.log = "sleep.log"
    assert gpu_check.run_step(step, tmp_path) == gpu_check.TIMEOUT_RC
    assert "ran past its 1 s limit" in (tmp_path / "sleep.log").read_text()


def test_bandwidth_table_is_traffic_over_time_against_the_measured_copy():
    case = {"name": "gft_loss/bfloat16/V1000/N500", "op": "gft_loss", "n": 500, "vocab": 1000}
    case["dtype"] = "bfloat16"
    impls = {
        "gft:triton": {"status": "ok", "median_ms": {"fwd_bwd": 0.001}},
        "liger": {"status": "skipped", "median_ms": None},
    }
    results = {"meta": {"copy_bytes_per_s": 4e12}, "results": [{"case": case, "impls": impls}]}
    table = gpu_check.bandwidth_table(results)
    # 2 * 500 * 1000 * 2 bytes in 1 us = 2 TB/s, half of the 4 TB/s copy.
    assert "| gft_loss/bfloat16/V1000/N500 | gft:triton | 0.001 | 2000 | 50% |" in table
    assert "liger" not in table
    assert gpu_check.bandwidth_table({"meta": {}, "results": []}) == ""


def test_head_table_compares_the_strategies_against_the_gemms():
    case = {"name": "fused/N16384", "op": "fused_linear_gft_loss", "n": 16384, "vocab": 151936}
    ok = lambda ms, mb=None: {  # noqa: E731
        "status": "ok",
        "median_ms": {"fwd_bwd": ms},
        "memory": None if mb is None else {"peak_mb": mb},
    }
    impls = {
        "gft:triton": ok(12.0, 900),
        "gft:blockwise": ok(10.0, 40),
        "verl": ok(11.0),
        "floor:gemm": ok(8.0),
        "cce": {"status": "skipped", "median_ms": None},
    }
    table = gpu_check.head_table({"results": [{"case": case, "impls": impls}]})
    assert "| fused/N16384 | gft:blockwise | 10.000 | 1.25 | 40 |" in table
    assert "| fused/N16384 | gft:triton | 12.000 | 1.50 | 900 |" in table
    assert "cce" not in table
    assert "- fused/N16384: blockwise is faster (chunked / blockwise time 1.20)" in table
    assert "fastest of all: gft:blockwise" in table
    impls["gft:blockwise"] = ok(13.0)
    table = gpu_check.head_table({"results": [{"case": case, "impls": impls}]})
    assert "chunked is faster" in table and "fastest of all: verl" in table
    assert gpu_check.head_table({"results": []}) == ""


def test_run_step_removes_the_interpreter_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    step = gpu_check.Step(
        "env",
        [sys.executable, "-c", "import os; print('TI=' + os.environ.get('TRITON_INTERPRET', '-'))"],
        env={"TRITON_INTERPRET": None},
        log="env.log",
    )
    assert gpu_check.run_step(step, tmp_path) == 0
    assert "TI=-" in (tmp_path / "env.log").read_text()


def test_gpu_info_parses_nvidia_smi(monkeypatch):
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: "/usr/bin/" + name)

    def fake_run(argv, **kw):
        out = "NVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB\n" * 2
        return subprocess.CompletedProcess(argv, 0, stdout=out, stderr="")

    info = gpu_check.gpu_info(runner=fake_run)
    assert info == {
        "name": "NVIDIA H100 80GB HBM3",
        "driver": "550.54.15",
        "memory": "81559 MiB",
        "count": "2",
    }
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    assert gpu_check.gpu_info(runner=fake_run) is None


def test_pytest_summary_line():
    log = "tests/test_a.py ....\n==== 420 passed, 3 skipped, 2 warnings in 95.20s ====\n"
    assert gpu_check.pytest_summary(log) == "420 passed, 3 skipped, 2 warnings in 95.20s"
    assert gpu_check.pytest_summary("ImportError: boom").startswith("no pytest summary")


def _fake_check_outputs(out: Path) -> None:
    out.mkdir()
    state = {
        "date": "2026-11-26T10:00:00+00:00",
        "gpu": {"name": "NVIDIA H100 80GB HBM3", "driver": "550.54.15", "memory": "81559 MiB"},
        "torch": CUDA_TORCH,
        "commit": "abc1234",
        "steps": [
            {
                "title": "tests",
                "command": "env -u TRITON_INTERPRET python -m pytest tests",
                "rc": 1,
            },
            {"title": "bench", "command": "python -m benchmarks --device cuda", "rc": 0},
        ],
    }
    (out / gpu_check.STATE_FILE).write_text(json.dumps(state))
    (out / "pytest.log").write_text("=== 1 failed, 419 passed in 99.0s ===\n")
    (out / "results.md").write_text("Machine: cuda (NVIDIA H100 80GB HBM3)\n\n### table\n| a |\n")


def test_record_appends_a_dated_section(tmp_path):
    out = tmp_path / "check"
    _fake_check_outputs(out)
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Benchmark results\n\nearlier text\n")
    section = gpu_check.record_from(out, results_md)
    text = results_md.read_text()
    assert text.startswith("# Benchmark results\n\nearlier text\n\n## GPU check: NVIDIA H100")
    assert text.endswith(section.rstrip("\n") + "\n")
    assert "## GPU check: NVIDIA H100 80GB HBM3, 2026-11-26" in section
    assert "driver 550.54.15" in section and "torch 2.13.0+cu128 (CUDA 12.8)" in section
    assert "`env -u TRITON_INTERPRET python -m pytest tests` (exit 1)" in section
    assert "**Tests**: 1 failed, 419 passed in 99.0s" in section
    assert "### table" in section


def test_record_only_and_dry_run_from_the_command_line(tmp_path):
    out = tmp_path / "check"
    _fake_check_outputs(out)
    results_md = tmp_path / "RESULTS.md"
    root = Path(gpu_check.__file__).resolve().parent.parent
    script = str(root / "benchmarks" / "gpu_check.py")
    cmd = [sys.executable, script, "--record-only", str(out), "--results-md", str(results_md)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "## GPU check: NVIDIA H100" in results_md.read_text()

    dry = [sys.executable, script, "--dry-run", "--venv", str(tmp_path / "v")]
    proc = subprocess.run(dry + ["--results-md", str(results_md)], capture_output=True, text=True)
    # The environment does not exist yet: its interpreter does not resolve in a dry run.
    assert proc.returncode == 1, proc.stderr
    assert "env -u TRITON_INTERPRET" in proc.stdout and "--device cuda" in proc.stdout
    assert "create the environment" in proc.stdout and "does not resolve" in proc.stdout
    assert not (tmp_path / "v").exists()  # a dry run creates nothing


@pytest.mark.skipif(gpu_check.gpu_info() is not None, reason="this machine has a GPU")
def test_refuses_to_run_without_a_gpu(tmp_path):
    code = gpu_check.main(["--venv", str(tmp_path / "v"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert not (tmp_path / "v").exists() and not (tmp_path / "o").exists()
