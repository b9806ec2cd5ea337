"""verl 0.9's loss aggregation as per-token weights (torch only, no verl import).

verl >= 0.9 normalises every micro-batch's loss by counts of the whole mini-batch (its
``global_batch_info``: ``batch_num_tokens`` all-reduced over data parallelism, ``dp_size``,
``global_batch_size``, ``loss_scale_factor``) and calls ``backward()`` once per micro-batch
with no further division; data parallelism then averages the ranks' gradients. For every
mode the aggregate is linear in the per-token losses, ``loss = sum_t w_t * l_t``, with
weights that depend only on the mask and those counts. Advantages are data and enter the
GFT loss linearly, so ``w_t`` can be folded into them: ``fused_linear_gft_loss(...,
advantages=A * w, loss_agg_mode="sum")`` is then exactly verl's aggregate.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, Optional

import torch

from gft_kernels import aggregation

VERL_LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)

GLOBAL_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


def _count(name: str, value: Any, *, positive: bool) -> Optional[float]:
    """A count from ``global_batch_info`` as a float (None stays None)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a single number, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 if positive else value >= 0) or value != value or value == float("inf"):
        raise ValueError(
            f"{name}: expected a finite number {'> 0' if positive else '>= 0'}, got {value}"
        )
    return value


def aggregation_weights(
    mask: torch.Tensor,
    loss_agg_mode: str,
    *,
    dp_size: int = 1,
    batch_num_tokens: Optional[float] = None,
    global_batch_size: Optional[float] = None,
    loss_scale_factor: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-token weights ``w`` with ``verl agg_loss(l, mask, mode, **info) == sum(w * l)``.

    Args:
        mask: ``(B, T)`` response mask of one micro-batch (bool or 0/1).
        loss_agg_mode: one of :data:`VERL_LOSS_AGG_MODES`.
        dp_size: data-parallel ranks (verl multiplies by it because DP averages gradients).
        batch_num_tokens: valid tokens of the whole mini-batch, all ranks (``token-mean``);
            None: this micro-batch's own count (verl's fallback, only for ``dp_size == 1``).
        global_batch_size: sequences of the whole mini-batch, all ranks (``seq-mean-*``);
            None: this micro-batch's non-empty sequences (same fallback).
        loss_scale_factor: ``Tlen`` of ``seq-mean-token-sum-norm``; None: ``T``.
        dtype: dtype of the weights.

    Returns:
        ``(B, T)`` weights, 0 where the mask is 0. With verl's definitions:

        - ``token-mean``: ``dp / D``;
        - ``token-sum``: ``dp``;
        - ``seq-mean-token-sum``: ``dp / G``; ``-norm`` additionally ``/ Tlen``;
        - ``seq-mean-token-mean``: ``dp / (G * n_b)``, ``n_b`` the valid tokens of row b.

        Where verl divides 0 by 0 (an empty micro-batch under its own-count fallback) the
        weights are 0, not NaN.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask: expected a (batch, response_length) tensor, got {shape}")
    if loss_agg_mode not in VERL_LOSS_AGG_MODES:
        modes = ", ".join(VERL_LOSS_AGG_MODES)
        raise ValueError(f"loss_agg_mode: expected one of {modes}, got {loss_agg_mode!r}")
    dp = _count("dp_size", dp_size, positive=True)
    tokens = _count("batch_num_tokens", batch_num_tokens, positive=False)
    sequences = _count("global_batch_size", global_batch_size, positive=False)
    tlen = _count("loss_scale_factor", loss_scale_factor, positive=True)
    valid = mask.to(torch.bool)

    def fallback(name: str) -> None:
        if dp > 1:
            raise ValueError(
                f"{name}: required when dp_size > 1 (verl's global_batch_info), got None"
            )

    if loss_agg_mode == "token-mean" and tokens is None:
        fallback("batch_num_tokens")
    n_seq: Any = sequences
    if loss_agg_mode.startswith("seq-") and sequences is None:
        fallback("global_batch_size")
        # verl's own-count fallback: the micro-batch's non-empty sequences, counted on the
        # device (0 only where every row is empty, whose weights are 0 anyway).
        n_seq = valid.any(-1).sum()
    return aggregation.aggregation_weights(
        valid,
        loss_agg_mode,
        dtype,
        tokens=tokens,
        sequences=n_seq,
        response_length=tlen,
        ranks=dp,
        norm_by_sequences=True,
    )


def global_batch_info(config: Any) -> Mapping[str, Any]:
    """The ``global_batch_info`` verl's ``ppo_loss`` writes into the actor config.

    Accepts a verl ``ActorConfig`` (or any object/dict with ``global_batch_info``) and
    returns only the keys :func:`aggregation_weights` knows; a config without it gives {}.
    """
    info = None
    if isinstance(config, Mapping):
        info = config.get("global_batch_info")
    elif config is not None:
        info = getattr(config, "global_batch_info", None)
    if info is None:
        return {}
    if not isinstance(info, Mapping):
        raise TypeError(f"config.global_batch_info: expected a dict, got {type(info).__name__}")
    return {key: info[key] for key in GLOBAL_BATCH_KEYS if key in info}
