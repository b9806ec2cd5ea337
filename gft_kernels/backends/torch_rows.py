"""Chunked-PyTorch row kernels: the portable backend (``backend="torch"``) and the spec.

Every backend computes exactly what this file computes (see
:mod:`gft_kernels.backends.base`). Rows are processed in chunks so the temporaries stay
at ``chunk_rows x V`` in the accumulate dtype instead of ``N x V``; the only full-size
tensor is the gradient the caller asks for. This backend favours clarity over speed: it
synchronises with the host for its data checks and to pick the rows that need work.
"""

from __future__ import annotations

from typing import Optional

import torch

from gft_kernels.backends.base import PartialStats, RowParams, TokenPass
from gft_kernels.backends.token_terms import (
    raise_for_flags,
    token_terms,
    transform_logits,
    transform_slope,
    value_flags,
)

# Bytes of accumulate-dtype temporaries per chunk: large enough to amortise launch
# overhead, small enough to stay far below one N x V buffer.
_CHUNK_BYTES = 64 * 1024 * 1024


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 logits keep fp64 statistics (for gradcheck); everything else uses fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows_for(n_cols: int, chunk_bytes: int = _CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (8 * max(n_cols, 1)))


def _row_summary(z: torch.Tensor, params: RowParams, with_entropy: bool):
    """``(m, S_t, S_1, W)`` of transformed rows ``z`` (a private copy, modified)."""
    row_max = z.amax(dim=-1, keepdim=True)
    # A row with no finite max is shifted by 0 so exp() gives 0 or inf, never NaN from
    # -inf - -inf or inf - inf: S is then NaN only where the row holds a NaN, and
    # token_terms tells the NaN rule's rows from the degenerate ones by it.
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    x = z.sub_(shift)
    sum_1 = None
    if not params.unit_temperature:
        sum_1 = torch.exp(x).sum(-1)
        x = x.mul_(params.inv_temperature)
    e = torch.exp(x)
    sum_t = e.sum(-1)
    weighted = None
    if with_entropy:
        weighted = torch.where(e > 0, e * x, torch.zeros_like(e)).sum(-1)
    return row_max.squeeze(-1), sum_t, sum_t if sum_1 is None else sum_1, weighted


def _gather_target(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    here = targets >= 0
    col = torch.where(here, targets, torch.zeros_like(targets))
    picked = z.gather(1, col.unsqueeze(1)).squeeze(1)
    return torch.where(here, picked, torch.zeros_like(picked))


def _partial(logits, local_targets, params, with_entropy, rows):
    acc = accumulate_dtype(logits.dtype)
    z = logits[rows].to(acc, copy=True) if isinstance(rows, slice) else logits[rows].to(acc)
    z = transform_logits(z, params)
    target_logit = _gather_target(z, local_targets[rows])
    return (*_row_summary(z, params, with_entropy), target_logit)


class TorchRows:
    """The ``torch`` backend: any device, any float dtype (fp64 included)."""

    name = "torch"

    def partial_stats(
        self,
        logits: torch.Tensor,
        local_targets: torch.Tensor,
        params: RowParams,
        *,
        with_entropy: bool,
    ) -> PartialStats:
        n_rows, n_cols = logits.shape
        parts = [
            _partial(logits, local_targets, params, with_entropy, slice(s, s + step))
            for step in [chunk_rows_for(n_cols)]
            for s in range(0, n_rows, step)
        ]
        acc = accumulate_dtype(logits.dtype)
        empty = logits.new_empty(0, dtype=acc)

        def cat(i):
            return torch.cat([p[i] for p in parts]) if parts else empty

        return PartialStats(
            row_max=cat(0),
            sum_exp=cat(1),
            sum_exp_1=cat(2),
            weighted=cat(3) if with_entropy else None,
            target_logit=cat(4),
        )

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
        flags = value_flags(
            targets, mask, advantages, tokens_per_advantage, n_cols, params.ignore_index
        )
        if bool(flags.any()):
            raise_for_flags(
                flags.cpu(),
                targets.cpu(),
                None if mask is None else mask.cpu(),
                advantages.cpu(),
                tokens_per_advantage,
                n_cols,
                params.ignore_index,
            )
        targets = targets.long()
        valid = targets != params.ignore_index
        if mask is not None:
            valid = valid & (mask != 0)
        adv = advantages
        if tokens_per_advantage > 1:
            adv = adv.repeat_interleave(tokens_per_advantage)
        local = torch.where(valid, targets, torch.full_like(targets, -1))
        acc = accumulate_dtype(logits.dtype)
        # Without stats, rows that carry no loss are never read (their outputs are 0).
        active = valid if with_stats else valid & (adv != 0)
        row_max = torch.zeros(n_rows, dtype=acc, device=logits.device)
        sum_exp = torch.ones_like(row_max)
        sum_exp_1 = torch.ones_like(row_max)
        weighted = torch.zeros_like(row_max) if with_stats else None
        target_logit = torch.zeros_like(row_max)
        rows = torch.arange(n_rows, device=logits.device) if with_stats else active.nonzero()
        rows = rows.reshape(-1)
        step = chunk_rows_for(n_cols)
        for start in range(0, rows.numel(), step):
            index = rows[start : start + step]
            m, s_t, s_1, w, zy = _partial(logits, local, params, with_stats, index)
            row_max[index], sum_exp[index], sum_exp_1[index] = m, s_t, s_1
            target_logit[index] = zy
            if with_stats:
                weighted[index] = w
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
        acc = row_max.dtype
        coef = grad_rows.to(acc) * scale * params.inv_temperature
        # Rows with coef == 0 (masked, zero advantage, rectified to 0) are zero-filled
        # without being read: the cost follows the contributing rows.
        busy = coef != 0
        rows = busy.nonzero().squeeze(1)
        if rows.numel() < n_rows:
            out.index_fill_(0, (~busy).nonzero().squeeze(1), 0)
        step = chunk_rows_for(n_cols)
        for start in range(0, rows.numel(), step):
            index = rows[start : start + step]
            c = coef[index].unsqueeze(-1)
            # index_select makes a private copy: the rows are read before out (which may
            # alias logits) is written.
            z = transform_logits(logits.index_select(0, index).to(acc), params)
            slope = transform_slope(z, params) if params.transforms_logits else None
            g = z.sub_(row_max[index].unsqueeze(-1)).mul_(params.inv_temperature).exp_()
            g.mul_(c / sum_exp[index].unsqueeze(-1))
            tgt = targets[index].long()
            here = tgt >= 0
            col = torch.where(here, tgt, torch.zeros_like(tgt)).unsqueeze(-1)
            g.scatter_add_(1, col, torch.where(here.unsqueeze(-1), -c, torch.zeros_like(c)))
            if slope is not None:
                g.mul_(slope)
            out.index_copy_(0, index, g.to(out.dtype))
        return out
