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

* verl's fused linear/entropy kernels (``verl.utils.kernel.kernels``), the launches of
  its default path: the forward main loop (``efficient_entropy_kernel_general_mainloop``:
  logit tiles from ``tl.dot``, online log-sum-exp and entropy terms per tile, a program
  walks ``vocab_per_split / BLOCK_SIZE_N`` tiles) and the backward's d-logits kernel
  (``efficient_entropy_backward_kernel_general_d_logits_split_N``, its default
  ``_Split_Dlogits_N``: a tile of d-logits from a recomputed logit tile, written to
  memory for two cuBLAS GEMMs). Tiles, warps and stages from its autotune configs (one
  each); Hopper launches take its TMA path (``USE_TMA``: a CUDA device of capability 9
  and contiguous operands), Ampere the pointer path.
* Cut Cross-Entropy (``cut_cross_entropy``), as ``linear_cross_entropy(...,
  reduction="none")`` launches it by default (``filter_eps="high"``: the forward also sums
  the average logit, the backward sorts the vocabulary by it and skips tiles whose
  gradient is below the threshold): the forward's log-sum-exp kernel and the backward
  kernel (recomputed logit tile, then ``dE`` and ``dC`` tile by tile under spin locks).
  Tiles from its default configs (``CCE_AUTOTUNE`` unset), its heuristics evaluated on
  the launch's arguments as Triton's would be.

Matrix-multiply kernels are not described by a per-element bandwidth ceiling: their
loops are tensor-core records (``macs_per_trip``), held to the GEMM model
(:func:`benchmarks.static.machines.mma_ceiling`), per trip of the K loop and per output
tile, at the shape of the Qwen2.5-1.5B head (H = 1536, V = 151936, 4096 tokens, bf16).
A filtered tile (CCE) or an idle one costs less than the per-tile figure, which counts
everything.

The peers' loops carry no gate (``min_ceiling=0``): their ceilings are reported, a compile
failure or a spill of theirs still shows in the table.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

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


# The head of the GPU check's fused cases (Qwen2.5-1.5B): hidden size, tokens.
HIDDEN = 1536
TOKENS = 4096


def unwrap_launch(kernel: Any, args: Sequence[Any], meta: Mapping[str, Any]) -> Tuple[Any, Dict]:
    """The ``triton.jit`` function under a peer's ``triton.autotune`` / ``triton.heuristics``
    decorators and the keyword arguments they add to a launch ``kernel[grid](*args,
    **meta)``: each heuristic evaluated on the launch's arguments (outermost first, as
    Triton runs them), an autotuner's config when it has exactly one."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    meta = dict(meta)
    while not isinstance(kernel, JITFunction):
        if isinstance(kernel, Heuristics):
            for name, rule in kernel.values.items():
                meta[name] = rule({**dict(zip(kernel.arg_names, args)), **meta})
        elif isinstance(kernel, Autotuner):
            if len(kernel.configs) != 1:
                raise ValueError(f"{kernel.fn}: {len(kernel.configs)} autotune configs, not 1")
            meta = {**kernel.configs[0].all_kwargs(), **meta}
        else:
            raise TypeError(f"cannot unwrap {type(kernel).__name__}")
        kernel = kernel.fn
    return kernel, meta


def _tile_meta(meta: Mapping[str, Any], m: str, n: str, k: str) -> Tuple[int, int, int]:
    return int(meta[m]), int(meta[n]), int(meta[k])


def verl_variants() -> List[Any]:
    try:
        from verl.utils.kernel import kernels as verl
    except ImportError:
        return []
    bf16, f32 = torch.bfloat16, torch.float32
    # efficient_entropy_forward: vocab_per_split = 1024, maximum/accumulate/entropy_b
    # partials (tokens, splits) fp32, logprobs (tokens,) fp32 (reduction "none").
    vocab_per_split = 1024
    splits = -(-VOCAB // vocab_per_split)
    records = []
    for arch, tma in ((80, False), (90, True)):
        partial = AotTensor(f32)
        args = (
            0, AotTensor(bf16), AotTensor(bf16), AotTensor(torch.int64), TOKENS, HIDDEN,
            VOCAB, vocab_per_split, HIDDEN, 1, HIDDEN, 1, partial, splits, 1, partial,
            splits, 1, partial, splits, 1, AotTensor(f32), 1, AotTensor(f32), 1.0,
        )  # fmt: skip
        fn, meta = unwrap_launch(
            verl.efficient_entropy_kernel_general_mainloop, args, {"USE_TMA": tma}
        )
        bm, bn, bk = _tile_meta(meta, "BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K")
        loops = (
            HotLoop("tile-epi", None, bm * bn, ordinal=0, per_tile=1),
            HotLoop("k-dot", None, bm * bn, ordinal=1, macs_per_trip=bm * bn * bk,
                    per_tile=HIDDEN / bk),
        )  # fmt: skip
        label = f"bf16/{'tma' if tma else 'ptr'}/{bm}x{bn}x{bk}/H{HIDDEN}/peer"
        records.append(
            launch_variant(
                "verl_fwd", label, "bf16", fn, args, meta, loops, archs=(arch,),
                tiles_per_program=vocab_per_split / bn,
            )
        )  # fmt: skip
        # efficient_entropy_backward, _Split_Dlogits_N: vocab_per_split = 9504, d-logits
        # (tokens, 9504) in the inputs' dtype; dlogprobs per token (reduction "none").
        split = 9504
        stat = AotTensor(f32)
        args = (
            0, TOKENS, HIDDEN, VOCAB, split, 0, AotTensor(bf16), HIDDEN, 1, AotTensor(bf16),
            HIDDEN, 1, AotTensor(torch.int64), 1, stat, 1, stat, 1, stat, 1, stat, 1, 0,
            stat, 1, AotTensor(bf16), split, 1, 1.0,
        )  # fmt: skip
        fn, meta = unwrap_launch(
            verl.efficient_entropy_backward_kernel_general_d_logits_split_N, args, {"USE_TMA": tma}
        )
        bm, bn, bk = _tile_meta(meta, "BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K")
        loops = (HotLoop("k-dot", None, bm * bn, macs_per_trip=bm * bn * bk, per_tile=HIDDEN / bk),)
        label = f"bf16/{'tma' if tma else 'ptr'}/{bm}x{bn}x{bk}/H{HIDDEN}/peer"
        records.append(
            launch_variant(
                "verl_dlogits", label, "bf16", fn, args, meta, loops, archs=(arch,),
                tiles_per_program=1,
            )
        )  # fmt: skip
    return records


def cce_variants() -> List[Any]:
    try:
        from cut_cross_entropy import cce_backward, cce_lse_forward
        from cut_cross_entropy.tl_utils import b_bin_fn
    except ImportError:
        return []
    bf16, f32 = torch.bfloat16, torch.float32
    records = []
    filter_eps = torch.finfo(bf16).eps / 32  # filter_eps="high"
    locks = -(-TOKENS // 128)
    for softcap in (None, 30.0):
        cap = "softcap" if softcap else "plain"
        # cce_lse_forward_kernel(e, c, valids=None, softcap, return_logit_avg=True).
        args = (
            AotTensor(bf16), AotTensor(bf16), AotTensor(f32), AotTensor(f32),
            AotTensor(torch.uint32), None, softcap, TOKENS, VOCAB, HIDDEN, HIDDEN, 1, HIDDEN,
            1, 1, 1,
        )  # fmt: skip
        fn, meta = unwrap_launch(
            cce_lse_forward._cce_lse_forward_kernel,
            args,
            {"num_locks": locks, "B_BIN": b_bin_fn(TOKENS)},
        )
        bm, bn, bk = _tile_meta(meta, "BLOCK_B", "BLOCK_V", "BLOCK_D")
        loops = (
            HotLoop("k-dot", None, bm * bn, ordinal=0, macs_per_trip=bm * bn * bk,
                    per_tile=HIDDEN / bk),
            HotLoop("lock-spin", None, bm * bn, ordinal=1, per_tile=1),
        )  # fmt: skip
        label = f"bf16/{cap}/{bm}x{bn}x{bk}/H{HIDDEN}/peer"
        records.append(
            launch_variant("cce_lse", label, "bf16", fn, args, meta, loops, tiles_per_program=1)
        )
        # cce_backward_kernel(do, e, c, lse, valids=None, softcap, filter_eps, targets,
        # shift=False, vocab_ordering, grad_scale=1): dE and dC (bf16) under locks.
        nd_locks = -(-HIDDEN // 64)
        args = (
            AotTensor(bf16), AotTensor(bf16), AotTensor(f32), AotTensor(f32, shape=(TOKENS,)),
            1.0, None,
            AotTensor(torch.int32), softcap, AotTensor(torch.int64), AotTensor(bf16),
            AotTensor(torch.int32), AotTensor(bf16), AotTensor(torch.int32), TOKENS, HIDDEN,
            VOCAB, -(-TOKENS // nd_locks), nd_locks, -(-VOCAB // nd_locks), nd_locks, HIDDEN,
            1, HIDDEN, 1, 1, filter_eps,
        )  # fmt: skip
        fn, meta = unwrap_launch(
            cce_backward._cce_backward_kernel,
            args,
            {"B_BIN": b_bin_fn(TOKENS), "SHIFT": False, "REQUIRES_GRAD": True},
        )
        bm, bn, bk = _tile_meta(meta, "BLOCK_B", "BLOCK_V", "BLOCK_D")
        back_k = int(meta["MM_BACK_BLOCK_D"])
        loops = (
            HotLoop("k-dot", None, bm * bn, macs_per_trip=bm * bn * bk, per_tile=HIDDEN / bk),
            HotLoop("dE/dC-dot", None, bm * bn, "_mm_backward", macs_per_trip=bm * bn * back_k,
                    per_tile=HIDDEN / back_k),
            HotLoop("lock-spin", None, bm * bn, "tl_lock_add", per_tile=HIDDEN / back_k),
        )  # fmt: skip
        label = f"bf16/{cap}/filter/{bm}x{bn}x{bk}/H{HIDDEN}/peer"
        records.append(
            launch_variant("cce_bwd", label, "bf16", fn, args, meta, loops, tiles_per_program=1)
        )
    return records


def aot_variants() -> List[Any]:
    return dedupe(liger_variants() + verl_variants() + cce_variants())
