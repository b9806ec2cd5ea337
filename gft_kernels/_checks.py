"""Argument checks shared by every public entry point.

Every check runs once, in Python, before any kernel launches, and raises a ValueError or
TypeError naming the argument, what was expected and what was given.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from gft_kernels.options import LOSS_AGG_MODES, SEQ_MODES, check_int
from gft_kernels.options import check_real as check_scalar

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_tensor(
    name: str, value: object, dims: Sequence[int], dtypes: Sequence[torch.dtype] = FLOAT_DTYPES
) -> torch.Tensor:
    value = check_tensor(name, value)
    if value.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name}: expected a {want} tensor, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        want = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {want}, got {value.dtype}")
    return value


def check_nonempty(name: str, value: torch.Tensor, what: str) -> None:
    if value.numel() == 0:
        raise ValueError(f"{name}: expected at least one {what}, got shape {tuple(value.shape)}")


def check_mode(loss_agg_mode: object, token_dims: int) -> str:
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(
            f"loss_agg_mode: expected one of {', '.join(LOSS_AGG_MODES)}, got {loss_agg_mode!r}"
        )
    if loss_agg_mode in SEQ_MODES and token_dims != 2:
        raise ValueError(
            f"loss_agg_mode: {loss_agg_mode!r} needs (B, T)-shaped tokens (3-D logits or "
            f"hidden), got {token_dims + 1}-D input ({token_dims}-D targets); use 'token-mean' "
            "or reshape to (B, T, ...)"
        )
    return loss_agg_mode


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def check_positive_int(name: str, value: object) -> int:
    return check_int(name, value, minimum=1)


def check_count_or_tensor(name: str, value: object):
    """A positive count given as a number, or as a 1-element tensor (e.g. an all-reduced
    token count) whose value is not read here, so that passing it costs no host sync."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        if value.dtype == torch.bool:
            raise TypeError(f"{name}: expected a number or a numeric tensor, got {value.dtype}")
        return value.reshape(())
    return check_scalar(name, value, minimum=0.0, inclusive=False)


TARGET_DTYPES = (torch.int64, torch.int32)


def check_token_inputs(
    targets: object,
    advantages: object,
    mask: Optional[object],
    token_shape: torch.Size,
    device: torch.device,
) -> None:
    """Static checks of targets/advantages/mask against the leading (token) shape.

    Values (target range, mask 0/1, finite advantages) are checked by the row kernels,
    which see the data anyway, so that no check synchronises with the device.
    """
    targets = check_tensor("targets", targets)
    if targets.dtype not in TARGET_DTYPES:
        narrow = not (targets.dtype.is_floating_point or targets.dtype == torch.bool)
        raise TypeError(
            f"targets: expected an integer tensor of dtype int64 or int32, got {targets.dtype}"
            + (" (narrower integers can wrap around ignore_index)" if narrow else "")
        )
    if tuple(targets.shape) != tuple(token_shape):
        raise ValueError(
            f"targets: expected shape {tuple(token_shape)} (the leading dims of the input), "
            f"got {tuple(targets.shape)}"
        )
    if targets.device != device:
        raise ValueError(f"targets: expected device {device}, got {targets.device}")

    advantages = check_tensor("advantages", advantages)
    if not advantages.dtype.is_floating_point:
        raise TypeError(f"advantages: expected a floating tensor, got {advantages.dtype}")
    per_seq = len(token_shape) == 2 and tuple(advantages.shape) == (token_shape[0],)
    if not per_seq and tuple(advantages.shape) != tuple(token_shape):
        want = (
            f"({token_shape[0]},) or {tuple(token_shape)}"
            if len(token_shape) == 2
            else (f"{tuple(token_shape)}")
        )
        raise ValueError(f"advantages: expected shape {want}, got {tuple(advantages.shape)}")
    if advantages.device != device:
        raise ValueError(f"advantages: expected device {device}, got {advantages.device}")

    if mask is not None:
        mask = check_tensor("mask", mask)
        if tuple(mask.shape) != tuple(token_shape):
            raise ValueError(f"mask: expected shape {tuple(token_shape)}, got {tuple(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"mask: expected device {device}, got {mask.device}")
        if mask.is_complex():
            raise TypeError(f"mask: expected a bool, integer or float tensor, got {mask.dtype}")


def check_inplace_logits(logits: torch.Tensor) -> None:
    """An in-place backward overwrites the logits: refuse it where that cannot be right."""
    if not logits.requires_grad:
        raise ValueError(
            "inplace_backward: expected logits that require grad (the backward writes their "
            "gradient over them), got logits with requires_grad=False"
        )
    if torch._debug_has_internal_overlap(logits) != 0:
        raise ValueError(
            "inplace_backward: expected logits whose elements do not share memory, got "
            f"strides {tuple(logits.stride())} for shape {tuple(logits.shape)} (e.g. an "
            "expanded tensor); pass a contiguous copy or use inplace_backward=False"
        )
