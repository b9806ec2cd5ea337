"""Custom per-token objectives on any backend: the seam for a loss variant.

An :class:`Objective` maps per-token ``log p``, ``q``, advantages and its own per-token
tensors to ``(loss, scale)``, with ``scale = -d loss / d log p``, in plain PyTorch.
:func:`objective_loss` runs one end to end on any registered backend through three steps
that touch no kernel: the row statistics (``RowBackend.partial_stats``), the objective
(:func:`~gft_kernels.backends.token_terms.token_pass_from_statistics`) and the row gradient
(``RowBackend.row_grad``, which multiplies ``scale``). The built-in :class:`GFT` keeps its
fused kernels (:func:`gft_kernels.gft_loss`); a variant starts here, checked against its
naive formula, and moves into the kernels once measured (``docs/loss_variants.md``).
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from gft_kernels import _checks
from gft_kernels._prepare import TokenBatch, make_stats, prepare_tokens, reduce_loss
from gft_kernels.backends import RowBackend, RowParams, load_backend
from gft_kernels.backends.base import TokenInputs, TokenPassCall
from gft_kernels.backends.token_terms import (
    GFT,
    Objective,
    ObjectiveInputs,
    dcr_coefficient,
    token_pass_from_statistics,
)
from gft_kernels.backends.torch_rows import accumulate_dtype
from gft_kernels.loss import gft_loss
from gft_kernels.stats import GFTStats

__all__ = ["GFT", "Objective", "ObjectiveInputs", "dcr_coefficient", "objective_loss"]

# Keywords of gft_loss the seam does not implement, with the only value it accepts.
_NOT_IMPLEMENTED = {"inplace_backward": False, "process_group": None}


def _loss_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """``options`` completed with ``gft_loss``'s defaults (its signature is their one
    source); a keyword ``gft_loss`` does not take, or one the seam does not implement, is
    refused."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(gft_loss).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    for name, value in options.items():
        if name not in defaults:
            raise TypeError(
                f"objective_loss() got an unexpected keyword argument {name!r} (it takes "
                f"objective, extra and the keywords of gft_loss: {', '.join(defaults)})"
            )
        if name in _NOT_IMPLEMENTED and value is not _NOT_IMPLEMENTED[name]:
            raise ValueError(
                f"{name}: not implemented for a custom objective (objective_loss), got "
                f"{value!r}; gft_loss implements it for the built-in GFT objective"
            )
    merged = {**defaults, **options}
    for name in _NOT_IMPLEMENTED:
        del merged[name]
    return merged


def _flat_extra(
    extra: Optional[Mapping[str, Tensor]], objective: Objective, batch: TokenBatch, logits: Tensor
) -> Dict[str, Tensor]:
    """The objective's extra per-token tensors, checked and flattened to ``(N,)`` in the
    accumulate dtype (detached: they are constants of the loss)."""
    given = {} if extra is None else extra
    if not isinstance(given, Mapping):
        raise TypeError(
            f"extra: expected a mapping of names to per-token tensors, got {type(extra).__name__}"
        )
    wanted = tuple(objective.extra_inputs)
    if set(given) != set(wanted):
        raise ValueError(
            f"extra: {type(objective).__name__} reads {list(wanted)}, got {sorted(given)}"
        )
    shape = tuple(batch.token_shape)
    flat = {}
    for name in wanted:
        arg = f"extra[{name!r}]"
        value = _checks.check_float_tensor(arg, given[name], dims=(len(shape),))
        if tuple(value.shape) != shape:
            raise ValueError(f"{arg}: expected shape {shape} (like targets), got {value.shape}")
        if value.device != logits.device:
            raise ValueError(f"{arg}: expected a tensor on {logits.device}, got {value.device}")
        flat[name] = value.detach().reshape(-1).to(accumulate_dtype(logits.dtype)).contiguous()
    return flat


def _checked_terms(objective: Objective, loss: Any, scale: Any, like: Tensor) -> Tuple[Tensor, ...]:
    """The objective's ``(loss, scale)``, each ``(N,)`` float, in ``like``'s dtype."""
    for what, value in (("loss", loss), ("scale", scale)):
        if not (
            isinstance(value, Tensor) and value.is_floating_point() and value.shape == like.shape
        ):
            got = value.shape if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"objective: {type(objective).__name__} must return (loss, scale), two float "
                f"tensors of shape {tuple(like.shape)}; its {what} is {got}"
            )
    return loss.to(like.dtype).contiguous(), scale.to(like.dtype).contiguous()


class _ObjectiveLoss(torch.autograd.Function):
    """Per-token losses of a custom objective; backward: one ``row_grad`` launch."""

    @staticmethod
    def forward(
        ctx,
        logits: Tensor,
        rows: RowBackend,
        tokens: TokenInputs,
        params: RowParams,
        with_stats: bool,
        objective: Objective,
        extra: Dict[str, Tensor],
    ):
        call = TokenPassCall(logits, tokens, params, with_stats)
        out, local = token_pass_from_statistics(
            rows, call, host_checks=False, objective=objective, extra=extra
        )
        loss, scale = _checked_terms(objective, out.loss, out.scale, out.row_max)
        ctx.rows, ctx.params = rows, params
        ctx.save_for_backward(logits, local, out.row_max, out.sum_exp, scale)
        entropy = out.entropy if out.entropy is not None else loss.new_empty(0)
        ctx.mark_non_differentiable(out.logprobs, out.probs, entropy)
        return loss, out.logprobs, out.probs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, *_unused: Tensor):
        logits, local, row_max, sum_exp, scale = ctx.saved_tensors
        out = torch.empty_like(logits, memory_format=torch.contiguous_format)
        grad = ctx.rows.row_grad(
            logits, local, row_max, sum_exp, grad_loss.contiguous(), scale, ctx.params, out
        )
        return (grad,) + (None,) * (len(ctx.needs_input_grad) - 1)


def objective_loss(
    logits: Tensor,
    targets: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor] = None,
    *,
    objective: Objective,
    extra: Optional[Mapping[str, Tensor]] = None,
    **options: Any,
) -> Union[Tensor, Tuple[Tensor, GFTStats]]:
    """The loss of a custom per-token ``objective`` over logits, on any backend.

    Args:
        logits, targets, advantages, mask: as in :func:`gft_kernels.gft_loss`.
        objective: an :class:`Objective` (``GFT()`` gives ``gft_loss``'s loss and
            gradient, through the seam instead of the fused kernels).
        extra: the objective's per-token tensors, one per name in
            ``objective.extra_inputs``, each shaped like ``targets`` (float, on the
            logits' device; treated as constants).
        **options: the keywords of :func:`gft_kernels.gft_loss` (``tau``,
            ``temperature``, ``loss_agg_mode``, ``backend``, ...), with its defaults;
            ``inplace_backward`` and ``process_group`` are not implemented here.

    Returns:
        The aggregated loss (fp32, fp64 for fp64 logits; per token for ``none``), and a
        :class:`GFTStats` with ``return_stats=True``. Its gradient reaches ``logits``
        only, once (a double backward raises).
    """
    if not isinstance(objective, Objective):
        raise TypeError(
            "objective: expected a gft_kernels.objective.Objective (e.g. GFT()), got "
            f"{type(objective).__name__}"
        )
    _checks.check_float_tensor("logits", logits, dims=(2, 3))
    _checks.check_nonempty("logits", logits, "token and one vocabulary entry")
    opts = _loss_options(options)
    batch = prepare_tokens(logits, targets, advantages, mask, **opts)
    flat_extra = _flat_extra(extra, objective, batch, logits)
    logits_2d = logits.reshape(-1, logits.shape[-1])
    if logits_2d.stride(-1) != 1:
        logits_2d = logits_2d.contiguous()
    tokens = TokenInputs(batch.targets, batch.advantages, batch.mask, batch.tokens_per_advantage)
    loss_t, logprobs, probs, entropy = _ObjectiveLoss.apply(
        logits_2d,
        load_backend(batch.backend),
        tokens,
        batch.params,
        opts["return_stats"],
        objective,
        flat_extra,
    )
    loss = reduce_loss(loss_t, batch)
    if not opts["return_stats"]:
        return loss
    return loss, make_stats(batch, logprobs, probs, entropy)
