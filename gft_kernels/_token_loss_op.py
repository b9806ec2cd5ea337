"""The logits-level GFT loss as PyTorch custom ops, with its autograd formula.

``gft_kernels::token_loss`` runs one fused row pass (any backend) and returns the
per-token losses with the O(N) row summary the backward needs; the backward is one more
launch (``token_loss_backward`` into a new buffer, or ``token_loss_backward_`` into the
logits' own storage), which reads each row once and writes its gradient once: the two
passes of the physical floor, with no host synchronisation in between. Registered with
``torch.library``, the ops are opaque to ``torch.compile``, which traces through them.

The vocab-parallel path (``process_group``) is a plain autograd Function: it needs
collectives between the statistics and the token terms.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from gft_kernels._vocab_parallel import VocabShard, sharded_token_pass
from gft_kernels.backends import RowParams, load_backend
from gft_kernels.backends.torch_rows import accumulate_dtype

_Outputs = Tuple[torch.Tensor, ...]


def _params(tau, temperature, logit_scale, logit_softcap, ignore_index) -> RowParams:
    return RowParams(tau, temperature, logit_scale, logit_softcap, ignore_index)


@torch.library.custom_op("gft_kernels::token_loss", mutates_args=())
def token_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor],
    tokens_per_advantage: int,
    tau: float,
    temperature: float,
    logit_scale: float,
    logit_softcap: Optional[float],
    ignore_index: int,
    with_stats: bool,
    backend: str,
    inplace_backward: bool,
) -> Tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """Per-token ``(loss, logprobs, probs, entropy, row_max, sum_exp, scale)``, each
    ``(N,)`` (``entropy`` is empty unless ``with_stats``); see ``RowBackend.token_pass``."""
    rows = load_backend(backend)
    params = _params(tau, temperature, logit_scale, logit_softcap, ignore_index)
    out = rows.token_pass(
        logits,
        targets,
        advantages,
        mask,
        params,
        tokens_per_advantage=tokens_per_advantage,
        with_stats=with_stats,
    )
    entropy = out.entropy if out.entropy is not None else out.loss.new_empty(0)
    return out.loss, out.logprobs, out.probs, entropy, out.row_max, out.sum_exp, out.scale


@token_loss.register_fake
def _(
    logits,
    targets,
    advantages,
    mask,
    tokens_per_advantage,
    tau,
    temperature,
    logit_scale,
    logit_softcap,
    ignore_index,
    with_stats,
    backend,
    inplace_backward,
):
    n_rows = logits.shape[0]
    acc = accumulate_dtype(logits.dtype)
    vec = [logits.new_empty(n_rows, dtype=acc) for _ in range(7)]
    vec[3] = logits.new_empty(n_rows if with_stats else 0, dtype=acc)
    return tuple(vec)


@torch.library.custom_op("gft_kernels::token_loss_backward", mutates_args=())
def token_loss_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    sum_exp: torch.Tensor,
    grad_loss: torch.Tensor,
    scale: torch.Tensor,
    temperature: float,
    logit_scale: float,
    logit_softcap: Optional[float],
    backend: str,
) -> torch.Tensor:
    """``d(sum_t g_t l_t) / d logits`` into a new ``(N, V)`` buffer (logits' dtype)."""
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    params = _params(0.0, temperature, logit_scale, logit_softcap, -100)
    return load_backend(backend).row_grad(
        logits, targets, row_max, sum_exp, grad_loss, scale, params, out
    )


@token_loss_backward.register_fake
def _(
    logits,
    targets,
    row_max,
    sum_exp,
    grad_loss,
    scale,
    temperature,
    logit_scale,
    logit_softcap,
    backend,
):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("gft_kernels::token_loss_backward_", mutates_args=("logits",))
def token_loss_backward_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    row_max: torch.Tensor,
    sum_exp: torch.Tensor,
    grad_loss: torch.Tensor,
    scale: torch.Tensor,
    temperature: float,
    logit_scale: float,
    logit_softcap: Optional[float],
    backend: str,
) -> None:
    """The same gradient written over the logits themselves (in place)."""
    params = _params(0.0, temperature, logit_scale, logit_softcap, -100)
    load_backend(backend).row_grad(
        logits, targets, row_max, sum_exp, grad_loss, scale, params, logits
    )


@token_loss_backward_.register_fake
def _(
    logits,
    targets,
    row_max,
    sum_exp,
    grad_loss,
    scale,
    temperature,
    logit_scale,
    logit_softcap,
    backend,
):
    return None


NOT_TWICE_DIFFERENTIABLE = (
    "gft_kernels: the GFT loss is not twice differentiable (its gradient comes from a "
    "fused kernel); a double backward / create_graph=True through it is not supported"
)


def once_differentiable(grads: _Outputs) -> _Outputs:
    """With ``create_graph=True`` the gradients get a node that raises a clear error if
    anything differentiates through them (instead of silently treating them as
    constants, which would drop e.g. a gradient penalty)."""
    if not torch.is_grad_enabled():
        return grads
    present = [g for g in grads if g is not None]
    error = torch._C._functions.DelayedError(NOT_TWICE_DIFFERENTIABLE.encode(), len(present))
    wrapped = error(*[g.detach().requires_grad_() for g in present])
    wrapped = iter(wrapped if isinstance(wrapped, tuple) else (wrapped,))
    return tuple(next(wrapped) if g is not None else None for g in grads)


def _setup(ctx, inputs, output) -> None:
    logits, targets = inputs[0], inputs[1]
    temperature, logit_scale, logit_softcap = inputs[6], inputs[7], inputs[8]
    backend, inplace = inputs[11], inputs[12]
    row_max, sum_exp, scale = output[4], output[5], output[6]
    ctx.options = (temperature, logit_scale, logit_softcap, backend)
    ctx.inplace = inplace
    if inplace:
        # Held directly, not as a saved tensor, so that a second use is refused with a
        # clear message instead of autograd's generic one (see _backward).
        ctx.logits = logits
        ctx.logits_version = logits._version
        ctx.save_for_backward(targets, row_max, sum_exp, scale)
    else:
        ctx.save_for_backward(logits, targets, row_max, sum_exp, scale)


INPLACE_REUSED = (
    "gft_loss(inplace_backward=True): the logits were overwritten by an earlier backward "
    "through this loss, or modified in place after it was computed; an in-place backward "
    "can run once (use inplace_backward=False to backward twice or to keep the logits)"
)


def _backward(ctx, grad_loss, *_unused):
    if ctx.inplace:
        logits = ctx.logits
        if logits._version != ctx.logits_version:
            raise RuntimeError(INPLACE_REUSED)
        targets, row_max, sum_exp, scale = ctx.saved_tensors
        with torch.no_grad():
            token_loss_backward_(
                logits, targets, row_max, sum_exp, grad_loss.contiguous(), scale, *ctx.options
            )
        grad = logits
    else:
        logits, targets, row_max, sum_exp, scale = ctx.saved_tensors
        with torch.no_grad():
            grad = token_loss_backward(
                logits, targets, row_max, sum_exp, grad_loss.contiguous(), scale, *ctx.options
            )
    (grad,) = once_differentiable((grad,))
    return (grad,) + (None,) * 12


token_loss.register_autograd(_backward, setup_context=_setup)


class ShardedTokenLoss(torch.autograd.Function):
    """Vocab-parallel token losses (eager only): ``logits`` is this rank's block."""

    @staticmethod
    def forward(
        ctx,
        logits,
        targets,
        advantages,
        mask,
        tokens_per_advantage,
        params,
        with_stats,
        backend,
        inplace_backward,
        shard: VocabShard,
    ):
        rows = load_backend(backend)
        out, local = sharded_token_pass(
            rows,
            logits,
            targets,
            advantages,
            mask,
            params,
            tokens_per_advantage=tokens_per_advantage,
            with_stats=with_stats,
            shard=shard,
        )
        ctx.rows, ctx.params, ctx.inplace = rows, params, inplace_backward
        ctx.save_for_backward(logits, local, out.row_max, out.sum_exp, out.scale)
        entropy = out.entropy if out.entropy is not None else out.loss.new_empty(0)
        ctx.mark_non_differentiable(out.logprobs, out.probs, entropy)
        return out.loss, out.logprobs, out.probs, entropy

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        logits, local, row_max, sum_exp, scale = ctx.saved_tensors
        with torch.no_grad():
            out = logits if ctx.inplace else torch.empty_like(logits)
            grad = ctx.rows.row_grad(
                logits, local, row_max, sum_exp, grad_loss.contiguous(), scale, ctx.params, out
            )
            if ctx.inplace:
                torch.autograd.graph.increment_version(logits)
        (grad,) = once_differentiable((grad,))
        return (grad,) + (None,) * 9
