"""Opt-in autotuning of the token pass on a GPU (``GFT_KERNELS_AUTOTUNE=1``).

Each candidate is a :class:`~gft_kernels.backends.triton.launch.LaunchConfig`; the
fastest for a key (dtype, switches, row length class) is timed once per process and
remembered. Only the default configurations are compiled by ``make aot``.
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

import torch

from gft_kernels.backends.triton.launch import NUM_WARPS, LaunchConfig, launch_config

AUTOTUNE_ENV = "GFT_KERNELS_AUTOTUNE"
# (statistics block, warps) tried per element size when GFT_KERNELS_AUTOTUNE=1; the
# first is the default. Only the defaults are compiled by ``make aot``.
AUTOTUNE_CANDIDATES = {
    2: ((8192, 16), (4096, 16), (4096, 8), (16384, 16)),
    4: ((4096, 16), (2048, 8), (8192, 16)),
}
_TUNED: Dict[Tuple, LaunchConfig] = {}


def autotune_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get(AUTOTUNE_ENV, "0") not in ("", "0")


def candidate_configs(dtype: torch.dtype, softcap: bool) -> List[LaunchConfig]:
    element_bytes = torch.finfo(dtype).bits // 8
    return [
        launch_config(dtype, softcap, warps, block_v=block, num_warps=warps)
        for block, warps in AUTOTUNE_CANDIDATES.get(element_bytes, ((None, NUM_WARPS),))
    ]


def choose_config(key: Tuple, candidates: List[LaunchConfig], time_of) -> LaunchConfig:
    """The fastest candidate for ``key`` (timed once per process with ``time_of(cfg)``,
    which returns seconds), remembered for later calls."""
    if key not in _TUNED:
        _TUNED[key] = min(candidates, key=time_of)
    return _TUNED[key]
