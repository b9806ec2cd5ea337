"""Launch configurations and launch arguments of the Triton row kernels.

One source for the wrappers (:mod:`gft_kernels.backends.triton`) and for the ahead-of-time
check (``make aot``, ``benchmarks/static``): every launch is built here, so the check
compiles exactly what the wrappers launch.

Configurations come from the kernels' SASS compiled for sm_90: a row loop stays
bandwidth-bound only if it issues few instructions per element, which wants wide blocks
(16 elements per thread for 16-bit logits) and no cross-thread reduction per trip (the
statistics keep one running max per 16-byte slot). The block never shrinks to the row
length: short rows are masked, and rows too few to fill the GPU are split into column
segments (:func:`row_segments`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import triton

from gft_kernels.backends.base import GradRows, RowParams, TokenInputs
from gft_kernels.backends.triton import triton_release
from gft_kernels.backends.triton.common import LOG2E_VALUE as LOG2E


@dataclass(frozen=True)
class LaunchConfig:
    block_v: int  # elements of a row per trip of the statistics loop
    grad_block: int  # elements per trip of the gradient walk
    num_warps: int
    vec: int  # elements per 16-byte vector (the slot width and alignment unit)


# Statistics block per element size (bytes): 16 elements per thread at 16 warps for
# 16-bit logits, 8 for fp32 (same registers).
MAX_BLOCK = {4: 4096, 2: 8192}
NUM_WARPS = 16
# The standalone gradient kernel: half the threads per program leave each thread twice
# the registers (16 warps capped ptxas at 64 and spilled on sm_80), and the walk is
# bandwidth-bound either way.
GRAD_WARPS = 8
# Registers a thread of the fused pass may use when it also writes the gradient: the
# budget of two programs per SM (64 at 16 warps). Left to itself, ptxas aimed that
# two-phase kernel at three programs per SM and spilled a few values from the statistics
# phase to the gradient phase. Two programs of 16 warps keep 32 KB of 16-byte loads in
# flight per SM, more than HBM latency times bandwidth needs (about 15 KB on an H100).
REGISTER_FILE = 65536
PROGRAMS_PER_SM_WITH_GRAD = 2
# Every launch names Triton's floating-point contraction switch instead of taking the
# compiler's default: Triton 3.9 warns that the default turns off in 3.10, and the
# instruction counts of ``make aot`` (and the soft-capped loops' speed, about 20% less
# without fused multiply-adds) assume it on. Contraction never joins two roundings the
# kernels' accuracy relies on: those places call ``tl.fma`` or keep separate products
# on purpose (``fma_math``, tested in tests/test_fma_math.py).
ENABLE_FP_FUSION = True
# Triton before 3.7 (3.6 is the oldest supported) spills 8 bytes at that budget in one
# family: the 16-bit soft-capped fused pass at T != 1 (fixed references) with statistics
# and the gradient written alike (same skew). There its gradient walk takes half blocks
# (8-byte accesses), which ptxas fits in 64 registers; Triton 3.9 keeps the full block.
TRITON_BEFORE_3_7 = triton_release(triton.__version__) < (3, 7)


def compile_options(num_warps: int, **options: int) -> Dict[str, Any]:
    """The launch options that are not kernel parameters, the same for every launch."""
    return dict(num_warps=num_warps, enable_fp_fusion=ENABLE_FP_FUSION, **options)


def fused_pass_registers(num_warps: int) -> int:
    """``maxnreg`` of a fused pass that writes the gradient (a multiple of 8, <= 255)."""
    per_thread = REGISTER_FILE // (PROGRAMS_PER_SM_WITH_GRAD * num_warps * 32)
    return min(255, per_thread // 8 * 8)


def launch_config(
    dtype: torch.dtype,
    softcap: bool = False,
    grad_warps: int = NUM_WARPS,
    *,
    block_v: Optional[int] = None,
    num_warps: int = NUM_WARPS,
) -> LaunchConfig:
    """The configuration for logits of ``dtype``; ``grad_warps``: the warps of the program
    that walks the gradient (its block is one 16-byte vector per thread). ``block_v`` and
    ``num_warps`` replace the statistics block (before the soft-cap halving) and warps
    (autotuning candidates)."""
    element_bytes = torch.finfo(dtype).bits // 8
    block = block_v or MAX_BLOCK.get(element_bytes, 4096)
    if softcap:
        # tanh's extra live values spill at 16 elements per thread; at 8 the soft-capped
        # loops still clear the 85% gate (T = 1 with the running max, T != 1 against
        # fixed references: see fixed_reference).
        block = max(block // 2, 16 // element_bytes)
    return LaunchConfig(
        block_v=block,
        grad_block=min(16 // element_bytes * 32 * grad_warps, block),
        num_warps=num_warps,
        vec=min(16 // element_bytes, block),
    )


# Programs a launch should have to fill the GPU (about two per SM); None: two per SM of
# the current CUDA device, and no splitting on CPU tensors (the interpreter).
MIN_PROGRAMS: Optional[int] = None
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


def segment_length(n_cols: int, segments: int, block_v: int) -> int:
    """Columns per segment: a whole number of blocks (so segments start aligned)."""
    return triton.cdiv(triton.cdiv(n_cols, segments), block_v) * block_v


# Caps above this take the wide soft-cap (TRANSFORM 3, ``common.wide_softcap``). The
# fast form ``cap - 2 cap / (1 + 2^a)`` gives every soft-capped logit an absolute error of
# about cap 2^-22 (the exp2 unit's relative error times the cap): 1.2e-5 at Gemma 2/3's
# 50, 1.5e-5 at 64, a few times fp32's own rounding of a logsumexp near such a cap
# (2^-24 (cap + log V)). Past 64 it keeps growing with the cap (2.4e-3 at 1e4) while the
# logits need not: a 1e-5 bound on the loss no longer holds.
WIDE_SOFTCAP = 64.0


def softcap_kind(params: RowParams) -> int:
    """The soft-cap's TRANSFORM: 3 (wide) above :data:`WIDE_SOFTCAP`, else 2."""
    assert params.logit_softcap is not None
    return 3 if params.logit_softcap > WIDE_SOFTCAP else 2


def transform_args(params: RowParams) -> Tuple[int, float, float, float]:
    """``(TRANSFORM, logit_scale, cap, tanh_slope)``: 3 wide soft-cap, 2 soft-cap, 1 scale,
    0 none.

    ``tanh_slope = 2 log2(e) scale / cap`` is the exp2 argument of the soft-cap's tanh per
    raw logit (see ``common.transform_logits``).
    """
    if params.logit_softcap is not None:
        tanh_slope = 2.0 * LOG2E * params.softcap_slope
        return softcap_kind(params), params.logit_scale, params.logit_softcap, tanh_slope
    if params.logit_scale != 1.0:
        return 1, params.logit_scale, 1.0, 0.0
    return 0, 1.0, 1.0, 0.0


def fixed_reference(params: RowParams, dtype: torch.dtype) -> bool:
    """Whether the statistics run against fixed references (``fixed_reference``): 16-bit
    soft-capped logits at T != 1, whose running-max loop the exponential unit would bound
    below HBM speed. fp32 moves twice the bytes per exponential and T = 1 needs one
    exponential fewer: their running-max loops keep up. A wide soft-cap (above
    :data:`WIDE_SOFTCAP`) takes the running max: its exponents span ``+-cap log2(e) / T``,
    far more than a fixed reference's 2^+-96 window, and ``fixed_reference`` forms them from
    tanh's reciprocal, ``(c - R) - 2 c r``, which cancels near 0 as the fast tanh does."""
    if params.logit_softcap is None or params.unit_temperature:
        return False
    if softcap_kind(params) == 3:
        return False
    return torch.finfo(dtype).bits == 16


@dataclass(frozen=True)
class LogitsRows:
    """The ``(n_rows, n_cols)`` rows a launch reads or writes, row ``i`` at ``data + i *
    stride`` elements; ``data`` is a tensor or an AOT stand-in (``benchmarks/static``)."""

    data: Any
    stride: int
    n_rows: int
    n_cols: int

    @classmethod
    def of(cls, tensor: torch.Tensor) -> LogitsRows:
        return cls(tensor, tensor.stride(0), tensor.shape[0], tensor.shape[1])


def same_skew(a: LogitsRows, b: LogitsRows, vec: int) -> bool:
    """Whether every row of ``a`` and ``b`` starts at the same address modulo 16 bytes
    (``vec`` elements), so that one aligned walk serves both."""
    element = 16 // vec
    bases = (a.data.data_ptr() - b.data.data_ptr()) % 16 == 0
    return bases and (a.n_rows <= 1 or ((a.stride - b.stride) * element) % 16 == 0)


Launch = Tuple[Tuple[int, ...], Tuple[Any, ...], Dict[str, Any]]


def _statistics_meta(
    cfg: LaunchConfig, params: RowParams, dtype: torch.dtype, **switches: bool
) -> Dict[str, Any]:
    """Meta-parameters of a kernel that summarises rows (``summarize_row``)."""
    return dict(
        BLOCK_V=cfg.block_v,
        VEC=cfg.vec,
        UNIT_T=params.unit_temperature,
        **switches,
        TRANSFORM=transform_args(params)[0],
        FIXED_REF=fixed_reference(params, dtype),
    )


def _fused_grad_block(cfg: LaunchConfig, skew_agrees: bool, stats_on_fixed_refs: bool) -> int:
    """Elements per trip of the gradient walk inside the fused pass."""
    if not skew_agrees:
        return max(cfg.grad_block // 2, cfg.vec)
    if TRITON_BEFORE_3_7 and stats_on_fixed_refs:
        return max(cfg.grad_block // 2, cfg.vec)
    return cfg.grad_block


def token_pass_launch(
    logits: LogitsRows,
    tokens: TokenInputs,
    grad_weights: Any,
    grad_out: Optional[LogitsRows],
    outputs: Tuple[Any, ...],
    params: RowParams,
    with_stats: bool,
    cfg: Optional[LaunchConfig] = None,
) -> Launch:
    """Grid, arguments and meta-parameters of one ``token_pass_kernel`` launch.

    ``outputs`` is ``(loss, logprobs, probs, entropy, row_max, sum_exp, scale, flags)``
    (``entropy`` None without stats); tensors may be AOT stand-ins. With ``grad_out`` the
    gradient is written in the pass, weighted by ``grad_weights``. ``cfg`` overrides the
    default configuration (autotuning).
    """
    dtype = logits.data.dtype
    cfg = cfg or launch_config(dtype, params.logit_softcap is not None)
    loss, logprobs, probs, entropy, row_max, sum_exp, scale, flags = outputs
    _, logit_scale, cap, tanh_slope = transform_args(params)
    write_grad = grad_out is not None
    args = (
        logits.data,
        logits.stride,
        tokens.targets,
        tokens.advantages,
        tokens.tokens_per_advantage,
        tokens.mask if tokens.mask is not None else flags,
        grad_weights if write_grad else loss,
        grad_out.data if write_grad else logits.data,
        grad_out.stride if write_grad else 0,
        loss,
        logprobs,
        probs,
        entropy if with_stats else loss,
        row_max,
        sum_exp,
        scale,
        flags,
        logits.n_cols,
        params.ignore_index,
        params.tau,
        params.inv_temperature,
        params.inv_temperature * LOG2E,
        logit_scale,
        cap,
        tanh_slope,
    )
    skew_agrees = write_grad and same_skew(logits, grad_out, cfg.vec)
    meta = _statistics_meta(cfg, params, dtype, WITH_STATS=with_stats)
    meta.update(
        HAS_MASK=tokens.mask is not None,
        WRITE_GRAD=write_grad,
        SAME_SKEW=skew_agrees,
        # With skews that differ the stores are element by element, each with its own
        # address: at the full block ptxas spilled in the 16-bit variants (sm_80).
        GRAD_BLOCK=_fused_grad_block(cfg, skew_agrees, with_stats and meta["FIXED_REF"]),
    )
    registers = {"maxnreg": fused_pass_registers(cfg.num_warps)} if write_grad else {}
    meta.update(compile_options(cfg.num_warps, **registers))
    return (logits.n_rows,), args, meta


def partial_stats_launch(
    logits: LogitsRows,
    segments: int,
    local_targets: Any,
    outputs: Tuple[Any, ...],
    params: RowParams,
    with_entropy: bool,
) -> Launch:
    """One ``partial_stats_kernel`` launch over ``(rows, segments)``; ``outputs`` is
    ``(row_max, sum_exp, sum_exp_1, weighted, target_logit)``, each ``(N, segments)``."""
    cfg = launch_config(logits.data.dtype, params.logit_softcap is not None)
    row_max, sum_exp, sum_exp_1, weighted, target_logit = outputs
    _, logit_scale, cap, tanh_slope = transform_args(params)
    seg_len = segment_length(logits.n_cols, segments, cfg.block_v)
    args = (
        logits.data,
        logits.stride,
        local_targets,
        row_max,
        sum_exp,
        sum_exp_1,
        weighted if with_entropy else sum_exp,
        target_logit,
        logits.n_cols,
        seg_len,
        params.inv_temperature * LOG2E,
        logit_scale,
        cap,
        tanh_slope,
    )
    meta = _statistics_meta(cfg, params, logits.data.dtype, WITH_ENTROPY=with_entropy)
    meta.update(compile_options(cfg.num_warps))
    return (logits.n_rows, triton.cdiv(logits.n_cols, seg_len)), args, meta


def row_grad_launch(
    logits: LogitsRows, out: LogitsRows, rows: GradRows, params: RowParams, segments: int
) -> Launch:
    """One ``row_grad_kernel`` launch over ``(rows, segments)``."""
    cfg = launch_config(logits.data.dtype, params.logit_softcap is not None, GRAD_WARPS)
    kind, logit_scale, cap, tanh_slope = transform_args(params)
    seg_len = segment_length(logits.n_cols, segments, cfg.grad_block)
    args = (
        logits.data,
        logits.stride,
        out.data,
        out.stride,
        rows.targets,
        rows.row_max,
        rows.sum_exp,
        rows.grad_rows,
        rows.scale,
        logits.n_cols,
        seg_len,
        params.inv_temperature,
        params.inv_temperature * LOG2E,
        logit_scale,
        cap,
        tanh_slope,
    )
    meta = dict(
        BLOCK_V=cfg.grad_block,
        VEC=cfg.vec,
        SAME_SKEW=same_skew(logits, out, cfg.vec),
        TRANSFORM=kind,
        **compile_options(GRAD_WARPS),
    )
    return (logits.n_rows, triton.cdiv(logits.n_cols, seg_len)), args, meta
