"""The blockwise head's shared tile: ``BLOCK_M`` tokens x ``BLOCK_N`` vocabulary rows of
``z' = transform(h W^T (+ b))``, computed from hidden and weight tiles with ``tl.dot``
(fp32 accumulation) and never written to memory.

The statistics kernel (:mod:`~gft_kernels.backends.triton.head_stats`) and the gradient
kernel (:mod:`~gft_kernels.backends.triton.head_grad`) both call :func:`logits_tile`, so
the backward recomputes exactly the forward's ``z'``: the same products summed in the same
order, the same transform.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gft_kernels.backends.triton.common import transform_logits


@triton.jit
def dot_operand(x, UPCAST_DOT: tl.constexpr):
    """``x`` as ``tl.dot`` takes it: as is, or as fp32 under the interpreter (see
    ``head_launch.INTERPRETER_TILES``)."""
    if UPCAST_DOT:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def logits_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows,
    cols,
    n_rows,
    n_cols,
    hidden_size,
    stride_hidden_row,
    stride_hidden_col,
    stride_weight_row,
    stride_weight_col,
    logit_scale,
    cap,
    tanh_slope,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    TRANSFORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """``(BLOCK_M, BLOCK_N)`` fp32 transformed logits; columns at or past ``n_cols`` are
    ``-inf`` (they take no softmax mass), rows past ``n_rows`` are computed from zeros.

    ``rows``/``cols`` are int64 (offsets of a 150k x 4k weight pass 2^31 elements);
    any strides, 0 included (a broadcast hidden row).
    """
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden_size
        a = tl.load(
            hidden_ptr + rows[:, None] * stride_hidden_row + ks[None, :] * stride_hidden_col,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        # The weight tile is read as (K, N): h W^T without a transposed copy.
        b = tl.load(
            weight_ptr + cols[None, :] * stride_weight_row + ks[:, None] * stride_weight_col,
            mask=col_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        acc = tl.dot(
            dot_operand(a, UPCAST_DOT),
            dot_operand(b, UPCAST_DOT),
            acc,
            input_precision=DOT_PRECISION,
        )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = transform_logits(acc, TRANSFORM, logit_scale, cap, tanh_slope)
    return tl.where(col_ok[None, :], z, -float("inf"))


@triton.jit
def finite_or_zero(x):
    """``x`` where finite, else 0: the shift a row's statistics take (an all ``-inf`` row, or
    one holding ``+inf``, is shifted by 0 so that ``exp`` gives 0 or inf, never NaN)."""
    return tl.where(tl.abs(x) < float("inf"), x, 0.0)
