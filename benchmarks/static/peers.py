"""Peers' Triton kernels through the same static analysis as ours (``make aot``'s peer pass).

``python -m benchmarks.static.aot --modules benchmarks.static.peers`` compiles the kernels
a peer launches for the same job and reads them with the same tool: registers, spills and
each streaming loop's instructions and MUFU results per element, and the ceiling they
allow. The records are built from the peer's own launch code (block size and warps as its
wrapper picks them), so the figures are the peer's as shipped. A peer that is not
installed contributes no record.

Peers:

* Liger-Kernel's cross-entropy kernel (``liger_kernel.ops.cross_entropy``), forward with
  the gradient written into the logits in the same launch (what a training step runs):
  an online-softmax pass (reads the row) and a gradient pass (reads it again, writes it),
  and the zero-fill of an ignored row.
  Its block is ``min(32768, next_power_of_2(V))`` at 32 warps on Hopper and earlier.

verl's fused linear/entropy kernels (``verl.utils.kernel``) and Cut Cross-Entropy are
matrix-multiply kernels (logit tiles from ``tl.dot``): a per-element bandwidth ceiling does
not describe them, and they are compared with the blockwise head's tensor-core figures,
not with these rows.

The peers' loops carry no gate (``min_ceiling=0``): their ceilings are reported, a compile
failure or a spill of theirs still shows in the table.
"""

from __future__ import annotations

from typing import Any, List

import torch

from benchmarks.static.records import AotTensor, HotLoop, dedupe, launch_variant

_DTYPES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
VOCAB = 151936


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def liger_variants() -> List[Any]:
    try:
        from liger_kernel.ops import cross_entropy
    except ImportError:
        return []
    kernel = cross_entropy.liger_cross_entropy_kernel
    block = min(cross_entropy.MAX_FUSED_SIZE, _next_power_of_2(VOCAB))
    records = []
    for dtype, name in _DTYPES.items():
        size = torch.finfo(dtype).bits // 8
        for softcap in (None, 30.0):
            values = dict(
                X_ptr=AotTensor(dtype),
                X_stride=VOCAB,
                Y_ptr=AotTensor(torch.int64),
                Y_stride=1,
                weight_ptr=AotTensor(dtype),
                loss_ptr=AotTensor(dtype),
                z_loss_ptr=AotTensor(dtype),
                loss_stride=1,
                token_accuracy_ptr=AotTensor(torch.float32),
                token_accuracy_stride=0,
                predicted_tokens_ptr=AotTensor(torch.int64),
                predicted_tokens_stride=0,
                n_cols=VOCAB,
                n_non_ignore=4096,
                sum_non_ignore_weight=0.0,
                weight_sum=0.0,
                ignore_index=-100,
                lse_square_scale=0.0,
                label_smoothing=0.0,
                reduction="none",
                softcap=softcap,
                RETURN_Z_LOSS=False,
                RETURN_TOKEN_ACCURACY=False,
                RETURN_PREDICTED_TOKENS=False,
                BLOCK_SIZE=block,
                HAS_WEIGHT=False,
                HAS_SOFTCAPPING=softcap is not None,
                HAS_GRADIENTS=True,
                num_warps=32,
            )
            # Source loops in order: the zero-fill of an ignored row, the online softmax,
            # the gradient.
            loops = (
                HotLoop("zero-fill", size, block, ordinal=0, min_ceiling=0.0),
                HotLoop("online-softmax", size, block, ordinal=1, min_ceiling=0.0),
                HotLoop("gradient", 2 * size, block, ordinal=2, min_ceiling=0.0),
            )
            label = f"{name}/{'softcap' if softcap else 'plain'}/V{VOCAB}/peer"
            records.append(launch_variant("liger_ce", label, name, kernel, (), values, loops))
    return records


def aot_variants() -> List[Any]:
    return dedupe(liger_variants())
