"""The Triton kernel variants the library can launch, as records for ``make aot``.

Every record is built by the library's own launch builders
(:mod:`gft_kernels.backends.triton.launch`), so the static check compiles exactly what the
wrappers launch: logits fp32/bf16/fp16, temperature 1 or not, no transform, a logit scale
or a soft-cap (narrow and wide), stats or not, a mask or not, the gradient written in the
pass or not, and row lengths, strides and base addresses that are and are not aligned.
"""

from __future__ import annotations

from typing import Any, List

import torch

from benchmarks.static.records import AotTensor, HotLoop, dedupe, launch_variant
from gft_kernels.backends.base import GradRows, RowParams, TokenInputs
from gft_kernels.backends.triton.launch import (
    LaunchConfig,
    LogitsRows,
    fixed_reference,
    launch_config,
    partial_stats_launch,
    row_grad_launch,
    softcap_kind,
    token_pass_launch,
)
from gft_kernels.backends.triton.row_grad import row_grad_kernel
from gft_kernels.backends.triton.token_pass import partial_stats_kernel, token_pass_kernel

_AOT_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_AOT_PARAMS = {
    "T=1": RowParams(tau=0.1, temperature=1.0),
    "T!=1": RowParams(tau=0.1, temperature=0.7),
    "T=1/softcap": RowParams(tau=0.1, temperature=1.0, logit_softcap=30.0),
    "T!=1/softcap": RowParams(tau=0.1, temperature=0.7, logit_softcap=30.0),
    "T=1/softcap-wide": RowParams(tau=0.1, temperature=1.0, logit_softcap=1e4),
    "T!=1/softcap-wide": RowParams(tau=0.1, temperature=0.7, logit_softcap=1e4),
    "T=1/scale": RowParams(tau=0.1, temperature=1.0, logit_scale=0.5),
}


# Bandwidth gates of the wide soft-cap's 16-bit running-max statistics, below the default
# 85% (static figures, bf16 on sm_90; each gate about 3 points under the lowest): its
# accurate tanh (common.wide_softcap) adds a series, four FMA-pipe instructions and a
# compare per element, to loops the fast tanh fills to 89-100%, and it cannot take fixed
# references (see fixed_reference). T = 1 clears 85% (87%, MUFU-bound: 2.88 results per
# element with three reciprocals in four on MUFU) except with entropy and the fused
# gradient's 64 registers per thread (83%, issue-bound: 24 instructions per element). At
# T != 1 an element needs three exponentials (tanh's, the sums' at T and at 1) and a
# slot two rescales per trip, 3.25 MUFU results per element against 2.94 at 85%, and the
# issue slots have no room to move any to the FMA pipe: 74% (MUFU, 3.38 with one
# reciprocal in eight), 71% with the fused gradient, 63-67% with entropy (issue, 30-32
# instructions per element). Keys: (T = 1, with entropy). Gemma 2/3 (caps 30, 50) stay
# below WIDE_SOFTCAP and keep the fast tanh and the default gate.
WIDE_SOFTCAP_GATES = {(True, True): 0.80, (False, False): 0.68, (False, True): 0.60}


def _stats_loops(
    size: int, cfg: LaunchConfig, params: RowParams, dtype: torch.dtype, with_entropy: bool
) -> list:
    """The statistics loops of a kernel that calls ``summarize_row``: the running-max walk
    and the fixed-reference walk (one of them compiled out). With fixed references the
    running-max walk only re-reads the rare rows that lost terms to underflow
    (``fixed_reference``): reported, not held to the bandwidth gate. A wide soft-cap's 16-bit
    walk has its own gate (:data:`WIDE_SOFTCAP_GATES`)."""
    gate = None
    if params.logit_softcap is not None and softcap_kind(params) == 3 and size == 2:
        gate = WIDE_SOFTCAP_GATES.get((params.unit_temperature, with_entropy))
    # Both walks run an aligned head block and a tail block outside their loop.
    fixed = fixed_reference(params, dtype)
    if fixed:
        running_max = HotLoop(
            "stats-fallback", None, cfg.block_v, "_summarize_running_max", edge_blocks=2
        )
    else:
        running_max = HotLoop(
            "stats", size, cfg.block_v, "_summarize_running_max", min_ceiling=gate, edge_blocks=2
        )
    walk = HotLoop("stats", size, cfg.block_v, "_walk", compiled=fixed, edge_blocks=2)
    return [running_max, walk]


def aot_variants() -> List[Any]:
    """Every compilation the wrappers can launch, as ``KernelVariant`` records.

    Logits fp32/bf16/fp16; temperature 1 or not; no transform, a logit scale or a
    soft-cap; stats or not; a mask or not; the gradient written in the pass or not, with
    matching or different row skews; row lengths and strides that are and are not
    16-divisible (Triton specialises integers on that), and an unaligned base address.
    """
    f32, i64, i32 = AotTensor(torch.float32), AotTensor(torch.int64), AotTensor(torch.int32)
    records = []
    for dtype, label in _AOT_DTYPES.items():
        size = torch.finfo(dtype).bits // 8
        for n_cols in (151936, 50257):
            vocab = "V%16=0" if n_cols % 16 == 0 else "V%16!=0"
            for aligned in (True, False):
                logits = AotTensor(dtype, aligned)
                rows = LogitsRows(logits, n_cols, 2, n_cols)
                where = vocab + ("" if aligned else "/unaligned-base")
                for pname, params in _AOT_PARAMS.items():
                    cfg = launch_config(dtype, params.logit_softcap is not None)
                    for with_stats in (False, True):
                        for mask in (None, AotTensor(torch.uint8)):
                            for grad_stride in (None, n_cols, n_cols + 1):
                                outputs = (
                                    f32,
                                    f32,
                                    f32,
                                    f32 if with_stats else None,
                                    f32,
                                    f32,
                                    f32,
                                    i32,
                                )
                                write = grad_stride is not None
                                grid, args, meta = token_pass_launch(
                                    rows,
                                    TokenInputs(i64, f32, mask, 1),
                                    f32 if write else None,
                                    LogitsRows(logits, grad_stride, 2, n_cols) if write else None,
                                    outputs,
                                    params,
                                    with_stats,
                                )
                                # The gradient loops are compiled out without WRITE_GRAD.
                                grad_block = meta["GRAD_BLOCK"]
                                loops = [
                                    *_stats_loops(size, cfg, params, dtype, with_stats),
                                    HotLoop(
                                        "zero-fill", size, grad_block, "zero_row", compiled=write
                                    ),
                                    HotLoop(
                                        "gradient",
                                        2 * size,
                                        grad_block,
                                        "write_grad_row",
                                        compiled=write,
                                        edge_blocks=2,
                                    ),
                                ]
                                switches = [
                                    pname,
                                    "stats" if with_stats else "loss",
                                    "mask" if mask is not None else "no-mask",
                                ]
                                if write:
                                    skew = "same" if meta["SAME_SKEW"] else "other"
                                    switches.append(f"grad-in-pass/{skew}-skew")
                                records.append(
                                    launch_variant(
                                        "token_pass",
                                        "/".join([label, *switches, where]),
                                        label,
                                        token_pass_kernel,
                                        args,
                                        meta,
                                        loops,
                                    )
                                )
                    for with_entropy in (False, True):
                        outs = (f32, f32, f32, f32 if with_entropy else None, f32)
                        grid, args, meta = partial_stats_launch(
                            rows, 4, i64, outs, params, with_entropy
                        )
                        records.append(
                            launch_variant(
                                "partial_stats",
                                f"{label}/{pname}/{'entropy' if with_entropy else 'sums'}/{where}",
                                label,
                                partial_stats_kernel,
                                args,
                                meta,
                                _stats_loops(size, cfg, params, dtype, with_entropy),
                            )
                        )
                    for out_stride in (n_cols, n_cols + 1):
                        grid, args, meta = row_grad_launch(
                            rows,
                            LogitsRows(AotTensor(dtype), out_stride, 2, n_cols),
                            GradRows(i64, f32, f32, f32, f32),
                            params,
                            1,
                        )
                        skew = "same" if meta["SAME_SKEW"] else "other"
                        records.append(
                            launch_variant(
                                "row_grad",
                                f"{label}/{pname}/{skew}-skew/{where}",
                                label,
                                row_grad_kernel,
                                args,
                                meta,
                                # The launch's own block (8 warps), not cfg.grad_block:
                                # launch_config's default is the 16-warp fused pass's.
                                [
                                    HotLoop("zero-fill", size, meta["BLOCK_V"], "zero_row"),
                                    HotLoop(
                                        "gradient",
                                        2 * size,
                                        meta["BLOCK_V"],
                                        "write_grad_row",
                                        edge_blocks=2,
                                    ),
                                ],
                            )
                        )
    return dedupe(records)
