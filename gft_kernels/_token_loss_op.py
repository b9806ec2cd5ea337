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

from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch

from gft_kernels._op_args import OpArgs, bind_inputs, custom_op
from gft_kernels._vocab_parallel import VocabShard, sharded_token_pass
from gft_kernels.backends import RowParams, TokenPass, load_backend
from gft_kernels.backends.torch_rows import accumulate_dtype

_Outputs = Tuple[Optional[torch.Tensor], ...]


@dataclass(frozen=True)
class TokenLossArgs(OpArgs):
    """Arguments of ``gft_kernels::token_loss`` and of the vocab-parallel token losses."""

    logits: torch.Tensor  # (N, V), last dim contiguous; vocab-parallel: this rank's columns
    targets: torch.Tensor  # (N,) int64/int32, ignore_index kept
    advantages: torch.Tensor  # (N // tokens_per_advantage,) in the accumulate dtype
    mask: Optional[torch.Tensor]  # (N,) uint8/float32
    tokens_per_advantage: int
    params: RowParams
    with_stats: bool
    backend: str
    inplace_backward: bool


class TokenLossOutputs(NamedTuple):
    """Outputs of ``token_loss``, each ``(N,)`` in the accumulate dtype (see
    ``RowBackend.token_pass``)."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    probs: torch.Tensor
    entropy: torch.Tensor  # empty without stats
    row_max: torch.Tensor  # the row summary the backward reads
    sum_exp: torch.Tensor
    scale: torch.Tensor


@dataclass(frozen=True)
class RowGradArgs(OpArgs):
    """Arguments of ``token_loss_backward`` and ``token_loss_backward_``
    (``RowBackend.row_grad``)."""

    logits: torch.Tensor  # (N, V)
    targets: torch.Tensor  # (N,)
    row_max: torch.Tensor  # (N,) the forward's row summary
    sum_exp: torch.Tensor  # (N,)
    grad_loss: torch.Tensor  # (N,) upstream gradient of each token's loss
    scale: torch.Tensor  # (N,) A c of each token
    temperature: float
    logit_scale: float
    logit_softcap: Optional[float]
    backend: str

    @property
    def params(self) -> RowParams:
        # The gradient reads neither tau (the coefficient is in ``scale``) nor
        # ignore_index (an ignored token's ``scale`` is 0, and its row is not read).
        return RowParams(
            tau=0.0,
            temperature=self.temperature,
            logit_scale=self.logit_scale,
            logit_softcap=self.logit_softcap,
        )

    def write_grad(self, out: torch.Tensor) -> torch.Tensor:
        """``d(sum_t g_t l_t) / d logits`` into ``out`` (may be the logits)."""
        return load_backend(self.backend).row_grad(
            self.logits,
            self.targets,
            self.row_max,
            self.sum_exp,
            self.grad_loss,
            self.scale,
            self.params,
            out,
        )


def _empty_if_none(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else like.new_empty(0)


def _token_pass(
    args: TokenLossArgs, shard: Optional[VocabShard] = None
) -> Tuple[TokenPass, torch.Tensor]:
    """The row pass over ``args.logits``, and the targets ``row_grad`` takes: with a
    ``shard``, vocab-parallel (each target's column in this rank's block, or -1)."""
    rows = load_backend(args.backend)
    row_inputs = (args.logits, args.targets, args.advantages, args.mask, args.params)
    options: Dict[str, Any] = {
        "tokens_per_advantage": args.tokens_per_advantage,
        "with_stats": args.with_stats,
    }
    if shard is None:
        return rows.token_pass(*row_inputs, **options), args.targets
    return sharded_token_pass(rows, *row_inputs, **options, shard=shard)


@custom_op("gft_kernels::token_loss", TokenLossArgs)
def token_loss(args: TokenLossArgs) -> TokenLossOutputs:
    """One row pass: the per-token losses, stats and row summary."""
    out, _ = _token_pass(args)
    return TokenLossOutputs(
        out.loss,
        out.logprobs,
        out.probs,
        _empty_if_none(out.entropy, out.loss),
        out.row_max,
        out.sum_exp,
        out.scale,
    )


@token_loss.register_fake
@bind_inputs(TokenLossArgs)
def _(args: TokenLossArgs) -> TokenLossOutputs:
    n_rows = args.logits.shape[0]
    acc = accumulate_dtype(args.logits.dtype)
    vec = lambda n: args.logits.new_empty(n, dtype=acc)  # noqa: E731
    return TokenLossOutputs(
        loss=vec(n_rows),
        logprobs=vec(n_rows),
        probs=vec(n_rows),
        entropy=vec(n_rows if args.with_stats else 0),
        row_max=vec(n_rows),
        sum_exp=vec(n_rows),
        scale=vec(n_rows),
    )


@custom_op("gft_kernels::token_loss_backward", RowGradArgs)
def token_loss_backward(args: RowGradArgs) -> torch.Tensor:
    """``d(sum_t g_t l_t) / d logits`` into a new ``(N, V)`` buffer (logits' dtype)."""
    return args.write_grad(torch.empty_like(args.logits, memory_format=torch.contiguous_format))


@token_loss_backward.register_fake
@bind_inputs(RowGradArgs)
def _(args: RowGradArgs) -> torch.Tensor:
    return torch.empty_like(args.logits, memory_format=torch.contiguous_format)


@custom_op("gft_kernels::token_loss_backward_", RowGradArgs, mutates_args=("logits",))
def token_loss_backward_(args: RowGradArgs) -> None:
    """The same gradient written over the logits themselves (in place)."""
    args.write_grad(args.logits)


@token_loss_backward_.register_fake
@bind_inputs(RowGradArgs)
def _(args: RowGradArgs) -> None:
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
    next_wrapped = iter(wrapped if isinstance(wrapped, tuple) else (wrapped,))
    return tuple(next(next_wrapped) if g is not None else None for g in grads)


def _setup(ctx, inputs, output) -> None:
    args = TokenLossArgs.bind(inputs)
    out = TokenLossOutputs(*output)
    ctx.params, ctx.backend, ctx.inplace = args.params, args.backend, args.inplace_backward
    if ctx.inplace:
        # Held directly, not as a saved tensor, so that a second use is refused with a
        # clear message instead of autograd's generic one (see _backward).
        ctx.logits = args.logits
        ctx.logits_version = args.logits._version
        ctx.save_for_backward(args.targets, out.row_max, out.sum_exp, out.scale)
    else:
        ctx.save_for_backward(args.logits, args.targets, out.row_max, out.sum_exp, out.scale)


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
    else:
        logits, targets, row_max, sum_exp, scale = ctx.saved_tensors
    args = RowGradArgs(
        logits=logits,
        targets=targets,
        row_max=row_max,
        sum_exp=sum_exp,
        grad_loss=grad_loss.contiguous(),
        scale=scale,
        temperature=ctx.params.temperature,
        logit_scale=ctx.params.logit_scale,
        logit_softcap=ctx.params.logit_softcap,
        backend=ctx.backend,
    )
    with torch.no_grad():
        if ctx.inplace:
            token_loss_backward_(*args.flat())
            grad = logits
        else:
            grad = token_loss_backward(*args.flat())
    (grad,) = once_differentiable((grad,))
    return TokenLossArgs.gradients(logits=grad)


token_loss.register_autograd(_backward, setup_context=_setup)


class ShardedTokenLoss(torch.autograd.Function):
    """Vocab-parallel token losses (eager only): ``logits`` is this rank's block.

    ``apply(logits, args, shard)``: ``args`` holds the whole call (as the op's); its
    ``logits`` come first on their own as well, since autograd only tracks the tensors
    given to ``apply`` directly.
    """

    @staticmethod
    def forward(ctx, logits, args: TokenLossArgs, shard: VocabShard):
        out, local = _token_pass(args, shard)
        ctx.rows = load_backend(args.backend)
        ctx.params, ctx.inplace = args.params, args.inplace_backward
        ctx.save_for_backward(logits, local, out.row_max, out.sum_exp, out.scale)
        entropy = _empty_if_none(out.entropy, out.loss)
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
        return grad, None, None  # nothing for args and shard
