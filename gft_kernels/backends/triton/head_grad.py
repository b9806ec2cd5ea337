"""Blockwise head, backward: ``dh = G W``, ``dW = G^T h``, ``db = sum_t G`` with the
logits-gradient ``G`` formed tile by tile in registers and never written to memory.

Per tile of ``BLOCK_M`` tokens x ``BLOCK_N`` vocabulary rows the logits are recomputed
(:func:`~gft_kernels.backends.triton.head_tile.logits_tile`, the forward's exact ``z'``),
and with the row summary of the forward (``shift``, ``S``) and each token's coefficient
``c = w * A * dcr / T`` (0 for tokens that carry no loss)::

    G = c * (exp((z' - shift) / T) / S - onehot(y)) * dz'/dz

then ``G`` (rounded to the inputs' dtype, as the chunked head's GEMMs read it) meets the
hidden and weight tiles in ``tl.dot`` products, ``BLOCK_K`` columns of ``H`` at a time.

Who owns the sums (``OWNER``, a constexpr):

* 0, fast: one program per (token block, vocabulary tile); ``dh``, ``dW`` and ``db`` are
  summed with fp32 atomics, in an order that varies from run to run;
* 1, deterministic ``dh``: one program per token block walks every vocabulary tile in
  order and adds into its own rows of ``dh``;
* 2, deterministic ``dW``/``db``: one program per vocabulary tile walks every token block
  in order and adds into its own rows of ``dW``.

The deterministic pair recomputes the logits twice (five GEMM-sized products in all with
the forward's, against four): the price of sums in a fixed order.

Gradient filtering (``FILTER``): a tile is skipped when no token of the block has its
target in it and every token's softmax mass in it, ``sum_v p_v``, is below
``filter_mass``. With ``filter_mass = eps / n_tiles`` the skipped part of a row's gradient
has an L1 norm of at most ``eps * |c| * max|dz'/dz|`` (the whole row's skipped mass is
below ``eps``), so each entry of ``dh`` moves by at most ``eps * |c| * max_v |W_v,k| *
scale`` and each of ``dW``'s by at most ``sum_t |c_t| p_tv |h_t,k| * scale`` over skipped
pairs. The gradient GEMMs of a skipped tile are not run; its logits are still recomputed
(the mass needs them).
"""

from __future__ import annotations

import triton
import triton.language as tl

from gft_kernels.backends.triton.common import LOG2E, transform_slope
from gft_kernels.backends.triton.head_tile import dot_operand, finite_or_zero, logits_tile


@triton.jit
def _grad_tile(
    block,
    tile,
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    local_targets_ptr,
    row_max_ptr,
    sum_exp_ptr,
    coef_ptr,
    grad_hidden_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    n_rows,
    n_cols,
    hidden_size,
    stride_hidden_row,
    stride_hidden_col,
    stride_weight_row,
    stride_weight_col,
    inv_temperature,
    logit_scale,
    cap,
    tanh_slope,
    filter_mass,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    TRANSFORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    OWNER: tl.constexpr,
    NEED_DH: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    FILTER: tl.constexpr,
):
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    # A block whose tokens carry no loss contributes nothing: not even its logits are
    # formed (masked, ignored and zero-advantage tokens of a sync-free call).
    if tl.max(tl.abs(coef), axis=0) != 0.0:
        z = logits_tile(
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
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            HAS_BIAS,
            TRANSFORM,
            DOT_PRECISION,
            UPCAST_DOT,
        )
        shift = finite_or_zero(tl.load(row_max_ptr + rows, mask=row_ok, other=0.0))
        sum_exp = tl.load(sum_exp_ptr + rows, mask=row_ok, other=1.0)
        target = tl.load(local_targets_ptr + rows, mask=row_ok, other=-1)
        probs = tl.math.exp2((z - shift[:, None]) * (inv_temperature * LOG2E)) / sum_exp[:, None]
        is_target = cols[None, :] == target[:, None]
        busy = coef != 0.0
        keep = True
        if FILTER:
            mass = tl.sum(probs, axis=1)
            # NaN masses compare false and keep the tile (a NaN row's gradient is NaN).
            holds_target = tl.max(is_target.to(tl.int32), axis=1) > 0
            skip = (~busy | (mass < filter_mass)) & ~holds_target
            keep = tl.min(skip.to(tl.int32), axis=0) == 0
        if keep:
            grad = probs - is_target.to(tl.float32)
            if TRANSFORM != 0:
                grad = grad * transform_slope(z, TRANSFORM, logit_scale, cap)
            # Tokens that carry no loss get exactly 0 (their p may be inf or NaN on a row
            # without a finite max).
            grad = tl.where(busy[:, None] & col_ok[None, :], grad * coef[:, None], 0.0)
            if NEED_DB:
                db = tl.sum(grad, axis=0)
                if OWNER == 0:
                    tl.atomic_add(grad_bias_ptr + cols, db, mask=col_ok)
                else:
                    old = tl.load(grad_bias_ptr + cols, mask=col_ok, other=0.0)
                    tl.store(grad_bias_ptr + cols, old + db, mask=col_ok)
            grad_in = grad.to(hidden_ptr.dtype.element_ty)
            for k0 in range(0, hidden_size, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < hidden_size
                if NEED_DH:
                    w = tl.load(
                        weight_ptr
                        + cols[:, None] * stride_weight_row
                        + ks[None, :] * stride_weight_col,
                        mask=col_ok[:, None] & k_ok[None, :],
                        other=0.0,
                    )
                    dh = tl.dot(
                        dot_operand(grad_in, UPCAST_DOT),
                        dot_operand(w, UPCAST_DOT),
                        input_precision=DOT_PRECISION,
                    )
                    dh_ptrs = grad_hidden_ptr + rows[:, None] * hidden_size + ks[None, :]
                    dh_ok = row_ok[:, None] & k_ok[None, :]
                    if OWNER == 0:
                        tl.atomic_add(dh_ptrs, dh, mask=dh_ok)
                    else:
                        tl.store(dh_ptrs, tl.load(dh_ptrs, mask=dh_ok, other=0.0) + dh, mask=dh_ok)
                if NEED_DW:
                    h = tl.load(
                        hidden_ptr
                        + rows[:, None] * stride_hidden_row
                        + ks[None, :] * stride_hidden_col,
                        mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0,
                    )
                    # 0 * NaN = NaN: an idle token's non-finite hidden state must not reach
                    # dW through its zero gradient row.
                    h = tl.where(busy[:, None], h, 0.0)
                    dw = tl.dot(
                        dot_operand(tl.trans(grad_in), UPCAST_DOT),
                        dot_operand(h, UPCAST_DOT),
                        input_precision=DOT_PRECISION,
                    )
                    dw_ptrs = grad_weight_ptr + cols[:, None] * hidden_size + ks[None, :]
                    dw_ok = col_ok[:, None] & k_ok[None, :]
                    if OWNER == 0:
                        tl.atomic_add(dw_ptrs, dw, mask=dw_ok)
                    else:
                        tl.store(dw_ptrs, tl.load(dw_ptrs, mask=dw_ok, other=0.0) + dw, mask=dw_ok)


@triton.jit
def head_grad_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    local_targets_ptr,
    row_max_ptr,
    sum_exp_ptr,
    coef_ptr,
    grad_hidden_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    n_rows,
    n_cols,
    hidden_size,
    stride_hidden_row,
    stride_hidden_col,
    stride_weight_row,
    stride_weight_col,
    inv_temperature,
    logit_scale,
    cap,
    tanh_slope,
    filter_mass,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    TRANSFORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    OWNER: tl.constexpr,
    NEED_DH: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    FILTER: tl.constexpr,
):
    """Adds this launch's share of ``dh`` (fp32 ``(n_rows, H)``), ``dW`` (fp32
    ``(n_cols, H)``) and ``db`` (fp32 ``(n_cols,)``), all contiguous and zero-filled by the
    caller. Grid: ``(token blocks, vocabulary tiles)`` for ``OWNER`` 0, ``(token blocks,)``
    for 1, ``(vocabulary tiles,)`` for 2. ``row_max``/``sum_exp``/``coef`` are fp32
    ``(n_rows,)``, ``local_targets`` int64 (-1: the target is in no tile here)."""
    # One tile pair per program (atomics), or one axis walked in order by its owner.
    if OWNER == 0:
        _grad_tile(
            tl.program_id(0),
            tl.program_id(1),
            hidden_ptr,
            weight_ptr,
            bias_ptr,
            local_targets_ptr,
            row_max_ptr,
            sum_exp_ptr,
            coef_ptr,
            grad_hidden_ptr,
            grad_weight_ptr,
            grad_bias_ptr,
            n_rows,
            n_cols,
            hidden_size,
            stride_hidden_row,
            stride_hidden_col,
            stride_weight_row,
            stride_weight_col,
            inv_temperature,
            logit_scale,
            cap,
            tanh_slope,
            filter_mass,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            HAS_BIAS,
            TRANSFORM,
            DOT_PRECISION,
            UPCAST_DOT,
            OWNER,
            NEED_DH,
            NEED_DW,
            NEED_DB,
            FILTER,
        )
    elif OWNER == 1:
        for tile in range(0, tl.cdiv(n_cols, BLOCK_N)):
            _grad_tile(
                tl.program_id(0),
                tile,
                hidden_ptr,
                weight_ptr,
                bias_ptr,
                local_targets_ptr,
                row_max_ptr,
                sum_exp_ptr,
                coef_ptr,
                grad_hidden_ptr,
                grad_weight_ptr,
                grad_bias_ptr,
                n_rows,
                n_cols,
                hidden_size,
                stride_hidden_row,
                stride_hidden_col,
                stride_weight_row,
                stride_weight_col,
                inv_temperature,
                logit_scale,
                cap,
                tanh_slope,
                filter_mass,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                HAS_BIAS,
                TRANSFORM,
                DOT_PRECISION,
                UPCAST_DOT,
                OWNER,
                NEED_DH,
                NEED_DW,
                NEED_DB,
                FILTER,
            )
    else:
        for block in range(0, tl.cdiv(n_rows, BLOCK_M)):
            _grad_tile(
                block,
                tl.program_id(0),
                hidden_ptr,
                weight_ptr,
                bias_ptr,
                local_targets_ptr,
                row_max_ptr,
                sum_exp_ptr,
                coef_ptr,
                grad_hidden_ptr,
                grad_weight_ptr,
                grad_bias_ptr,
                n_rows,
                n_cols,
                hidden_size,
                stride_hidden_row,
                stride_hidden_col,
                stride_weight_row,
                stride_weight_col,
                inv_temperature,
                logit_scale,
                cap,
                tanh_slope,
                filter_mass,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                HAS_BIAS,
                TRANSFORM,
                DOT_PRECISION,
                UPCAST_DOT,
                OWNER,
                NEED_DH,
                NEED_DW,
                NEED_DB,
                FILTER,
            )
