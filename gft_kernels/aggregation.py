"""Aggregation modes as per-token weights.

Every reduced mode (docs/design.md) is ``loss = sum_t w_t * l_t`` for a weight that depends
only on the mask and the mode, so the kernels never need to know the mode: the weight
reaches them through autograd (``dL/dl_t = w_t``). Where the naive reference divides by
zero (empty mask, fully masked sequence, ``num_tokens=0`` with no valid token) the weight
is 0.
"""

from __future__ import annotations

from typing import Optional

import torch


def token_weights(
    valid: torch.Tensor,
    loss_agg_mode: str,
    dtype: torch.dtype,
    *,
    num_tokens: Optional[float] = None,
    max_response_length: Optional[int] = None,
) -> torch.Tensor:
    """Weights ``w`` with ``loss = sum(w * l)``, shaped like ``valid`` (``(B, T)`` or ``(N,)``).

    ``valid`` is the boolean token mask (mask and not ignore_index). For ``none`` the
    weight is the mask itself (the per-token losses are returned unreduced).
    """
    w = valid.to(dtype)
    if loss_agg_mode in ("sum", "none"):
        return w
    if loss_agg_mode == "token-mean":
        if num_tokens is not None:
            # A token that carries no loss weighs 0 whatever the denominator, so
            # num_tokens=0 on a batch with nothing to train gives 0, not 0 / 0. A valid
            # token over num_tokens=0 keeps the naive formula's division by zero (an
            # infinite weight): that count is the caller's mistake and must show.
            return torch.where(valid, w / num_tokens, 0.0)
        # The count is an integer; with no valid token every weight is 0 already, so
        # clamping the count to 1 turns the reference's 0/0 into 0 without a host sync.
        return w / w.sum().clamp_min(1)
    if loss_agg_mode == "seq-mean-token-sum":
        return w / valid.shape[0]
    if loss_agg_mode == "seq-mean-token-mean":
        per_seq = w.sum(dim=-1, keepdim=True)
        return torch.where(per_seq > 0, w / (per_seq.clamp_min(1) * valid.shape[0]), 0.0)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        tlen = valid.shape[-1] if max_response_length is None else max_response_length
        return w / tlen
    raise ValueError(f"loss_agg_mode: unknown mode {loss_agg_mode!r}")
