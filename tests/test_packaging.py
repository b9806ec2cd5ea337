"""The wheel built from this checkout installs and works in a fresh virtual environment.

The fresh environment gets the wheel only (no editable install, no repository on the
path); its dependencies (torch, transformers, ...) are borrowed from the test
environment through a path entry, since installing torch again would take minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _fresh_venv(tmp_path: Path) -> Path:
    """A new virtual environment without gft_kernels; its dependencies are borrowed from the
    test environment through a path entry placed after its own site-packages."""
    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    fresh_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(fresh_site) / "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _last_line(python: Path, script: str, cwd: Path, *args: str, pythonpath: str = "") -> str:
    """Run ``script`` in ``python`` (outside the test's PYTHONPATH and Triton interpreter,
    with ``pythonpath`` as its only PYTHONPATH entry) and return its last line of output."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    run = subprocess.run(
        [str(python), "-c", script, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip().splitlines()[-1]


def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("gft_kernels-*.whl")

    python = _fresh_venv(tmp_path)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]

    script = textwrap.dedent(
        """
        import pathlib, sys
        import torch
        import gft_kernels
        from gft_kernels import fused_linear_gft_loss, gft_loss
        from gft_kernels.reference import gft_loss_reference

        assert pathlib.Path(gft_kernels.__file__).is_relative_to(pathlib.Path(sys.prefix))
        logits = torch.randn(2, 3, 11, requires_grad=True)
        targets = torch.randint(0, 11, (2, 3))
        adv = torch.randn(2)
        for backend in ("torch", "cpu"):
            loss = gft_loss(logits, targets, adv, backend=backend)
            torch.testing.assert_close(loss, gft_loss_reference(logits, targets, adv))
            loss.backward()
        h, w = torch.randn(2, 3, 8), torch.randn(11, 8, requires_grad=True)
        fused_linear_gft_loss(h, w, targets, adv).backward()
        import gft_kernels.integration
        from gft_kernels.integration import GFTConfig, GFTTrainer
        import gft_kernels.integration.heads
        print("ok", gft_kernels.__version__)
        """
    )
    assert _last_line(python, script, tmp_path).startswith("ok ")


def test_plain_checkout_on_the_path_imports_integration_and_finds_the_native_source(tmp_path):
    """No install at all: the repository root on PYTHONPATH gives gft_kernels.integration
    and the C++ source, as an install does (the borrowed test environment holds only the
    editable install's finder module, which nothing runs without its .pth file)."""
    python = _fresh_venv(tmp_path)
    script = textwrap.dedent(
        """
        import pathlib, sys
        root = pathlib.Path(sys.argv[1]).resolve()
        import gft_kernels
        import gft_kernels.integration
        from gft_kernels.integration import GFTConfig, GFTTrainer
        import gft_kernels.integration.heads
        from gft_kernels.backends import cpu_rows

        assert not any("editable" in type(f).__module__ for f in sys.meta_path), sys.meta_path
        assert pathlib.Path(gft_kernels.__file__).resolve().parent == root / "gft_kernels"
        where = pathlib.Path(gft_kernels.integration.__file__).resolve()
        assert where == root / "integration" / "__init__.py", where
        assert cpu_rows.source_path().resolve() == root / "csrc" / "cpu_rows.cpp"
        print("ok")
        """
    )
    assert _last_line(python, script, tmp_path, str(ROOT), pythonpath=str(ROOT)) == "ok"
