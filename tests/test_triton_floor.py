"""The oldest supported Triton: one floor in the code, pyproject and ``make aot``.

The floor is the compiler of the H200 machine the GPU checks run on (Triton 3.6); ``make
aot`` compiles every sm_90 kernel variant with it (no failure, no spill), which is the
test of the floor's compiler that a machine without a GPU can run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
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
