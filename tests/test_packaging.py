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

    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    # Dependencies from the test environment, after the fresh site-packages on the path.
    fresh_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(fresh_site) / "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

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
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    run = subprocess.run(
        [str(python), "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1].startswith("ok ")
