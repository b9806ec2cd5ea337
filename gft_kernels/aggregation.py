"""Aggregation modes as per-token weights: one function for the losses and every trainer.

Every reduced mode (docs/design.md) is ``loss = sum_t w_t * l_t`` for a weight that depends
only on the mask, the mode and some counts, so the kernels never need to know the mode:
the weight reaches them through autograd (``dL/dl_t = w_t``), or folded into the
advantages by an integration. The counts are the denominators of the mode (tokens,
sequences, the response length), taken from the batch at hand by default and from the
caller when they span more (an optimizer step's micro-batches, data-parallel ranks), and
a scale factor (``ranks``: data parallelism averages the ranks' gradients, so each rank's
loss is multiplied by their number). A token that carries no loss weighs 0 whatever the
denominators, so where the naive formula divides 0 by 0 (empty mask, fully masked
sequence, a count of 0 with no valid token) the weight is 0; a valid token over a count of
0 keeps the division by zero, which must show.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

Count = Union[float, int, torch.Tensor]

# "token-sum" is verl's name for "sum".
_SUM_MODES = ("sum", "none", "token-sum")


def aggregation_weights(
    valid: torch.Tensor,
    loss_agg_mode: str,
    dtype: torch.dtype,
    *,
    tokens: Optional[Count] = None,
    sequences: Optional[Count] = None,
    response_length: Optional[Count] = None,
    ranks: float = 1.0,
    norm_by_sequences: bool = False,
) -> torch.Tensor:
    """Weights ``w`` with ``loss = sum(w * l)``, shaped like ``valid`` (``(B, T)`` or ``(N,)``).

    Args:
        valid: bool, the tokens that carry loss (mask and not ignore_index).
        loss_agg_mode: ``token-mean``, ``seq-mean-token-sum``, ``seq-mean-token-mean``,
            ``seq-mean-token-sum-norm``, ``sum`` (or verl's ``token-sum``), or ``none``
            (the weight is the mask: per-token losses are returned unreduced).
        dtype: the weights' dtype.
        tokens: ``token-mean``'s denominator (a number or a 0-dim tensor, never read on
            the host); None: the valid tokens of ``valid``.
        sequences: the ``seq-*`` modes' number of sequences; None: ``valid.shape[0]``.
        response_length: ``Tlen`` of ``seq-mean-token-sum-norm``; None: ``valid.shape[-1]``.
        ranks: a factor on every weight (data-parallel ranks whose gradients are averaged).
        norm_by_sequences: ``seq-mean-token-sum-norm`` also divides by ``sequences``
            (verl's global-batch form); else it is ``sum / Tlen``, per batch.

    ``seq-mean-token-mean`` divides each sequence by its own valid tokens as well.
    """
    w = valid.to(dtype)
    if loss_agg_mode in _SUM_MODES:
        return w * ranks if ranks != 1.0 else w
    if loss_agg_mode == "token-mean":
        # The count is an integer; with no valid token every weight is 0 already, so
        # clamping it to 1 turns the reference's 0/0 into 0 without a host sync.
        count = w.sum().clamp_min(1) if tokens is None else tokens
        return _spread(valid, w, ranks, count)
    n_seq = valid.shape[0] if sequences is None else sequences
    if loss_agg_mode == "seq-mean-token-sum":
        return _spread(valid, w, ranks, n_seq)
    if loss_agg_mode == "seq-mean-token-mean":
        per_seq = w.sum(dim=-1, keepdim=True).clamp_min(1)
        return _spread(valid, w, ranks, n_seq, per_seq)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        tlen = valid.shape[-1] if response_length is None else response_length
        return _spread(valid, w, ranks, tlen * n_seq if norm_by_sequences else tlen)
    raise ValueError(f"loss_agg_mode: unknown mode {loss_agg_mode!r}")


def _spread(valid: torch.Tensor, w: torch.Tensor, numerator: float, *denominators) -> torch.Tensor:
    """``numerator / d_1 / d_2 ...`` on valid tokens, 0 elsewhere (even where the quotient
    is infinite), in ``w``'s dtype: a count given as a tensor is cast to it first, so an
    fp64 loss keeps fp64 weights."""
    scale = w.new_full((), numerator)
    for d in denominators:
        scale = scale / (d.to(w.dtype) if isinstance(d, torch.Tensor) else d)
    return torch.where(valid, scale, 0.0)
