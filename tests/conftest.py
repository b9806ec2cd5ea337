"""Test configuration: Triton kernels run under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, which is why this happens
at conftest import time, before any test module imports gft_kernels.ops.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # Bad-value tests expect a ValueError; a device-side assert would end the CUDA context.
    os.environ.setdefault("GFT_KERNELS_SYNC_CHECKS", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
