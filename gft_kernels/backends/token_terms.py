"""Per-token GFT quantities from row statistics, in plain PyTorch (O(N) work).

The fused kernels compute these inside their row pass; this module is the same math for
the chunked-PyTorch backend and for statistics combined across vocab-parallel ranks. It
also holds the data checks of the torch backend and the shared way every backend reports
a bad value.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from gft_kernels.backends.base import RowParams

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
    ``c = q if q <= tau else 1``, ``scale = A c`` on valid tokens of rows with a finite
    max, ``loss = -scale * log p`` (exactly 0 where ``scale`` is 0, even when
    ``log p = -inf``). A row whose max is not finite (all ``-inf``, or a ``+inf`` entry)
    carries no loss and no gradient; its ``log p`` is ``-inf`` and ``q``, entropy are 0.
    """
    finite = torch.isfinite(row_max)
    shift = torch.where(finite, row_max, torch.zeros_like(row_max))
    log_sum = torch.log(sum_exp)
    logprobs = (target_logit - shift) * params.inv_temperature - log_sum
    probs = torch.exp(target_logit - shift) / sum_exp_1
    dcr = torch.where(probs <= params.tau, probs, torch.ones_like(probs))
    live = valid & finite
    scale = torch.where(live, advantages * dcr, torch.zeros_like(dcr))
    loss = torch.where(scale != 0, -scale * logprobs, torch.zeros_like(scale))
    logprobs = torch.where(live, logprobs, torch.where(valid, -float("inf"), 0.0))
    probs = torch.where(live, probs, torch.zeros_like(probs))
    entropy = None
    if weighted is not None:
        entropy = torch.where(finite, log_sum - weighted / sum_exp, torch.zeros_like(log_sum))
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

    On CUDA this is a device-side assert (no host synchronisation; the message is fixed).
    On the CPU the flags are read from host memory directly (no dispatch, no copy) and the
    error names the first offending value.
    """
    targets_msg = f"targets: expected values in [0, {vocab_size}) or ignore_index={ignore_index}"
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
        f"advantages: expected finite values, got {float(advantages.numpy()[row])} "
        f"(entry {row})"
    )
