"""Launch configurations of the Triton row kernels (one source for the wrappers and AOT).

Chosen from the kernels' SASS compiled ahead of time for sm_90 (``make aot``): a row loop
is bandwidth-bound only if it issues few enough instructions per element, which favours
wide blocks and many warps per row. Under the interpreter (CPU tensors, tests) the block
size only changes how numpy batches the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

KERNELS = ("token_pass", "partial_stats", "row_grad")


@dataclass(frozen=True)
class LaunchConfig:
    block_v: int  # elements of a row per loop step
    num_warps: int
    vec: int  # elements per 16-byte vector (alignment unit of the unmasked loads)


# Largest block per element size: 16-bit logits move half the bytes per element, so a
# block of them holds twice the elements for the same registers per thread.
_MAX_BLOCK = {4: 4096, 2: 8192}
_WARPS = {4096: 16, 8192: 16}


def launch_config(n_cols: int, dtype: torch.dtype, kernel: str) -> LaunchConfig:
    element_bytes = torch.finfo(dtype).bits // 8
    block = min(triton.next_power_of_2(max(n_cols, 16)), _MAX_BLOCK.get(element_bytes, 4096))
    warps = _WARPS.get(block, 16 if block >= 4096 else (8 if block >= 1024 else 4))
    return LaunchConfig(block_v=block, num_warps=warps, vec=16 // element_bytes)
