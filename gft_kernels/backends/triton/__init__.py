"""The ``triton`` backend: launch wrappers of the Triton row kernels.

Kernels: :mod:`.row_pass` (the fused token pass and the vocab-block statistics) and
:mod:`.row_grad` (gradient rows). Launch configurations come from :mod:`.tuning`, which
also lists every variant the wrappers can launch (for ``make aot``).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from gft_kernels.backends.base import PartialStats, RowParams, TokenPass
from gft_kernels.backends.token_terms import (
    combine_partials,
    raise_for_flags,
    token_terms,
    value_flags,
)
from gft_kernels.backends.triton import tuning
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
        cfg = launch_config(n_cols, logits.dtype, "token_pass")
        if tuning.row_segments(n_rows, n_cols, cfg.block_v, logits.device) > 1:
            return self._split_token_pass(
                logits,
                targets,
                advantages,
                mask,
                params,
                tokens_per_advantage,
                with_stats,
                grad_weights,
                grad_out,
            )
        dev = logits.device
        vec = lambda: torch.empty(n_rows, dtype=torch.float32, device=dev)  # noqa: E731
        loss, logprobs, probs, row_max, sum_exp, scale = (vec() for _ in range(6))
        entropy = vec() if with_stats else None
        flags = torch.empty(n_rows, dtype=torch.int32, device=dev)
        write_grad = grad_out is not None
        kind, logit_scale, cap, slope = _transform(params)
        if n_rows:
            token_pass_kernel[(n_rows,)](
                logits,
                logits.stride(0),
                targets,
                advantages,
                tokens_per_advantage,
                mask if mask is not None else flags,
                grad_weights if write_grad else loss,
                grad_out if write_grad else logits,
                grad_out.stride(0) if write_grad else 0,
                loss,
                logprobs,
                probs,
                entropy if with_stats else loss,
                row_max,
                sum_exp,
                scale,
                flags,
                n_cols,
                params.ignore_index,
                params.tau,
                params.inv_temperature,
                params.inv_temperature * LOG2E,
                logit_scale,
                cap,
                slope,
                BLOCK_V=cfg.block_v,
                VEC=cfg.vec,
                UNIT_T=params.unit_temperature,
                WITH_STATS=with_stats,
                TRANSFORM=kind,
                HAS_MASK=mask is not None,
                WRITE_GRAD=write_grad,
                SAME_SKEW=write_grad
                and _same_skew(logits.stride(0), grad_out.stride(0), n_rows, cfg.vec),
                num_warps=cfg.num_warps,
            )
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
        part = self._segment_stats(logits, local_targets, params, with_entropy, segments=1)
        return PartialStats(
            *(
                t.reshape(-1) if t is not None else None
                for t in (
                    part.row_max,
                    part.sum_exp,
                    part.sum_exp_1,
                    part.weighted,
                    part.target_logit,
                )
            )
        )

    def _segment_stats(self, logits, local_targets, params, with_entropy, segments):
        """``(N, segments)`` statistics of column segments of each row."""
        n_rows, n_cols = logits.shape
        cfg = launch_config(n_cols, logits.dtype, "partial_stats")
        seg_len = triton.cdiv(triton.cdiv(n_cols, segments), cfg.block_v) * cfg.block_v
        segments = triton.cdiv(n_cols, seg_len)
        out = lambda: torch.empty(n_rows, segments, dtype=torch.float32, device=logits.device)  # noqa: E731
        row_max, sum_exp, sum_exp_1, target_logit = (out() for _ in range(4))
        weighted = out() if with_entropy else None
        kind, logit_scale, cap, slope = _transform(params)
        if n_rows:
            partial_stats_kernel[(n_rows, segments)](
                logits,
                logits.stride(0),
                local_targets,
                row_max,
                sum_exp,
                sum_exp_1,
                weighted if with_entropy else sum_exp,
                target_logit,
                n_cols,
                seg_len,
                params.inv_temperature * LOG2E,
                logit_scale,
                cap,
                slope,
                BLOCK_V=cfg.block_v,
                VEC=cfg.vec,
                UNIT_T=params.unit_temperature,
                WITH_ENTROPY=with_entropy,
                TRANSFORM=kind,
                num_warps=cfg.num_warps,
            )
        return PartialStats(row_max, sum_exp, sum_exp_1, weighted, target_logit)

    def _split_token_pass(
        self,
        logits,
        targets,
        advantages,
        mask,
        params,
        tokens_per_advantage,
        with_stats,
        grad_weights,
        grad_out,
    ):
        """Few rows: each row's columns are split across programs, and the segments'
        statistics are combined exactly (the same algebra as vocab-parallel shards)."""
        n_rows, n_cols = logits.shape
        cfg = launch_config(n_cols, logits.dtype, "partial_stats")
        flags = value_flags(
            targets, mask, advantages, tokens_per_advantage, n_cols, params.ignore_index
        )
        raise_for_flags(
            flags, targets, mask, advantages, tokens_per_advantage, n_cols, params.ignore_index
        )
        valid = targets != params.ignore_index
        if mask is not None:
            valid = valid & (mask != 0)
        adv = advantages
        if tokens_per_advantage > 1:
            adv = adv.repeat_interleave(tokens_per_advantage)
        local = torch.where(valid, targets.long(), torch.full_like(targets, -1, dtype=torch.long))
        segments = tuning.row_segments(n_rows, n_cols, cfg.block_v, logits.device)
        part = self._segment_stats(logits, local, params, with_stats, segments)
        row_max, sum_exp, sum_exp_1, weighted, target_logit = combine_partials(
            part,
            params,
            reduce_max=lambda x: x.amax(-1, keepdim=True),
            reduce_sum=lambda stacked: stacked.sum(-1),
        )
        row_max = row_max.squeeze(-1)
        active = valid if with_stats else valid & (adv != 0)
        loss, logprobs, probs, entropy, scale = token_terms(
            row_max, sum_exp, sum_exp_1, weighted, target_logit, active, adv, params
        )
        if grad_out is not None:
            self.row_grad(logits, local, row_max, sum_exp, grad_weights, scale, params, grad_out)
        return TokenPass(loss, logprobs, probs, entropy, row_max, sum_exp, scale)

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
        segments = tuning.row_segments(n_rows, n_cols, cfg.block_v, logits.device)
        seg_len = triton.cdiv(triton.cdiv(n_cols, segments), cfg.block_v) * cfg.block_v
        if n_rows:
            row_grad_kernel[(n_rows, triton.cdiv(n_cols, seg_len))](
                logits,
                logits.stride(0),
                out,
                out.stride(0),
                targets,
                row_max,
                sum_exp,
                grad_rows,
                scale,
                n_cols,
                seg_len,
                params.inv_temperature,
                params.inv_temperature * LOG2E,
                logit_scale,
                cap,
                slope,
                BLOCK_V=cfg.block_v,
                VEC=cfg.vec,
                SAME_SKEW=_same_skew(logits.stride(0), out.stride(0), n_rows, cfg.vec),
                TRANSFORM=kind,
                num_warps=cfg.num_warps,
            )
        return out
