"""Argument checks shared by every public entry point.

Every check runs once, in Python, before any kernel launches, and raises a ValueError or
TypeError naming the argument, what was expected and what was given.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from gft_kernels._options import LOSS_AGG_MODES, SEQ_MODES, check_int
from gft_kernels._options import check_real as check_scalar

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
    """A count ``>= 0`` given as a number, or as a 1-element tensor (e.g. an all-reduced
    token count) whose value is not read here, so that passing it costs no host sync.

    0 is allowed: a batch with nothing to train may count 0 tokens (``0 / 0`` is then 0,
    see :func:`gft_kernels.aggregation.aggregation_weights`)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        if value.dtype == torch.bool:
            raise TypeError(f"{name}: expected a number or a numeric tensor, got {value.dtype}")
        return value.reshape(())
    return check_scalar(name, value, minimum=0.0, inclusive=True)


def min_temperature(compute_dtype: torch.dtype) -> float:
    """The smallest temperature the kernels take in ``compute_dtype`` arithmetic: its
    smallest normal number, so that ``1 / T`` is finite (below it, ``1 / T`` overflows
    and ``0 * inf`` turns the loss into NaN)."""
    return torch.finfo(compute_dtype).tiny


def check_temperature(temperature: float, compute_dtype: torch.dtype) -> None:
    """``temperature`` (already checked ``> 0`` and finite) against the arithmetic's range."""
    floor = min_temperature(compute_dtype)
    if temperature < floor:
        precision = str(compute_dtype).replace("torch.", "")
        inputs = "float64" if compute_dtype == torch.float64 else "float32/bfloat16/float16"
        raise ValueError(
            f"temperature: expected a value >= {floor!r} ({precision}'s smallest normal "
            f"number: 1 / temperature is computed in {precision} for {inputs} input), got "
            f"{temperature!r}"
        )


def check_ignore_index(ignore_index: object, targets_dtype: Optional[torch.dtype] = None) -> int:
    """An int (bools refused) and, given the targets' dtype, a value the targets can hold:
    outside their range a comparison would wrap it (an int32 copy of -2**32 - 100 is -100)
    on some backends and never match on others."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if targets_dtype is None:
        return ignore_index
    info = torch.iinfo(targets_dtype)
    if not info.min <= ignore_index <= info.max:
        kind = str(targets_dtype).replace("torch.", "")
        raise ValueError(
            f"ignore_index: expected an int in [{info.min}, {info.max}] (the range of "
            f"{kind} targets), got {ignore_index}"
        )
    return ignore_index


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


def rows_overlap(rows: torch.Tensor) -> bool:
    """Whether two rows of an ``(N, V)`` tensor with a unit last stride share memory.

    Row ``i`` covers offsets ``[i r, i r + V)`` for the row stride ``r >= 0``, so rows are
    disjoint exactly when ``r >= V`` (or there is one row). Plain comparisons of sizes and
    strides: under ``torch.compile`` they are static ints or guarded SymInts, never data.
    """
    n_rows, n_cols = rows.shape
    return n_rows > 1 and rows.stride(0) < n_cols


def check_inplace_logits(logits: torch.Tensor, rows: torch.Tensor) -> None:
    """An in-place backward overwrites the logits: refuse it where that cannot be right.

    ``rows`` is the ``(N, V)`` tensor the kernels read and the backward overwrites: a
    view of ``logits`` when one exists, else a private copy (e.g. ``logits[:, :-1]`` of a
    3-D batch, whose rows cannot be addressed with one stride), which cannot overlap.
    """
    if not logits.requires_grad:
        raise ValueError(
            "inplace_backward: expected logits that require grad (the backward writes their "
            "gradient over them), got logits with requires_grad=False"
        )
    if rows_overlap(rows):
        raise ValueError(
            "inplace_backward: expected logits whose elements do not share memory, got "
            f"strides {tuple(logits.stride())} for shape {tuple(logits.shape)} (e.g. an "
            "expanded tensor); pass a contiguous copy or use inplace_backward=False"
        )


FUNCTION_TRANSFORMS = (
    "{entry}: torch.func transforms that differentiate (grad, vjp, jacrev, jvp, jacfwd, "
    "hessian) and forward-mode AD are not supported: the loss's gradient comes from a "
    "fused kernel with a reverse-mode autograd formula only. Use loss.backward() or "
    "torch.autograd.grad (for per-token losses, loss_agg_mode='none'); torch.func.vmap "
    "alone works (one call per example)"
)

INPLACE_UNDER_VMAP = (
    "{entry}: inplace_backward=True is not supported under torch.func.vmap (each example "
    "is a view of the batch); use inplace_backward=False"
)


def _functorch_layers(value: object) -> set:
    from torch._C import _functorch

    kinds = set()
    while isinstance(value, torch.Tensor) and _functorch.is_functorch_wrapped_tensor(value):
        if _functorch.is_batchedtensor(value):
            kinds.add("vmap")
        elif _functorch.is_gradtrackingtensor(value):
            kinds.add("grad")
        value = _functorch.get_unwrapped(value)
    return kinds


def check_no_function_transform(
    entry: str, tensors: Sequence[object], inplace_backward: bool = False
) -> None:
    """Refuse torch.func transforms that would otherwise fail deep inside PyTorch (``grad``:
    a message about ``setup_context``) or be silently wrong (``jvp``: a zero tangent).

    Only eager calls are inspected: torch.compile traces plain tensors.
    """
    if torch.compiler.is_compiling():
        return
    from torch.autograd import forward_ad

    kinds = set()
    for t in tensors:
        kinds |= _functorch_layers(t)
    # The dual level is private API; without it, no forward-mode AD is assumed.
    dual = getattr(forward_ad, "_current_level", -1) >= 0 and any(
        isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None
        for t in tensors
    )
    if "grad" in kinds or dual:
        raise RuntimeError(FUNCTION_TRANSFORMS.format(entry=entry))
    if "vmap" in kinds and inplace_backward:
        raise RuntimeError(INPLACE_UNDER_VMAP.format(entry=entry))
