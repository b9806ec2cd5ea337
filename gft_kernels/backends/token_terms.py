"""Per-token GFT quantities from row statistics, in plain PyTorch (O(N) work).

The fused kernels compute these inside their row pass; this module is the same math for
the chunked-PyTorch backend and for statistics combined across vocab-parallel ranks. It
also holds the data checks of the torch backend and the shared way every backend reports
a bad value.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from gft_kernels.backends.base import RowParams

SYNC_CHECKS_ENV = "GFT_KERNELS_SYNC_CHECKS"

# Bits of the per-token error flags written by the kernels' data checks.
BAD_TARGET = 1
BAD_MASK = 2
BAD_ADVANTAGE = 4


def transform_logits(z: torch.Tensor, params: RowParams) -> torch.Tensor:
    """``z' = cap * tanh(z * scale / cap)`` (or ``z * scale``), in place on a private copy."""
    if params.logit_softcap is not None:
        return z.mul_(params.softcap_slope).tanh_().mul_(params.logit_softcap)
    if params.logit_scale != 1.0:
        return z.mul_(params.logit_scale)
    return z


def transform_slope(z_transformed: torch.Tensor, params: RowParams) -> torch.Tensor:
    """``dz'/dz`` as a function of ``z'``: ``scale * (1 - (z' / cap)^2)`` or ``scale``."""
    if params.logit_softcap is None:
        return torch.full_like(z_transformed, params.logit_scale)
    t = z_transformed / params.logit_softcap
    return (1.0 - t * t).mul_(params.logit_scale)


def token_terms(
    row_max: torch.Tensor,
    sum_exp: torch.Tensor,
    sum_exp_1: torch.Tensor,
    weighted: Optional[torch.Tensor],
    target_logit: torch.Tensor,
    valid: torch.Tensor,
    advantages: torch.Tensor,
    params: RowParams,
) -> Tuple[torch.Tensor, ...]:
    """``(loss, logprobs, probs, entropy, scale)`` per token, all ``(N,)``.

    ``log p = (z'_y - m) / T - log S``, ``q = exp(z'_y - m) / S_1``,
    ``c = q if q <= tau else 1`` (``q`` in the accumulate dtype against ``tau`` rounded to
    it, as a tensor-scalar comparison does), ``scale = A c`` on valid tokens of live rows,
    ``loss = -scale * log p`` (exactly 0 where ``scale`` is 0, even when ``log p = -inf``).

    A row holding a NaN has ``S = NaN`` (every backend's sums pass NaN on, while their max
    may skip it): it stays live, so its ``log p``, ``q`` and entropy are NaN, ``c = 1`` and
    a token that carries loss gets a NaN loss and gradient. A row without NaN whose max is
    not finite (all ``-inf``, or a ``+inf`` entry) carries no loss and no gradient; its
    ``log p`` is ``-inf`` and ``q``, entropy are 0.
    """
    finite = torch.isfinite(row_max)
    # Decided from S alone: the max of a row with a NaN may be NaN, -inf or a number,
    # depending on how the backend's max treats NaN.
    poisoned = torch.isnan(sum_exp)
    shift = torch.where(finite, row_max, torch.zeros_like(row_max))
    log_sum = torch.log(sum_exp)
    logprobs = (target_logit - shift) * params.inv_temperature - log_sum
    probs = torch.exp(target_logit - shift) / sum_exp_1
    # NaN <= tau is false: c = 1, so a zero advantage still gives scale 0 on such a row.
    dcr = torch.where(probs <= params.tau, probs, torch.ones_like(probs))
    live_row = finite | poisoned
    live = valid & live_row
    scale = torch.where(live, advantages * dcr, torch.zeros_like(dcr))
    loss = torch.where(scale != 0, -scale * logprobs, torch.zeros_like(scale))
    logprobs = torch.where(live, logprobs, torch.where(valid, -float("inf"), 0.0))
    probs = torch.where(live, probs, torch.zeros_like(probs))
    entropy = None
    if weighted is not None:
        entropy = torch.where(live_row, log_sum - weighted / sum_exp, torch.zeros_like(log_sum))
    return loss, logprobs, probs, entropy, scale


def value_flags(
    targets: torch.Tensor,
    mask: Optional[torch.Tensor],
    advantages: torch.Tensor,
    tokens_per_advantage: int,
    vocab_size: int,
    ignore_index: int,
) -> torch.Tensor:
    """The kernels' data checks in PyTorch: int32 ``(N,)`` flags (0 where fine)."""
    bad_target = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    flags = bad_target.to(torch.int32) * BAD_TARGET
    if mask is not None:
        flags |= ((mask != 0) & (mask != 1)).to(torch.int32) * BAD_MASK
    bad_adv = ~torch.isfinite(advantages)
    if tokens_per_advantage > 1:
        bad_adv = bad_adv.repeat_interleave(tokens_per_advantage)
    flags |= bad_adv.to(torch.int32) * BAD_ADVANTAGE
    return flags


def _first(host_flags, bit: int) -> int:
    return int((host_flags & bit).nonzero()[0][0])


def raise_for_flags(
    flags: torch.Tensor,
    targets: torch.Tensor,
    mask: Optional[torch.Tensor],
    advantages: torch.Tensor,
    tokens_per_advantage: int,
    vocab_size: int,
    ignore_index: int,
) -> None:
    """Turn the kernels' error flags into the library's ``ValueError``.

    On CUDA this is a device-side assert (no host synchronisation; the message is fixed,
    and the CUDA context is lost afterwards, as with any device assert). With
    ``GFT_KERNELS_SYNC_CHECKS=1`` the flags are copied to the host instead (one sync) and a
    ``ValueError`` names the first offending value, as it does on the CPU, where the flags
    are read from host memory directly (no dispatch, no copy).
    """
    targets_msg = f"targets: expected values in [0, {vocab_size}) or ignore_index={ignore_index}"
    if flags.device.type != "cpu" and os.environ.get(SYNC_CHECKS_ENV, "0") not in ("", "0"):
        flags, targets, advantages = flags.cpu(), targets.cpu(), advantages.cpu()
        mask = None if mask is None else mask.cpu()
    if flags.device.type != "cpu":
        for bit, what in (
            (BAD_TARGET, targets_msg + ", got a value outside"),
            (BAD_MASK, "mask: expected 0/1 values, got another value"),
            (BAD_ADVANTAGE, "advantages: expected finite values, got NaN or inf"),
        ):
            torch._assert_async((flags & bit).eq(0).all(), what)
        return
    host = flags.numpy()
    if not host.any():
        return
    if (host & BAD_TARGET).any():
        row = _first(host, BAD_TARGET)
        raise ValueError(f"{targets_msg}, got {int(targets.numpy()[row])} (token {row})")
    if (host & BAD_MASK).any():
        row = _first(host, BAD_MASK)
        value = mask.float().numpy()[row] if mask.dtype != torch.float32 else mask.numpy()[row]
        raise ValueError(f"mask: expected 0/1 values, got {float(value)} (token {row})")
    row = _first(host, BAD_ADVANTAGE) // tokens_per_advantage
    raise ValueError(
        f"advantages: expected finite values, got {float(advantages.numpy()[row])} (entry {row})"
    )


def combine_partials(part, params: RowParams, *, reduce_max, reduce_sum):
    """Exact row summary ``(M, S, S_1, W, z_y)`` of rows split into blocks of columns.

    ``part`` holds per-block statistics (a ``PartialStats``); ``reduce_max``/``reduce_sum``
    combine them across blocks (a reduction over the last dim for blocks of one row, or an
    all-reduce for blocks on different ranks). With ``M = max_r m_r`` and
    ``d_r = (m_r - M) / T``: ``S = sum_r S_r exp(d_r)``, ``W = sum_r exp(d_r) (W_r + d_r S_r)``;
    ``z_y`` comes from the one block that holds the target (the others hold 0).
    """
    row_max = reduce_max(part.row_max)
    # A block of -inf has m_r = -inf: its factor is exp(-inf) = 0. A row that is -inf in
    # every block keeps M = -inf; shifting by 0 then avoids -inf - -inf.
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    delta_1 = part.row_max - shift
    delta_t = delta_1 * params.inv_temperature
    factor_t = torch.exp(delta_t)
    sums = [part.sum_exp * factor_t, part.sum_exp_1 * torch.exp(delta_1), part.target_logit]
    if part.weighted is not None:
        live = factor_t > 0  # d_r = -inf on an all -inf block: its W_r term is 0, not NaN
        sums.append(torch.where(live, factor_t * (part.weighted + delta_t * part.sum_exp), 0.0))
    total = reduce_sum(torch.stack(sums))
    weighted = total[3] if part.weighted is not None else None
    return row_max, total[0], total[1], weighted, total[2]
