"""Chunked-PyTorch row kernels: the portable backend (``backend="torch"``) and the spec.

Every backend computes exactly what this file computes (see
:mod:`gft_kernels.backends.base`): the row statistics and the row gradient here, and the
per-token terms of :mod:`gft_kernels.backends.token_terms`, which the token pass runs on
those statistics. Rows are processed in chunks so the temporaries stay at
``chunk_rows x V`` in the accumulate dtype instead of ``N x V``; the only full-size
tensor is the gradient the caller asks for. This backend favours clarity over speed: it
synchronises with the host for its data checks and to pick the rows that need work.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from gft_kernels.backends import PartialStats, RowBackend, RowParams, TokenPass
from gft_kernels.backends.base import GradRows, TokenPassCall
from gft_kernels.backends.token_terms import (
    token_pass_from_statistics,
    transform_logits,
    transform_slope,
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


def _partial(logits, local_targets, params, with_entropy, rows: Union[slice, Tensor]):
    acc = accumulate_dtype(logits.dtype)
    z = logits[rows].to(acc, copy=True) if isinstance(rows, slice) else logits[rows].to(acc)
    z = transform_logits(z, params)
    target_logit = _gather_target(z, local_targets[rows])
    return (*_row_summary(z, params, with_entropy), target_logit)


def _statistics(
    logits: Tensor,
    local_targets: Tensor,
    params: RowParams,
    with_entropy: bool,
    rows: Optional[Tensor],
) -> PartialStats:
    """Statistics of the rows ``rows`` (int64 indices; None: every row), in chunks."""
    n_rows, n_cols = logits.shape
    step = chunk_rows_for(n_cols)
    if rows is None:
        chunks = [slice(s, s + step) for s in range(0, n_rows, step)]
    else:
        chunks = [rows[s : s + step] for s in range(0, rows.numel(), step)]
    parts = [_partial(logits, local_targets, params, with_entropy, index) for index in chunks]
    empty = logits.new_empty(0, dtype=accumulate_dtype(logits.dtype))

    def cat(i):
        return torch.cat([p[i] for p in parts]) if parts else empty

    return PartialStats(cat(0), cat(1), cat(2), cat(3) if with_entropy else None, cat(4))


class TorchRows(RowBackend):
    """The ``torch`` backend: any device, any float dtype (fp64 included)."""

    name = "torch"

    def _partial_stats(
        self, logits: Tensor, local_targets: Tensor, params: RowParams, with_entropy: bool
    ) -> PartialStats:
        return _statistics(logits, local_targets, params, with_entropy, None)

    def _token_pass(self, call: TokenPassCall) -> TokenPass:
        def statistics(local: Tensor, rows: Optional[Tensor]) -> PartialStats:
            return _statistics(call.logits, local, call.params, call.with_stats, rows)

        # Without stats, rows that carry no loss are never read (their outputs are 0).
        return token_pass_from_statistics(self, call, statistics=statistics, compact=True)[0]

    def _row_grad(self, logits: Tensor, rows: GradRows, params: RowParams, out: Tensor) -> Tensor:
        n_rows, n_cols = logits.shape
        acc = rows.row_max.dtype
        coef = rows.grad_rows.to(acc) * rows.scale * params.inv_temperature
        # Rows with coef == 0 (masked, zero advantage, rectified to 0) are zero-filled
        # without being read: the cost follows the contributing rows.
        busy = coef != 0
        index_busy = busy.nonzero().squeeze(1)
        if index_busy.numel() < n_rows:
            out.index_fill_(0, (~busy).nonzero().squeeze(1), 0)
        step = chunk_rows_for(n_cols)
        for start in range(0, index_busy.numel(), step):
            index = index_busy[start : start + step]
            c = coef[index].unsqueeze(-1)
            # index_select makes a private copy: the rows are read before out (which may
            # alias logits) is written.
            z = transform_logits(logits.index_select(0, index).to(acc), params)
            slope = transform_slope(z, params) if params.transforms_logits else None
            g = z.sub_(rows.row_max[index].unsqueeze(-1)).mul_(params.inv_temperature).exp_()
            g.mul_(c / rows.sum_exp[index].unsqueeze(-1))
            tgt = rows.targets[index].long()
            here = tgt >= 0
            col = torch.where(here, tgt, torch.zeros_like(tgt)).unsqueeze(-1)
            g.scatter_add_(1, col, torch.where(here.unsqueeze(-1), -c, torch.zeros_like(c)))
            if slope is not None:
                g.mul_(slope)
            out.index_copy_(0, index, g.to(out.dtype))
        return out
