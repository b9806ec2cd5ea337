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
MAX_BLOCK = {4: 4096, 2: 8192}
_WARPS = {4096: 16, 8192: 16}


def launch_config(n_cols: int, dtype: torch.dtype, kernel: str) -> LaunchConfig:
    element_bytes = torch.finfo(dtype).bits // 8
    block = min(triton.next_power_of_2(max(n_cols, 16)), MAX_BLOCK.get(element_bytes, 4096))
    warps = _WARPS.get(block, 16 if block >= 4096 else (8 if block >= 1024 else 4))
    return LaunchConfig(block_v=block, num_warps=warps, vec=16 // element_bytes)


# Programs a launch should have to fill the GPU (about two per SM); None: two per SM of
# the current CUDA device, and no splitting on CPU tensors (the interpreter).
MIN_PROGRAMS = None
# Segments of at least this many blocks keep the per-program fixed costs small.
MIN_SEGMENT_BLOCKS = 4


def row_segments(n_rows: int, n_cols: int, block_v: int, device: torch.device) -> int:
    """Column segments per row: 1, or more when rows alone cannot fill the GPU."""
    wanted = MIN_PROGRAMS
    if wanted is None:
        if device.type != "cuda":
            return 1
        wanted = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    if n_rows == 0 or n_rows >= wanted:
        return 1
    blocks = triton.cdiv(n_cols, block_v)
    return max(1, min(triton.cdiv(wanted, n_rows), blocks // MIN_SEGMENT_BLOCKS))
