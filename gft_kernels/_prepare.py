"""Token-level preparation shared by the logits-level and fused-linear losses.

Everything here is static: shapes, dtypes, devices and option values are checked in
Python before anything launches, and no tensor value is read (no host synchronisation).
Checks that need the data (target range, mask values, finite advantages) happen inside
the row kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from gft_kernels import _checks
from gft_kernels.aggregation import aggregation_weights
from gft_kernels.backends import RowParams, check_backend
from gft_kernels.backends.torch_rows import accumulate_dtype


@dataclass
class TokenBatch:
    """Flattened per-token inputs, ready for a kernel (no input is modified)."""

    token_shape: torch.Size
    targets: torch.Tensor  # (N,) int64 or int32, ignore_index kept
    advantages: torch.Tensor  # (N // tokens_per_advantage,) in the accumulate dtype
    tokens_per_advantage: int  # the sequence length for per-sequence advantages, else 1
    mask: Optional[torch.Tensor]  # (N,) uint8 or float32 (0/1 checked in the kernels)
    valid: torch.Tensor  # (N,) bool: mask and not ignore_index
    weights: torch.Tensor  # aggregation weight w_t (loss = sum w * l); the mask for 'none'
    loss_agg_mode: str
    params: RowParams
    backend: str  # as resolved by check_backend (no build yet)


def check_options(
    *,
    tau: object,
    temperature: object,
    num_tokens: object,
    max_response_length: object,
    return_stats: object,
    logit_scale: object = 1.0,
    logit_softcap: object = None,
    ignore_index: object = -100,
    compute_dtype: torch.dtype = torch.float64,
) -> dict:
    """Check the scalar keywords shared by both losses; returns them normalised.

    ``compute_dtype`` is the kernels' arithmetic (fp32, or fp64 for fp64 input), which
    bounds the temperature from below; without the input (a module's constructor) the
    widest, fp64, is assumed and the call checks again.
    """
    tau = _checks.check_scalar("tau", tau, minimum=0.0, inclusive=True)
    temperature = _checks.check_scalar("temperature", temperature, minimum=0.0, inclusive=False)
    _checks.check_temperature(temperature, compute_dtype)
    logit_scale = _checks.check_scalar("logit_scale", logit_scale, minimum=0.0, inclusive=False)
    if logit_softcap is not None:
        logit_softcap = _checks.check_scalar(
            "logit_softcap", logit_softcap, minimum=0.0, inclusive=False
        )
    if num_tokens is not None:
        num_tokens = _checks.check_count_or_tensor("num_tokens", num_tokens)
    if max_response_length is not None:
        _checks.check_positive_int("max_response_length", max_response_length)
    _checks.check_bool("return_stats", return_stats)
    ignore_index = _checks.check_ignore_index(ignore_index)
    return dict(
        tau=tau,
        temperature=temperature,
        logit_scale=logit_scale,
        logit_softcap=logit_softcap,
        num_tokens=num_tokens,
        ignore_index=ignore_index,
    )


def prepare_tokens(
    anchor: torch.Tensor,
    targets: object,
    advantages: object,
    mask: Optional[object],
    *,
    backend: object,
    tau: object,
    temperature: object,
    loss_agg_mode: object,
    ignore_index: object,
    num_tokens: Optional[Union[float, torch.Tensor]],
    max_response_length: object,
    return_stats: object,
    logit_scale: object = 1.0,
    logit_softcap: object = None,
    anchor_name: str = "logits",
) -> TokenBatch:
    """Check every argument of a loss call and flatten the token inputs.

    ``anchor`` is the logits or hidden tensor (named ``anchor_name`` in errors): its
    leading dims are the tokens and its device/dtype pick the backend.
    """
    acc = accumulate_dtype(anchor.dtype)
    opts = check_options(
        tau=tau,
        temperature=temperature,
        num_tokens=num_tokens,
        max_response_length=max_response_length,
        return_stats=return_stats,
        logit_scale=logit_scale,
        logit_softcap=logit_softcap,
        ignore_index=ignore_index,
        compute_dtype=acc,
    )
    token_shape = anchor.shape[:-1]
    mode = _checks.check_mode(loss_agg_mode, len(token_shape))
    _checks.check_token_inputs(targets, advantages, mask, token_shape, anchor.device)
    _checks.check_ignore_index(opts["ignore_index"], targets.dtype)
    name = check_backend(backend, anchor.device, anchor.dtype, anchor_name)

    # The token inputs are O(N) next to the O(N x V) logits: one contiguous copy of a
    # strided or broadcast view (y[::2], adv.expand(N), token_adv[:, 0]) costs nothing
    # measurable and lets every kernel index them as plain (N,) arrays.
    flat_targets = targets.reshape(-1).contiguous()
    valid = flat_targets != opts["ignore_index"]
    flat_mask = None
    if mask is not None:
        flat_mask = mask.reshape(-1).contiguous()
        if flat_mask.dtype == torch.bool:
            flat_mask = flat_mask.view(torch.uint8)
        elif flat_mask.dtype not in (torch.uint8, torch.float32):
            flat_mask = flat_mask.to(torch.float32)  # keeps any non-0/1 value visible
        valid = valid & (flat_mask != 0)
    weights = aggregation_weights(
        valid.reshape(token_shape),
        mode,
        acc,
        tokens=opts["num_tokens"],
        response_length=max_response_length,
    ).reshape(-1)
    per_sequence = advantages.dim() == 1 and len(token_shape) == 2
    return TokenBatch(
        token_shape=token_shape,
        targets=flat_targets,
        advantages=advantages.reshape(-1).to(acc).contiguous(),
        tokens_per_advantage=token_shape[1] if per_sequence else 1,
        mask=flat_mask,
        valid=valid,
        weights=weights,
        loss_agg_mode=mode,
        params=RowParams(
            tau=opts["tau"],
            temperature=opts["temperature"],
            logit_scale=opts["logit_scale"],
            logit_softcap=opts["logit_softcap"],
            ignore_index=opts["ignore_index"],
        ),
        backend=name,
    )


def reduce_loss(token_loss: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Apply the aggregation mode to ``(N,)`` per-token losses (0 on invalid tokens)."""
    if batch.loss_agg_mode == "none":
        return token_loss.reshape(batch.token_shape)
    return torch.dot(token_loss, batch.weights)


def make_stats(batch: TokenBatch, logprobs, probs, entropy):
    from gft_kernels.stats import GFTStats

    # The kernels' DCR comparison: probs in the accumulate dtype against tau rounded to it
    # (a tensor-scalar comparison), so a token is reported rectified iff it took c = q.
    rectified = (batch.valid & (probs <= batch.params.tau)).sum()
    fraction = rectified.to(probs.dtype) / batch.valid.sum().clamp_min(1).to(probs.dtype)
    shape = batch.token_shape
    return GFTStats(
        logprobs=logprobs.detach().reshape(shape),
        probs=probs.detach().reshape(shape),
        entropy=entropy.detach().reshape(shape),
        rectified_fraction=fraction.detach(),
    )
