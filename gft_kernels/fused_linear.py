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

from dataclasses import dataclass, replace
from typing import Callable, Literal, NamedTuple, Optional, Sequence, Tuple, Union, overload

import torch

from gft_kernels import _checks
from gft_kernels._head import HEAD_STRATEGIES, HeadInputs, HeadOutputs, must_not_sync
from gft_kernels._op_args import OpArgs, bind_inputs, custom_op
from gft_kernels._prepare import make_stats, prepare_tokens
from gft_kernels._token_loss_op import once_differentiable
from gft_kernels._vocab_parallel import VocabShard, vocab_shard
from gft_kernels.backends import RowParams, load_backend
from gft_kernels.backends.torch_rows import accumulate_dtype
from gft_kernels.stats import GFTStats


@dataclass(frozen=True)
class HeadTensors(OpArgs):
    """The head's tensors, ``N`` tokens (see ``TokenBatch``); the first three carry the
    gradients."""

    hidden: torch.Tensor  # (N, H)
    weight: torch.Tensor  # (V, H); vocab-parallel: this rank's rows
    bias: Optional[torch.Tensor]  # (V,)
    targets: torch.Tensor  # (N,) int64/int32, ignore_index kept
    advantages: torch.Tensor  # (N // tokens_per_advantage,) in the accumulate dtype
    mask: Optional[torch.Tensor]  # (N,) uint8/float32


# The op inputs that carry a gradient, in the order of HeadGrads.
_DIFFERENTIABLE = ("hidden", "weight", "bias")


@dataclass(frozen=True)
class HeadRun:
    """How the head runs: the gradients it computes, compaction, chunks, backend, strategy."""

    need_grad_hidden: bool
    need_grad_weight: bool
    need_grad_bias: bool
    compact: bool  # drop the tokens that carry no loss before the first matmul
    chunk_size: int  # tokens per chunk; 0: from the memory budget
    backend: str
    head: str  # a key of HEAD_STRATEGIES

    @property
    def need_grads(self) -> Tuple[bool, bool, bool]:
        return self.need_grad_hidden, self.need_grad_weight, self.need_grad_bias

    def needing(self, need_grads: Sequence[bool]) -> HeadRun:
        hidden, weight, bias = need_grads
        return replace(self, need_grad_hidden=hidden, need_grad_weight=weight, need_grad_bias=bias)


@dataclass(frozen=True)
class FusedLinearArgs(OpArgs):
    """Arguments of ``gft_kernels::fused_linear_loss`` and of the vocab-parallel head."""

    tensors: HeadTensors
    weights: Optional[torch.Tensor]  # (N,) aggregation weights; None: per-token losses
    tokens_per_advantage: int
    params: RowParams
    with_stats: bool
    run: HeadRun


@dataclass(frozen=True)
class FusedLinearBackwardArgs(OpArgs):
    """Arguments of ``gft_kernels::fused_linear_loss_backward``: the forward's, with the
    per-token upstream gradients in place of the aggregation weights, and no stats."""

    tensors: HeadTensors
    grad_tokens: torch.Tensor  # (N,) upstream gradient of each token's loss, accumulate dtype
    tokens_per_advantage: int
    params: RowParams
    run: HeadRun


class HeadGrads(NamedTuple):
    """``dh`` ``(N, H)``, ``dW`` ``(V, H)``, ``db`` ``(V,)``: contiguous, in the dtypes of
    hidden/weight/bias, empty where not computed (an op returns tensors only)."""

    grad_hidden: torch.Tensor
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor


class FusedLinearOutputs(NamedTuple):
    """Outputs of ``fused_linear_loss``: per token ``(N,)`` in the accumulate dtype."""

    loss: torch.Tensor  # 0-dim sum(w * l) with aggregation weights, else (N,)
    logprobs: torch.Tensor
    probs: torch.Tensor
    entropy: torch.Tensor  # empty without stats
    grad_hidden: torch.Tensor  # the gradients (HeadGrads) of a reduced loss
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor


def _run_head(
    args: Union[FusedLinearArgs, FusedLinearBackwardArgs],
    grad_weights: Optional[torch.Tensor],
    with_stats: bool,
    shard: Optional[VocabShard],
) -> HeadOutputs:
    """The head strategy ``args.run.head``; with ``grad_weights`` (``(N,)``) it computes
    the gradients of ``sum_t w_t l_t`` that ``args.run`` asks for in the same pass."""
    t, run = args.tensors, args.run
    inputs = HeadInputs(
        hidden=t.hidden,
        weight=t.weight,
        bias=t.bias,
        targets=t.targets,
        advantages=t.advantages,
        tokens_per_advantage=args.tokens_per_advantage,
        mask=t.mask,
        params=args.params,
    )
    return HEAD_STRATEGIES[run.head](
        load_backend(run.backend),
        inputs,
        grad_weights=grad_weights,
        need_grads=run.need_grads,
        with_stats=with_stats,
        compact=run.compact,
        chunk_size=run.chunk_size or None,
        shard=shard,
    )


def _grads(tensors: HeadTensors, computed: Sequence[Optional[torch.Tensor]]) -> HeadGrads:
    """The gradients as the ops return them: contiguous, and empty where not computed.

    Every gradient leaves contiguous, the layout the ops' fake implementations promise
    whatever the head strategy and the inputs' strides (a ``(H, V)`` parameter passed as
    ``.t()``, a column-sliced hidden): a fake that guessed ``empty_like`` of a transposed
    weight would disagree with the real op, and torch.compile would trust the fake.
    """
    # bias may be None: an empty db takes the weight's dtype and device.
    empty_like = (tensors.hidden, tensors.weight, tensors.weight)
    return HeadGrads(
        *(e.new_empty(0) if g is None else g.contiguous() for g, e in zip(computed, empty_like))
    )


def _finish_grads(out: HeadOutputs, tensors: HeadTensors) -> HeadGrads:
    """dW/db were accumulated in fp32: hand them over in the parameters' dtypes."""
    grad_w = out.grad_weight
    if grad_w is not None:
        grad_w = grad_w.to(tensors.weight.dtype)
    grad_b = out.grad_bias
    if grad_b is not None and tensors.bias is not None:
        grad_b = grad_b.to(tensors.bias.dtype)
    return _grads(tensors, (out.grad_hidden, grad_w, grad_b))


def _fake_grads(tensors: HeadTensors, need_grads: Sequence[bool]) -> HeadGrads:
    """What :func:`_grads` returns, from the sizes alone."""
    differentiable = (tensors.hidden, tensors.weight, tensors.bias)
    return _grads(
        tensors,
        [
            t.new_empty(t.shape) if need and t is not None else None
            for t, need in zip(differentiable, need_grads)
        ],
    )


def _forward(args: FusedLinearArgs, shard: Optional[VocabShard] = None) -> FusedLinearOutputs:
    """The forward of the op and of the vocab-parallel head."""
    out = _run_head(args, args.weights, args.with_stats, shard)
    loss = out.loss if args.weights is None else torch.dot(out.loss, args.weights)
    entropy = out.entropy if out.entropy is not None else out.loss.new_empty(0)
    return FusedLinearOutputs(
        loss, out.logprobs, out.probs, entropy, *_finish_grads(out, args.tensors)
    )


def _recompute(args: FusedLinearBackwardArgs, shard: Optional[VocabShard] = None) -> HeadGrads:
    """The per-token backward of the op and of the vocab-parallel head: the head again,
    weighted by the upstream gradients."""
    return _finish_grads(_run_head(args, args.grad_tokens, False, shard), args.tensors)


@custom_op("gft_kernels::fused_linear_loss", FusedLinearArgs)
def fused_linear_loss(args: FusedLinearArgs) -> FusedLinearOutputs:
    """With aggregation ``weights`` (``(N,)``) the loss is the 0-dim ``sum(w * l)`` and the
    gradients asked for are computed in the same pass; without, the loss is per token
    ``(N,)`` and no gradient is computed. Unused outputs are empty tensors."""
    return _forward(args)


@fused_linear_loss.register_fake
@bind_inputs(FusedLinearArgs)
def _(args: FusedLinearArgs) -> FusedLinearOutputs:
    n_tokens = args.tensors.hidden.shape[0]
    acc = accumulate_dtype(args.tensors.hidden.dtype)
    vec = lambda n: args.tensors.hidden.new_empty(n, dtype=acc)  # noqa: E731
    reduced = args.weights is not None
    return FusedLinearOutputs(
        vec(()) if reduced else vec(n_tokens),
        vec(n_tokens),
        vec(n_tokens),
        vec(n_tokens if args.with_stats else 0),
        *_fake_grads(args.tensors, args.run.need_grads if reduced else (False,) * 3),
    )


@custom_op("gft_kernels::fused_linear_loss_backward", FusedLinearBackwardArgs)
def fused_linear_loss_backward(args: FusedLinearBackwardArgs) -> HeadGrads:
    """Gradients of ``sum_t g_t l_t`` for per-token upstream gradients ``g`` (``none``);
    ``compact`` is the forward's choice, so that ``compact_tokens=False`` stays sync-free
    through the backward too."""
    return _recompute(args)


@fused_linear_loss_backward.register_fake
@bind_inputs(FusedLinearBackwardArgs)
def _(args: FusedLinearBackwardArgs) -> HeadGrads:
    return _fake_grads(args.tensors, args.run.need_grads)


SECOND_BACKWARD = (
    "fused_linear_gft_loss: a second backward through the same graph; the gradients "
    "computed in the forward were handed to the first one (recompute the loss instead of "
    "using retain_graph=True)"
)


def _save_for_backward(ctx, args: FusedLinearArgs, outputs: FusedLinearOutputs) -> None:
    """Reduced: the gradients computed in the forward (the backward scales them); per
    token: what the backward recomputes the head from."""
    ctx.reduced = args.weights is not None
    ctx.used = False
    if ctx.reduced:
        ctx.save_for_backward(outputs.grad_hidden, outputs.grad_weight, outputs.grad_bias)
    else:
        ctx.save_for_backward(*args.tensors.flat())
        ctx.tokens_per_advantage = args.tokens_per_advantage
        ctx.params = args.params
        ctx.run = args.run


def _head_backward(
    ctx,
    grad_loss: torch.Tensor,
    need_grads: Sequence[bool],
    recompute: Callable[[FusedLinearBackwardArgs], HeadGrads],
) -> Tuple[Optional[torch.Tensor], ...]:
    """``dh, dW, db`` (None where not needed) for the upstream gradient of the loss."""
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
                for g, need in zip(saved, need_grads)
            )
    else:
        tensors = HeadTensors.bind(ctx.saved_tensors)
        need_h, need_w, need_b = need_grads
        args = FusedLinearBackwardArgs(
            tensors=tensors,
            grad_tokens=grad_loss.to(accumulate_dtype(tensors.hidden.dtype)).contiguous(),
            tokens_per_advantage=ctx.tokens_per_advantage,
            params=ctx.params,
            run=ctx.run.needing((need_h, need_w, need_b and tensors.bias is not None)),
        )
        with torch.no_grad():
            grads = recompute(args)
        grads = tuple(g if need and g.numel() else None for g, need in zip(grads, need_grads))
    return once_differentiable(grads)


def _setup(ctx, inputs, output) -> None:
    # Only the loss is differentiated; without this autograd would hand the backward a
    # zero-filled gradient for every other output, dW's V x H buffer included (a 1 GB
    # fill at V = 128256, H = 2048).
    ctx.set_materialize_grads(False)
    _save_for_backward(ctx, FusedLinearArgs.bind(inputs), FusedLinearOutputs(*output))


def _backward(ctx, grad_loss, *_unused):
    if grad_loss is None:  # only outputs other than the loss reached the backward
        return FusedLinearArgs.gradients()
    need = FusedLinearArgs.select(ctx.needs_input_grad, _DIFFERENTIABLE)
    grads = _head_backward(
        ctx, grad_loss, need, lambda args: fused_linear_loss_backward(*args.flat())
    )
    return FusedLinearArgs.gradients(**dict(zip(_DIFFERENTIABLE, grads)))


fused_linear_loss.register_autograd(_backward, setup_context=_setup)


class ShardedFusedLinear(torch.autograd.Function):
    """Vocab-parallel fused head (eager only): ``weight``/``bias`` hold this rank's rows.

    ``apply(hidden, weight, bias, args, shard)``: ``args`` holds the whole call (as the
    op's); its ``hidden``, ``weight`` and ``bias`` come first on their own as well, since
    autograd only tracks the tensors given to ``apply`` directly.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, args: FusedLinearArgs, shard: VocabShard):
        out = _forward(args, shard)
        _save_for_backward(ctx, args, out)
        ctx.shard = shard
        ctx.mark_non_differentiable(out.logprobs, out.probs, out.entropy)
        return out.loss, out.logprobs, out.probs, out.entropy

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        grads = _head_backward(
            ctx, grad_loss, ctx.needs_input_grad[:3], lambda args: _recompute(args, ctx.shard)
        )
        return (*grads, None, None)  # nothing for args and shard


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


# The overloads type the result by return_stats (a bool variable: either); the
# implementation below holds the defaults, and is the signature seen at run time.
@overload
def fused_linear_gft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = ...,
    *,
    bias: Optional[torch.Tensor] = ...,
    tau: float = ...,
    temperature: float = ...,
    loss_agg_mode: str = ...,
    ignore_index: int = ...,
    num_tokens: Optional[Union[float, torch.Tensor]] = ...,
    max_response_length: Optional[int] = ...,
    return_stats: Literal[False] = ...,
    backend: str = ...,
    chunk_size: Optional[int] = ...,
    process_group: Optional[object] = ...,
    logit_scale: float = ...,
    logit_softcap: Optional[float] = ...,
    compact_tokens: bool = ...,
    head: str = ...,
) -> torch.Tensor: ...


@overload
def fused_linear_gft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = ...,
    *,
    bias: Optional[torch.Tensor] = ...,
    tau: float = ...,
    temperature: float = ...,
    loss_agg_mode: str = ...,
    ignore_index: int = ...,
    num_tokens: Optional[Union[float, torch.Tensor]] = ...,
    max_response_length: Optional[int] = ...,
    return_stats: Literal[True],
    backend: str = ...,
    chunk_size: Optional[int] = ...,
    process_group: Optional[object] = ...,
    logit_scale: float = ...,
    logit_softcap: Optional[float] = ...,
    compact_tokens: bool = ...,
    head: str = ...,
) -> Tuple[torch.Tensor, GFTStats]: ...


@overload
def fused_linear_gft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = ...,
    *,
    bias: Optional[torch.Tensor] = ...,
    tau: float = ...,
    temperature: float = ...,
    loss_agg_mode: str = ...,
    ignore_index: int = ...,
    num_tokens: Optional[Union[float, torch.Tensor]] = ...,
    max_response_length: Optional[int] = ...,
    return_stats: bool = ...,
    backend: str = ...,
    chunk_size: Optional[int] = ...,
    process_group: Optional[object] = ...,
    logit_scale: float = ...,
    logit_softcap: Optional[float] = ...,
    compact_tokens: bool = ...,
    head: str = ...,
) -> Union[torch.Tensor, Tuple[torch.Tensor, GFTStats]]: ...


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
        head: head strategy. ``"chunked"`` (default): token chunks through a GEMM into a
            ``chunk x V`` buffer and the row pass (any backend). ``"blockwise"``: Triton
            kernels that form logit tiles with ``tl.dot`` and never write them to memory
            (no ``chunk x V`` buffer; CUDA, or CPU tensors under ``TRITON_INTERPRET=1``;
            ``backend="auto"`` picks ``triton``); for 16-bit inputs the gradient products
            skip vocabulary tiles whose softmax mass is below the dtype's precision (the
            skipped part of each row's gradient is below ``u |c|`` in L1 norm, ``u`` the
            unit roundoff). ``"blockwise_exact"``: the same without skipping. Under
            ``torch.use_deterministic_algorithms(True)`` the blockwise gradients are summed
            in a fixed order (no atomics; the logits are recomputed once more).

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
        if head != "chunked":
            raise ValueError(f"chunk_size: applies to head='chunked' only, got {chunk_size}")
    if head != "chunked" and backend == "auto":
        backend = "triton"  # the blockwise heads are Triton kernels
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
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (hidden_2d, weight, bias)]
    args = FusedLinearArgs(
        tensors=HeadTensors(
            hidden=hidden_2d,
            weight=weight,
            bias=bias,
            targets=batch.targets,
            advantages=batch.advantages,
            mask=batch.mask,
        ),
        weights=batch.weights if reduced else None,
        tokens_per_advantage=batch.tokens_per_advantage,
        params=batch.params,
        with_stats=return_stats,
        run=HeadRun(
            need_grad_hidden=need[0],
            need_grad_weight=need[1],
            need_grad_bias=need[2],
            # Decided here as well as in the head: under torch.compile only this wrapper
            # is traced, and the op then runs with the choice baked in. The forward and
            # the per-token backward both follow it (the head itself keeps every row when
            # stats are asked for).
            compact=compact_tokens and not must_not_sync(hidden.device),
            chunk_size=chunk_size or 0,
            backend=batch.backend,
            head=head,
        ),
    )
    if process_group is None:
        loss, logprobs, probs, entropy, *_ = fused_linear_loss(*args.flat())
    else:
        shard = vocab_shard(process_group, weight.shape[0], hidden.device)
        loss, logprobs, probs, entropy = ShardedFusedLinear.apply(
            hidden_2d, weight, bias, args, shard
        )
    if not reduced:
        loss = loss.reshape(batch.token_shape)
    if not return_stats:
        return loss
    return loss, make_stats(batch, logprobs, probs, entropy)
