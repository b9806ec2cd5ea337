"""The ``triton`` backend: launch wrappers of the Triton row kernels.

Kernels: :mod:`.row_pass` (the fused token pass and the vocab-block statistics) and
:mod:`.row_grad` (gradient rows). Launch configurations come from :mod:`.tuning`, which
also lists every variant the wrappers can launch (for ``make aot``).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

from typing import Optional

import torch

from gft_kernels.backends.base import PartialStats, RowParams, TokenPass
from gft_kernels.backends.token_terms import raise_for_flags
from gft_kernels.backends.triton.row_grad import LOG2E, row_grad_kernel
from gft_kernels.backends.triton.row_pass import partial_stats_kernel, token_pass_kernel
from gft_kernels.backends.triton.tuning import launch_config


def _transform(params: RowParams):
    """``(TRANSFORM, logit_scale, cap, slope)`` kernel arguments."""
    if params.logit_softcap is not None:
        return 2, params.logit_scale, params.logit_softcap, params.softcap_slope
    if params.logit_scale != 1.0:
        return 1, params.logit_scale, 1.0, 0.0
    return 0, 1.0, 1.0, 0.0


def _same_skew(stride_a: int, stride_b: int, n_rows: int, vec: int) -> bool:
    return n_rows <= 1 or (stride_a - stride_b) % vec == 0


class TritonRows:
    """Triton implementation of :class:`~gft_kernels.backends.base.RowBackend`."""

    name = "triton"

    def token_pass(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        advantages: torch.Tensor,
        mask: Optional[torch.Tensor],
        params: RowParams,
        *,
        tokens_per_advantage: int,
        with_stats: bool,
        grad_weights: Optional[torch.Tensor] = None,
        grad_out: Optional[torch.Tensor] = None,
    ) -> TokenPass:
        n_rows, n_cols = logits.shape
        dev = logits.device
        vec = lambda: torch.empty(n_rows, dtype=torch.float32, device=dev)  # noqa: E731
        loss, logprobs, probs, row_max, sum_exp, scale = (vec() for _ in range(6))
        entropy = vec() if with_stats else None
        flags = torch.empty(n_rows, dtype=torch.int32, device=dev)
        write_grad = grad_out is not None
        kind, logit_scale, cap, slope = _transform(params)
        cfg = launch_config(n_cols, logits.dtype, "token_pass")
        if n_rows:
            token_pass_kernel[(n_rows,)](
                logits, logits.stride(0), targets, advantages, tokens_per_advantage,
                mask if mask is not None else flags,
                grad_weights if write_grad else loss,
                grad_out if write_grad else logits,
                grad_out.stride(0) if write_grad else 0,
                loss, logprobs, probs, entropy if with_stats else loss, row_max, sum_exp,
                scale, flags,
                n_cols, params.ignore_index, params.tau, params.inv_temperature,
                params.inv_temperature * LOG2E, logit_scale, cap, slope,
                BLOCK_V=cfg.block_v, VEC=cfg.vec, UNIT_T=params.unit_temperature,
                WITH_STATS=with_stats, TRANSFORM=kind, HAS_MASK=mask is not None,
                WRITE_GRAD=write_grad,
                SAME_SKEW=write_grad and _same_skew(
                    logits.stride(0), grad_out.stride(0), n_rows, cfg.vec
                ),
                num_warps=cfg.num_warps,
            )  # fmt: skip
        raise_for_flags(
            flags, targets, mask, advantages, tokens_per_advantage, n_cols, params.ignore_index
        )
        return TokenPass(loss, logprobs, probs, entropy, row_max, sum_exp, scale)

    def partial_stats(
        self,
        logits: torch.Tensor,
        local_targets: torch.Tensor,
        params: RowParams,
        *,
        with_entropy: bool,
    ) -> PartialStats:
        n_rows, n_cols = logits.shape
        dev = logits.device
        vec = lambda: torch.empty(n_rows, dtype=torch.float32, device=dev)  # noqa: E731
        row_max, sum_exp, sum_exp_1, target_logit = (vec() for _ in range(4))
        weighted = vec() if with_entropy else None
        kind, logit_scale, cap, slope = _transform(params)
        cfg = launch_config(n_cols, logits.dtype, "partial_stats")
        if n_rows:
            partial_stats_kernel[(n_rows,)](
                logits, logits.stride(0), local_targets, row_max, sum_exp, sum_exp_1,
                weighted if with_entropy else sum_exp, target_logit, n_cols,
                params.inv_temperature * LOG2E, logit_scale, cap, slope,
                BLOCK_V=cfg.block_v, VEC=cfg.vec, UNIT_T=params.unit_temperature,
                WITH_ENTROPY=with_entropy, TRANSFORM=kind, num_warps=cfg.num_warps,
            )  # fmt: skip
        return PartialStats(row_max, sum_exp, sum_exp_1, weighted, target_logit)

    def row_grad(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        row_max: torch.Tensor,
        sum_exp: torch.Tensor,
        grad_rows: torch.Tensor,
        scale: torch.Tensor,
        params: RowParams,
        out: torch.Tensor,
    ) -> torch.Tensor:
        n_rows, n_cols = logits.shape
        kind, logit_scale, cap, slope = _transform(params)
        cfg = launch_config(n_cols, logits.dtype, "row_grad")
        if n_rows:
            row_grad_kernel[(n_rows,)](
                logits, logits.stride(0), out, out.stride(0), targets, row_max, sum_exp,
                grad_rows, scale, n_cols, params.inv_temperature,
                params.inv_temperature * LOG2E, logit_scale, cap, slope,
                BLOCK_V=cfg.block_v, VEC=cfg.vec,
                SAME_SKEW=_same_skew(logits.stride(0), out.stride(0), n_rows, cfg.vec),
                TRANSFORM=kind, num_warps=cfg.num_warps,
            )  # fmt: skip
        return out
