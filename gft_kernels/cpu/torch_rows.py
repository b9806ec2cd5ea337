"""Chunked-PyTorch row kernels: the portable backend (``backend="torch"``).

The same two primitives as the Triton and native kernels, so the autograd Function above
them is one code path:

* :func:`row_stats` - per row of logits ``z``: ``lse_t = logsumexp(z / T)``,
  ``lse_1 = logsumexp(z)`` and, on request, the entropy of ``softmax(z / T)``.
* :func:`row_grad` - ``out = coef[:, None] * (softmax(z / T) - onehot(target))``.

Rows are processed in chunks so the fp32 temporaries stay at ``chunk_rows x V`` instead
of ``N x V``; the only full-size tensor is the gradient the caller asks for.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

# fp32 bytes of temporaries per chunk: large enough to amortise launch overhead,
# small enough to stay far below one N x V buffer.
_CHUNK_BYTES = 64 * 1024 * 1024


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 logits keep fp64 statistics (for gradcheck); everything else uses fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows_for(n_cols: int, chunk_bytes: int = _CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * max(n_cols, 1)))


def row_stats(
    logits: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    active: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Row statistics of a 2-D ``(N, V)`` logits tensor.

    Returns ``(lse_t, lse_1, entropy)``, each ``(N,)`` in the accumulate dtype
    (fp64 for fp64 logits, else fp32); ``entropy`` is None unless requested.
    Rows with ``active[i] == False`` (optional bool ``(N,)``) are not read: their
    log-sum-exps are +inf (softmax 0: such a token carries no loss and no gradient).
    """
    n_rows, n_cols = logits.shape
    acc = accumulate_dtype(logits.dtype)
    lse_t = torch.full((n_rows,), float("inf"), dtype=acc, device=logits.device)
    lse_1 = lse_t.clone()
    entropy = torch.zeros_like(lse_t) if with_entropy else None
    rows = None if active is None else active.nonzero().squeeze(1)
    n_work = n_rows if rows is None else rows.numel()
    step = chunk_rows_for(n_cols)
    inv_t = 1.0 / temperature
    for start in range(0, n_work, step):
        stop = min(start + step, n_work)
        if rows is None:
            dest = slice(start, stop)
            z = logits[dest].to(acc, copy=True)
        else:
            dest = rows[start:stop]
            z = logits.index_select(0, dest).to(acc)  # a private copy already
        row_max = z.amax(dim=-1, keepdim=True)
        # A row of -inf has no finite max; shifting by 0 keeps exp() at 0 instead of NaN.
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        shifted = z.sub_(row_max)  # in place on the private copy
        if temperature != 1.0:
            lse_1[dest] = row_max.squeeze(-1) + shifted.exp().sum(-1).log()
            scaled = shifted.mul_(inv_t)  # (z - max) / T
        else:
            scaled = shifted
        probs_unnorm = scaled.exp()
        sum_t = probs_unnorm.sum(-1)
        lse_t[dest] = row_max.squeeze(-1) * inv_t + sum_t.log()
        if temperature == 1.0:  # one exponential serves both sums
            lse_1[dest] = lse_t[dest]
        if with_entropy:
            # H = log S - sum(e * x) / S with x = (z - max) / T; e = 0 where x = -inf.
            weighted = torch.where(probs_unnorm > 0, probs_unnorm * scaled, 0.0).sum(-1)
            entropy[dest] = sum_t.log() - weighted / sum_t
    return lse_t, lse_1, entropy


def row_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse_t: torch.Tensor,
    coef: torch.Tensor,
    temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write ``coef * (softmax(z / T) - onehot(targets))`` into ``out`` (may alias logits).

    ``targets`` must already be in ``[0, V)`` for every row (rows with ``coef == 0`` may
    hold any valid index). ``coef`` already includes every scalar factor, 1/T included.
    """
    n_rows, n_cols = logits.shape
    acc = lse_t.dtype
    step = chunk_rows_for(n_cols)
    inv_t = 1.0 / temperature
    # Rows with coef == 0 (masked, zero advantage, rectified to 0) are zero-filled without
    # being read, as in the other backends: the cost follows the contributing rows.
    nonzero = coef != 0
    rows = nonzero.nonzero().squeeze(1)
    if rows.numel() < n_rows:
        out.index_fill_(0, (~nonzero).nonzero().squeeze(1), 0)
    for start in range(0, rows.numel(), step):
        dest = rows[start : start + step]
        c = coef[dest].to(acc).unsqueeze(-1)
        # index_select makes a private copy: the rows are read before out (which may alias
        # logits) is written.
        g = logits.index_select(0, dest).to(acc).mul_(inv_t).sub_(lse_t[dest].unsqueeze(-1))
        g = g.exp_().mul_(c)
        g.scatter_add_(1, targets[dest].unsqueeze(-1), -c)
        out.index_copy_(0, dest, g.to(out.dtype))
    return out
