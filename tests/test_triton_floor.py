"""The oldest supported Triton: one floor in the code, pyproject and ``make aot``.

The floor is the compiler of the H200 machine the GPU checks run on (Triton 3.6); ``make
aot`` compiles every sm_90 kernel variant with it (no failure, no spill), which is the
test of the floor's compiler that a machine without a GPU can run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import triton

from gft_kernels.backends.triton import TRITON_FLOOR, check_triton_version

ROOT = Path(__file__).resolve().parent.parent
FLOOR = ".".join(map(str, TRITON_FLOOR))


@pytest.mark.parametrize("version", ["3.5.1", "3.0.0", "2.3.1", "3.5.0+git1234abcd"])
def test_an_older_triton_is_refused_naming_the_floor(version):
    with pytest.raises(ImportError, match=rf"triton >= {re.escape(FLOOR)}; found triton "):
        check_triton_version(version)


@pytest.mark.parametrize("version", [FLOOR + ".0", "3.9.0", "3.10.0", "4.0.0rc1", "3.6.0+cu130"])
def test_the_floor_and_newer_are_accepted(version):
    # "3.10" is newer than "3.6" although it sorts before it as a string.
    check_triton_version(version)


def test_the_installed_triton_is_supported():
    check_triton_version(triton.__version__)


def test_pyproject_and_make_aot_state_the_same_floor():
    pyproject = (ROOT / "pyproject.toml").read_text()
    (requirement,) = re.findall(r'"triton>=([0-9.]+);', pyproject)
    assert requirement == FLOOR
    makefile = (ROOT / "Makefile").read_text()
    (pin,) = re.findall(r"TRITON_FLOOR_PIN \?= triton==([0-9.]+)", makefile)
    assert pin.startswith(FLOOR + ".")
    # make aot runs the floor's pass for sm_90 with that installation first on the path.
    assert re.search(
        r"PYTHONPATH=\$\(TRITON_FLOOR_DIR\) \$\(PY\) -m benchmarks.static.aot --arch 90", makefile
    )


def test_the_floor_s_half_gradient_block_gives_the_same_results(monkeypatch):
    """Triton 3.6 spills at 64 registers in the 16-bit soft-capped fused pass at T != 1
    with statistics and the gradient written in the pass; there the gradient walk takes
    half blocks (``launch.TRITON_BEFORE_3_7``). The interpreter runs that configuration
    here: the same loss, statistics and gradients as the full block, bit for bit."""
    from gft_kernels import fused_linear_gft_loss
    from gft_kernels.backends.triton import launch
    from tests.helpers import device_for

    dev = device_for("triton")
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 24, 16, generator=gen).to(dev, torch.bfloat16)
    weight = (torch.randn(5000, 16, generator=gen) / 4).to(dev, torch.bfloat16)
    targets = torch.randint(0, 5000, (2, 24), generator=gen).to(dev)
    advantages = torch.tensor([0.7, -1.2], device=dev)
    blocks = []
    original = launch.token_pass_launch

    def spy(*args, **kwargs):
        built = original(*args, **kwargs)
        blocks.append(built[2]["GRAD_BLOCK"])
        return built

    monkeypatch.setattr(launch, "token_pass_launch", spy)
    results = []
    for before_3_7 in (False, True):
        monkeypatch.setattr(launch, "TRITON_BEFORE_3_7", before_3_7)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, stats = fused_linear_gft_loss(
            h,
            w,
            targets,
            advantages,
            backend="triton",
            temperature=0.7,
            logit_softcap=30.0,
            return_stats=True,
        )
        loss.backward()
        results.append((loss.detach(), stats.entropy, stats.logprobs, h.grad, w.grad))
    assert blocks[0] == 2 * blocks[-1]  # the half block was launched
    for full, half in zip(*results):
        assert torch.equal(full, half)
