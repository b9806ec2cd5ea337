"""Every Triton launch runs on the device of its tensors, and the default data checks are
device-side asserts.

Triton compiles for and launches on the *current* CUDA device (and its current stream):
logits on ``cuda:1`` while ``cuda:0`` is current (an HF ``device_map="auto"`` head on the
last GPU) need a device guard around each launch. Without a GPU the guard is observed
instead: ``torch.cuda.device_of`` is replaced by a recorder and every kernel by a spy that
notes which device context is active when it is launched (the guard is a no-op for the
CPU tensors of the interpreter, but it must still be entered with their device).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from gft_kernels import fused_linear_gft_loss, gft_loss
from gft_kernels.backends import RowParams, load_backend
from gft_kernels.backends import token_terms as terms
from tests.helpers import device_for

KERNELS = ("token_pass_kernel", "partial_stats_kernel", "row_grad_kernel")
REPO_ROOT = Path(__file__).resolve().parent.parent


class LaunchRecorder:
    """Replaces ``torch.cuda.device_of`` and the backend's kernels; ``launches`` holds
    ``(kernel, device of its first tensor, device context active at the launch)``."""

    def __init__(self, monkeypatch):
        import triton.testing

        from gft_kernels.backends import triton as backend

        self.active = []
        self.launches = []
        self.timings = []
        real_device_of = torch.cuda.device_of
        recorder = self

        class DeviceOf:
            def __init__(self, obj):
                self.device = obj.device
                self.inner = real_device_of(obj)

            def __enter__(self):
                recorder.active.append(self.device)
                return self.inner.__enter__()

            def __exit__(self, *exc):
                recorder.active.pop()
                return self.inner.__exit__(*exc)

        class Spy:
            def __init__(self, name, kernel):
                self.name, self.kernel = name, kernel

            def __getitem__(self, grid):
                def run(*args, **meta):
                    current = recorder.active[-1] if recorder.active else None
                    recorder.launches.append((self.name, args[0].device, current))
                    return self.kernel[grid](*args, **meta)

                return run

        def do_bench(fn, *args, **kwargs):
            recorder.timings.append(recorder.active[-1] if recorder.active else None)
            fn()
            return 1.0

        monkeypatch.setattr(torch.cuda, "device_of", DeviceOf)
        monkeypatch.setattr(triton.testing, "do_bench", do_bench)
        for name in KERNELS:
            monkeypatch.setattr(backend, name, Spy(name, getattr(backend, name)))


def test_every_triton_launch_runs_under_its_tensors_device(monkeypatch):
    from gft_kernels.backends.triton import autotune, launch

    rec = LaunchRecorder(monkeypatch)
    device = device_for("triton")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=gen).to(device).requires_grad_(True)
    targets = torch.randint(0, 300, (6,), generator=gen).to(device)
    adv = torch.randn(6, generator=gen).to(device)

    # The fused token pass and the backward's gradient rows; with autotuning, the timing
    # of every candidate.
    monkeypatch.setattr(autotune, "_TUNED", {})
    monkeypatch.setattr(autotune, "autotune_enabled", lambda device: True)
    gft_loss(logits, targets, adv, backend="triton").backward()
    assert rec.timings and all(d == device for d in rec.timings), rec.timings
    monkeypatch.setattr(autotune, "autotune_enabled", lambda device: False)
    # Few rows: the column segments' statistics, then the gradient in segments.
    with monkeypatch.context() as patch:
        patch.setattr(launch, "MIN_PROGRAMS", 64)
        patch.setattr(launch, "MIN_SEGMENT_BLOCKS", 1)
        patch.setattr(launch, "MAX_BLOCK", {4: 64, 2: 64})
        gft_loss(logits, targets, adv, backend="triton", return_stats=True)[0].backward()
    # The vocab-parallel primitive and the fused head (gradient written in the pass).
    load_backend("triton").partial_stats(
        logits.detach(), targets, RowParams(0.1, 1.0), with_entropy=True
    )
    hidden = torch.randn(6, 8, generator=gen).to(device).requires_grad_(True)
    weight = torch.randn(40, 8, generator=gen).to(device).requires_grad_(True)
    fused_linear_gft_loss(hidden, weight, targets % 40, adv, backend="triton").backward()

    assert {name for name, _, _ in rec.launches} == set(KERNELS)
    for name, tensors_on, active in rec.launches:
        assert active == tensors_on, f"{name} launched under {active}, its tensors on {tensors_on}"


def test_non_cpu_flags_take_the_device_side_assert_by_default(monkeypatch):
    """Without GFT_KERNELS_SYNC_CHECKS, flags that do not live on the CPU are checked by
    ``torch._assert_async`` (no copy to the host); with it, they are copied and a
    ``ValueError`` names the value. ``meta`` tensors stand in for a GPU's."""
    asserted = []
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg: asserted.append((cond, msg)))
    monkeypatch.delenv(terms.SYNC_CHECKS_ENV, raising=False)
    meta = dict(device="meta")
    flags = torch.empty(4, dtype=torch.int32, **meta)
    targets = torch.empty(4, dtype=torch.int64, **meta)
    mask = torch.empty(4, **meta)
    adv = torch.empty(4, **meta)
    terms.raise_for_flags(flags, targets, mask, adv, 1, 10, -100)
    messages = [msg for _, msg in asserted]
    assert len(messages) == 3
    assert messages[0].startswith("targets: expected values in [0, 10)")
    assert messages[1].startswith("mask:") and messages[2].startswith("advantages:")
    assert all(cond.device.type == "meta" and cond.dim() == 0 for cond, _ in asserted)

    asserted.clear()
    monkeypatch.setenv(terms.SYNC_CHECKS_ENV, "1")
    with pytest.raises(NotImplementedError):  # the sync path copies to the host
        terms.raise_for_flags(flags, targets, mask, adv, 1, 10, -100)
    assert asserted == []


def test_gpu_check_runs_the_device_side_assert_test(tmp_path):
    """``make gpu-check`` runs this module without the interpreter and without
    ``GFT_KERNELS_SYNC_CHECKS`` in its environment, so the GPU test below runs there."""
    tests = gpu_check.check_steps("python3", tmp_path / "out", [])[0]
    assert tests.argv[1:3] == ["-m", "pytest"]
    assert "tests/test_device_guard.py" in tests.argv[3:]
    assert not {"-k", "-m", "--deselect", "--ignore"} & set(tests.argv[3:])
    assert "GFT_KERNELS_SYNC_CHECKS" not in tests.env
    assert tests.env.get("TRITON_INTERPRET", "unset") is None
    marks = {m.name for m in test_default_checks_raise_a_device_side_assert.pytestmark}
    assert marks == {"skipif"}, "no marker that a plain run deselects"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_checks_raise_a_device_side_assert():
    """The default data checks on CUDA: a device-side assert, not a ValueError. In a
    subprocess: the assert ends the CUDA context, and the suite's conftest sets
    GFT_KERNELS_SYNC_CHECKS=1 for the tests that expect ValueError."""
    code = textwrap.dedent(
        """
        import torch
        from gft_kernels import gft_loss

        logits = torch.randn(4, 50, device="cuda")
        targets = torch.tensor([0, 1, 50, 2], device="cuda")
        loss = gft_loss(logits, targets, torch.ones(4, device="cuda"), backend="triton")
        print("launched without a host sync", flush=True)
        torch.cuda.synchronize()
        print("NO ASSERT", loss.item(), flush=True)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in (terms.SYNC_CHECKS_ENV,)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "launched without a host sync" in proc.stdout, proc.stderr
    assert proc.returncode != 0 and "NO ASSERT" not in proc.stdout
    assert "device-side assert" in proc.stderr, proc.stderr
    assert "ValueError" not in proc.stderr
