"""``fused_linear_gft_loss``: the GFT loss straight from hidden states and the lm_head.

The ``N x V`` logits never exist (see :mod:`gft_kernels._head`). For reduced modes the
gradients are computed during the forward (three matmuls in all, the minimum) and the
backward only scales them by the upstream scalar, on the device (no host sync); for
``none`` the upstream gradient is per token, so the backward recomputes.

Tokens that cannot contribute (mask 0, ignore_index, advantage exactly 0) are dropped
before the first matmul (``compact_tokens``, when no stats are requested): the cost
follows the contributing tokens, at the price of one host synchronisation (the count of
kept tokens). The aggregation weights are computed on the full batch first, so the
denominators do not change.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from gft_kernels import _checks
from gft_kernels._head import HEAD_STRATEGIES, HeadInputs, must_not_sync
from gft_kernels._prepare import make_stats, prepare_tokens
from gft_kernels._token_loss_op import once_differentiable
from gft_kernels._vocab_parallel import VocabShard, vocab_shard
from gft_kernels.backends import RowParams, load_backend
from gft_kernels.backends.torch_rows import accumulate_dtype
from gft_kernels.stats import GFTStats


def _or_empty(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else like.new_empty(0)


def _run_head(
    hidden,
    weight,
    bias,
    targets,
    advantages,
    mask,
    grad_weights,
    tokens_per_advantage,
    params: RowParams,
    with_stats,
    need_grads,
    compact,
    chunk_size,
    backend,
    head,
    shard: Optional[VocabShard] = None,
):
    inputs = HeadInputs(
        hidden, weight, bias, targets, advantages, tokens_per_advantage, mask, params
    )
    return HEAD_STRATEGIES[head](
        load_backend(backend),
        inputs,
        grad_weights=grad_weights,
        need_grads=need_grads,
        with_stats=with_stats,
        compact=compact,
        chunk_size=chunk_size,
        shard=shard,
    )


def _finish_grads(out, weight, bias):
    """dW/db were accumulated in fp32: hand them over in the parameters' dtypes.

    Every gradient leaves contiguous, the layout the ops' fake implementations promise
    whatever the head strategy and the inputs' strides (a ``(H, V)`` parameter passed as
    ``.t()``, a column-sliced hidden): a fake that guessed ``empty_like`` of a transposed
    weight would disagree with the real op, and torch.compile would trust the fake.
    """
    grad_w = out.grad_weight
    if grad_w is not None and grad_w.dtype != weight.dtype:
        grad_w = grad_w.to(weight.dtype)
    grad_b = out.grad_bias
    if grad_b is not None and grad_b.dtype != bias.dtype:
        grad_b = grad_b.to(bias.dtype)
    return tuple(None if g is None else g.contiguous() for g in (out.grad_hidden, grad_w, grad_b))


def _dense_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor shaped like ``t``: the layout :func:`_finish_grads` returns."""
    return t.new_empty(t.shape)


@torch.library.custom_op("gft_kernels::fused_linear_loss", mutates_args=())
def fused_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
    tokens_per_advantage: int,
    tau: float,
    temperature: float,
    logit_scale: float,
    logit_softcap: Optional[float],
    ignore_index: int,
    with_stats: bool,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    compact: bool,
    chunk_size: int,
    backend: str,
    head: str,
) -> Tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """``(loss, logprobs, probs, entropy, grad_hidden, grad_weight, grad_bias)``.

    With aggregation ``weights`` (``(N,)``) the loss is the 0-dim ``sum(w * l)`` and the
    gradients asked for are computed in the same pass; without, the loss is per token
    ``(N,)`` and no gradient is computed. Unused outputs are empty tensors.
    """
    params = RowParams(tau, temperature, logit_scale, logit_softcap, ignore_index)
    out = _run_head(
        hidden,
        weight,
        bias,
        targets,
        advantages,
        mask,
        weights,
        tokens_per_advantage,
        params,
        with_stats,
        (need_grad_hidden, need_grad_weight, need_grad_bias),
        compact,
        chunk_size or None,
        backend,
        head,
    )
    loss = out.loss if weights is None else torch.dot(out.loss, weights)
    grad_h, grad_w, grad_b = _finish_grads(out, weight, bias)
    return (
        loss,
        out.logprobs,
        out.probs,
        _or_empty(out.entropy, out.loss),
        _or_empty(grad_h, hidden),
        _or_empty(grad_w, weight),
        _or_empty(grad_b, weight),
    )


@fused_linear_loss.register_fake
def _(
    hidden,
    weight,
    bias,
    targets,
    advantages,
    mask,
    weights,
    tokens_per_advantage,
    tau,
    temperature,
    logit_scale,
    logit_softcap,
    ignore_index,
    with_stats,
    need_grad_hidden,
    need_grad_weight,
    need_grad_bias,
    compact,
    chunk_size,
    backend,
    head,
):
    n_tokens = hidden.shape[0]
    acc = accumulate_dtype(hidden.dtype)
    vec = lambda n: hidden.new_empty(n, dtype=acc)  # noqa: E731
    reduced = weights is not None
    grads = reduced and (need_grad_hidden or need_grad_weight or need_grad_bias)
    return (
        vec(()) if reduced else vec(n_tokens),
        vec(n_tokens),
        vec(n_tokens),
        vec(n_tokens if with_stats else 0),
        _dense_like(hidden) if grads and need_grad_hidden else hidden.new_empty(0),
        _dense_like(weight) if grads and need_grad_weight else weight.new_empty(0),
        _dense_like(bias) if grads and need_grad_bias and bias is not None else weight.new_empty(0),
    )


@torch.library.custom_op("gft_kernels::fused_linear_loss_backward", mutates_args=())
def fused_linear_loss_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor],
    grad_tokens: torch.Tensor,
    tokens_per_advantage: int,
    tau: float,
    temperature: float,
    logit_scale: float,
    logit_softcap: Optional[float],
    ignore_index: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    compact: bool,
    chunk_size: int,
    backend: str,
    head: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_t g_t l_t`` for per-token upstream gradients ``g`` (``none``);
    ``compact`` is the forward's choice, so that ``compact_tokens=False`` stays sync-free
    through the backward too."""
    params = RowParams(tau, temperature, logit_scale, logit_softcap, ignore_index)
    out = _run_head(
        hidden,
        weight,
        bias,
        targets,
        advantages,
        mask,
        grad_tokens,
        tokens_per_advantage,
        params,
        False,
        (need_grad_hidden, need_grad_weight, need_grad_bias),
        compact,
        chunk_size or None,
        backend,
        head,
    )
    grad_h, grad_w, grad_b = _finish_grads(out, weight, bias)
    return _or_empty(grad_h, hidden), _or_empty(grad_w, weight), _or_empty(grad_b, weight)


@fused_linear_loss_backward.register_fake
def _(
    hidden,
    weight,
    bias,
    targets,
    advantages,
    mask,
    grad_tokens,
    tokens_per_advantage,
    tau,
    temperature,
    logit_scale,
    logit_softcap,
    ignore_index,
    need_grad_hidden,
    need_grad_weight,
    need_grad_bias,
    compact,
    chunk_size,
    backend,
    head,
):
    return (
        _dense_like(hidden) if need_grad_hidden else hidden.new_empty(0),
        _dense_like(weight) if need_grad_weight else weight.new_empty(0),
        _dense_like(bias) if need_grad_bias and bias is not None else weight.new_empty(0),
    )


SECOND_BACKWARD = (
    "fused_linear_gft_loss: a second backward through the same graph; the gradients "
    "computed in the forward were handed to the first one (recompute the loss instead of "
    "using retain_graph=True)"
)


def _setup(ctx, inputs, output) -> None:
    (
        hidden,
        weight,
        bias,
        targets,
        advantages,
        mask,
        weights,
        tokens_per_advantage,
        tau,
        temperature,
        logit_scale,
        logit_softcap,
        ignore_index,
        with_stats,
        need_h,
        need_w,
        need_b,
        compact,
        chunk_size,
        backend,
        head,
    ) = inputs
    ctx.reduced = weights is not None
    ctx.has_bias = bias is not None
    ctx.used = False
    # Only the loss is differentiated; without this autograd would hand the backward a
    # zero-filled gradient for every other output, dW's V x H buffer included (a 1 GB
    # fill at V = 128256, H = 2048).
    ctx.set_materialize_grads(False)
    if ctx.reduced:
        ctx.save_for_backward(output[4], output[5], output[6])
    else:
        ctx.save_for_backward(hidden, weight, bias, targets, advantages, mask)
        ctx.options = (
            tokens_per_advantage,
            tau,
            temperature,
            logit_scale,
            logit_softcap,
            ignore_index,
        )
        ctx.run = (compact, chunk_size, backend, head)


# Inputs of the op after hidden, weight and bias (none of them differentiable).
_OTHER_INPUTS = 18
# Inputs of ShardedFusedLinear.forward after hidden, weight and bias.
_SHARDED_OTHER_INPUTS = 12


def _backward(ctx, grad_loss, *_unused):
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_loss is None:  # only outputs other than the loss reached the backward
        return (None,) * (3 + _OTHER_INPUTS)
    if ctx.reduced:
        if ctx.used:
            raise RuntimeError(SECOND_BACKWARD)
        ctx.used = True
        saved = ctx.saved_tensors
        # The upstream scalar scales the precomputed gradients in place, on the device:
        # no host sync and no second V x H buffer. A traced backward (torch.compile,
        # opcheck: functional or fake tensors) scales out of place instead: there the
        # gradients are also outputs of the forward graph, which a backward may not
        # mutate, and the compiler reuses the buffer by itself.
        eager = all(type(g) is torch.Tensor for g in saved)
        with torch.no_grad():
            grads = tuple(
                (g.mul_(grad_loss.to(g.dtype)) if eager else g * grad_loss.to(g.dtype))
                if need and g.numel()
                else None
                for g, need in zip(saved, (need_h, need_w, need_b))
            )
    else:
        hidden, weight, bias, targets, advantages, mask = ctx.saved_tensors
        with torch.no_grad():
            grads = fused_linear_loss_backward(
                hidden,
                weight,
                bias,
                targets,
                advantages,
                mask,
                grad_loss.to(accumulate_dtype(hidden.dtype)).contiguous(),
                *ctx.options,
                need_h,
                need_w,
                need_b and ctx.has_bias,
                *ctx.run,
            )
        grads = tuple(
            g if need and g.numel() else None for g, need in zip(grads, (need_h, need_w, need_b))
        )
    grads = once_differentiable(grads)
    return grads + (None,) * _OTHER_INPUTS


fused_linear_loss.register_autograd(_backward, setup_context=_setup)


class ShardedFusedLinear(torch.autograd.Function):
    """Vocab-parallel fused head (eager only): ``weight``/``bias`` hold this rank's rows."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        targets,
        advantages,
        mask,
        weights,
        tokens_per_advantage,
        params,
        with_stats,
        compact,
        chunk_size,
        backend,
        head,
        shard,
    ):
        need = ctx.needs_input_grad[:3]
        reduced = weights is not None
        out = _run_head(
            hidden,
            weight,
            bias,
            targets,
            advantages,
            mask,
            weights if reduced else None,
            tokens_per_advantage,
            params,
            with_stats,
            need if reduced else (False,) * 3,
            compact,
            chunk_size,
            backend,
            head,
            shard,
        )
        ctx.reduced = reduced
        ctx.used = False
        if reduced:
            ctx.save_for_backward(*_finish_grads(out, weight, bias))
            loss = torch.dot(out.loss, weights)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, advantages, mask)
            ctx.rest = (tokens_per_advantage, params, compact, chunk_size, backend, head, shard)
            loss = out.loss
        entropy = _or_empty(out.entropy, out.loss)
        ctx.mark_non_differentiable(out.logprobs, out.probs, entropy)
        return loss, out.logprobs, out.probs, entropy

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        need = ctx.needs_input_grad[:3]
        if ctx.reduced:
            if ctx.used:
                raise RuntimeError(SECOND_BACKWARD)
            ctx.used = True
            with torch.no_grad():
                grads = tuple(
                    g.mul_(grad_loss.to(g.dtype)) if g is not None and n else None
                    for g, n in zip(ctx.saved_tensors, need)
                )
        else:
            hidden, weight, bias, targets, advantages, mask = ctx.saved_tensors
            tpa, params, compact, chunk_size, backend, head, shard = ctx.rest
            with torch.no_grad():
                out = _run_head(
                    hidden,
                    weight,
                    bias,
                    targets,
                    advantages,
                    mask,
                    grad_loss.to(accumulate_dtype(hidden.dtype)).contiguous(),
                    tpa,
                    params,
                    False,
                    need,
                    compact,
                    chunk_size,
                    backend,
                    head,
                    shard,
                )
            grads = _finish_grads(out, weight, bias)
        return once_differentiable(tuple(grads)) + (None,) * _SHARDED_OTHER_INPUTS


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def fused_linear_gft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    tau: float = 0.1,
    temperature: float = 1.0,
    loss_agg_mode: str = "token-mean",
    ignore_index: int = -100,
    num_tokens: Optional[Union[float, torch.Tensor]] = None,
    max_response_length: Optional[int] = None,
    return_stats: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    process_group: Optional[object] = None,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
    compact_tokens: bool = True,
    head: str = "chunked",
) -> Union[torch.Tensor, Tuple[torch.Tensor, GFTStats]]:
    """The GFT loss of ``logits = hidden @ weight.T (+ bias)`` without materialising them.

    Args:
        hidden: ``(B, T, H)`` or ``(N, H)`` float32/bfloat16/float16 (float64 on the
            ``torch``/``cpu`` backends). Under ``torch.autocast`` the head runs in the
            autocast dtype and the gradients come back in the parameters' dtypes.
        weight: ``(V, H)``, the lm_head layout, same dtype as ``hidden``.
        targets, advantages, mask: as in :func:`gft_kernels.gft_loss`.
        bias: optional ``(V,)``.
        tau, temperature, loss_agg_mode, ignore_index, num_tokens, max_response_length,
        return_stats, backend, logit_scale, logit_softcap: as in
            :func:`gft_kernels.gft_loss`.
        chunk_size: tokens per chunk; default from a memory budget (1 GiB of chunk logits
            on CUDA, 512 MiB on CPU, counted in the real dtype; chunks of equal size).
        process_group: vocab-parallel head: ``weight`` (and ``bias``) hold this rank's
            contiguous block of rows (blocks in rank order, any sizes); ``hidden``,
            ``targets`` (global ids) and the rest are replicated. ``dh`` is summed across
            ranks, ``dW`` stays local.
        compact_tokens: drop tokens that carry no loss before the first matmul (one host
            sync per call); ``False`` makes the call sync-free, as does tracing it with
            ``torch.compile`` or capturing it into a CUDA graph (chosen automatically).
        head: head strategy, ``"chunked"`` (``"blockwise"`` is a reserved slot).

    Returns:
        The loss (0-dim, or ``targets``-shaped for ``none``) in fp32 (fp64 for fp64
        input), and a :class:`GFTStats` when ``return_stats=True``. Reduced modes support
        one backward per graph: the gradients computed in the forward are handed to it.
    """
    _checks.check_float_tensor("hidden", hidden, dims=(2, 3))
    _checks.check_nonempty("hidden", hidden, "token and one hidden feature")
    _checks.check_float_tensor("weight", weight, dims=(2,))
    _checks.check_bool("compact_tokens", compact_tokens)
    _checks.check_no_function_transform(
        "gft_kernels.fused_linear_gft_loss",
        (hidden, weight, bias, targets, advantages, mask, num_tokens),
    )
    if head not in HEAD_STRATEGIES:
        raise ValueError(f"head: expected one of {', '.join(HEAD_STRATEGIES)}, got {head!r}")
    cast = _autocast_dtype(hidden.device)
    if cast is not None:
        hidden, weight = hidden.to(cast), weight.to(cast)
        bias = bias.to(cast) if bias is not None else None
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: expected shape (V, {hidden.shape[-1]}) (hidden size last), "
            f"got {tuple(weight.shape)}"
        )
    _checks.check_nonempty("weight", weight, "vocabulary row")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected dtype {hidden.dtype} (as hidden), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: expected device {hidden.device}, got {weight.device}")
    if bias is not None:
        _checks.check_float_tensor("bias", bias, dims=(1,))
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(
                f"bias: expected dtype {hidden.dtype} on {hidden.device}, got {bias.dtype} on "
                f"{bias.device}"
            )
    if chunk_size is not None:
        _checks.check_positive_int("chunk_size", chunk_size)
    batch = prepare_tokens(
        hidden,
        targets,
        advantages,
        mask,
        backend=backend,
        tau=tau,
        temperature=temperature,
        loss_agg_mode=loss_agg_mode,
        ignore_index=ignore_index,
        num_tokens=num_tokens,
        max_response_length=max_response_length,
        return_stats=return_stats,
        logit_scale=logit_scale,
        logit_softcap=logit_softcap,
        anchor_name="hidden",
    )
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    reduced = batch.loss_agg_mode != "none"
    weights = batch.weights if reduced else None
    p = batch.params
    # Decided here as well as in the head: under torch.compile only this wrapper is traced,
    # and the op then runs with the choice baked in. The forward and the per-token
    # backward both follow it (the head itself keeps every row when stats are asked for).
    compact = compact_tokens and not must_not_sync(hidden.device)
    if process_group is None:
        grad_on = torch.is_grad_enabled()
        need = tuple(
            grad_on and t is not None and t.requires_grad for t in (hidden_2d, weight, bias)
        )
        loss, logprobs, probs, entropy, *_ = fused_linear_loss(
            hidden_2d,
            weight,
            bias,
            batch.targets,
            batch.advantages,
            batch.mask,
            weights,
            batch.tokens_per_advantage,
            p.tau,
            p.temperature,
            p.logit_scale,
            p.logit_softcap,
            p.ignore_index,
            return_stats,
            *need,
            compact,
            chunk_size or 0,
            batch.backend,
            head,
        )
    else:
        shard = vocab_shard(process_group, weight.shape[0], hidden.device)
        loss, logprobs, probs, entropy = ShardedFusedLinear.apply(
            hidden_2d,
            weight,
            bias,
            batch.targets,
            batch.advantages,
            batch.mask,
            weights,
            batch.tokens_per_advantage,
            p,
            return_stats,
            compact,
            chunk_size,
            batch.backend,
            head,
            shard,
        )
    if not reduced:
        loss = loss.reshape(batch.token_shape)
    if not return_stats:
        return loss
    return loss, make_stats(batch, logprobs, probs, entropy)
