"""``fused_linear_gft_loss``: the GFT loss straight from hidden states and the lm_head.

The ``N x V`` logits never exist. Tokens are processed in chunks: per chunk the logits
``h_c W^T (+ b)`` are formed, the row kernels turn them into per-token losses and, in the
same buffer, into the logits-gradient ``G_c``; then ``dh_c = G_c W`` and
``dW += G_c^T h_c``. For reduced modes the gradients are computed during the forward
(three matmuls in all, the minimum) and the backward only scales them by the upstream
scalar; for ``none`` the upstream gradient is per token, so the backward recomputes.

Tokens that cannot contribute (mask 0, ignore_index, advantage exactly 0) are dropped
before the first matmul when no stats are requested, so the cost follows the
contributing tokens; the aggregation weights are computed on the full batch first, so the
denominators stay those of DESIGN §1.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from gft_kernels import _checks
from gft_kernels.backends import RowKernels
from gft_kernels.cpu.torch_rows import accumulate_dtype
from gft_kernels.function import token_terms
from gft_kernels.rows import VocabShard, row_gradient, row_statistics
from gft_kernels.stats import GFTStats
from gft_kernels.tokens import make_stats, prepare_call

# Bytes of one chunk's logits buffer when chunk_size is not given: large enough for
# efficient matmuls, small enough that the head's memory stays dominated by dW.
_CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}


def default_chunk_size(n_tokens: int, vocab_size: int, device: torch.device) -> int:
    budget = _CHUNK_BYTES.get(device.type, 256 << 20)
    return max(1, min(n_tokens, budget // (4 * vocab_size)))


def _head_chunk(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    return torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()


def _chunk_grads(
    logits: torch.Tensor,
    kernels: RowKernels,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    coef_weight: Optional[torch.Tensor],
    tau: float,
    temperature: float,
    with_entropy: bool,
    shard: Optional[VocabShard],
):
    """Row pass over one chunk; with ``coef_weight`` the chunk becomes G_c in place."""
    stats = row_statistics(kernels, logits, targets, temperature, with_entropy, shard)
    loss, logprobs, probs, scale = token_terms(
        stats.target_logit, advantages, valid, stats.lse_t, stats.lse_1, tau, temperature
    )
    if coef_weight is not None:
        coef = coef_weight * scale / temperature
        row_gradient(kernels, logits, stats, coef, temperature, logits)
    return loss, logprobs, probs, stats.entropy, scale


def _accumulate(
    grad_logits: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    grad_h: Optional[torch.Tensor],
    grad_w: Optional[torch.Tensor],
    grad_b: Optional[torch.Tensor],
    rows: slice,
) -> None:
    if grad_h is not None:
        torch.mm(grad_logits, weight, out=grad_h[rows])
    if grad_w is not None:
        if grad_w.dtype == grad_logits.dtype:
            grad_w.addmm_(grad_logits.t(), h)
        else:  # reduced-precision head: fp32 accumulation across chunks
            grad_w.add_(torch.mm(grad_logits.t(), h))
    if grad_b is not None:
        grad_b.add_(grad_logits.sum(0, dtype=grad_b.dtype))


class FusedLinearGFTFunction(torch.autograd.Function):
    """Per-chunk head + GFT row pass over the kept tokens (``(M, H)`` hidden).

    Outputs ``(loss, logprobs, probs, entropy)``: ``loss`` is the 0-dim ``sum(w * l)``
    when aggregation ``weights`` are given, else the ``(M,)`` per-token losses.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        targets: torch.Tensor,
        advantages: torch.Tensor,
        valid: torch.Tensor,
        weights: Optional[torch.Tensor],
        tau: float,
        temperature: float,
        kernels: RowKernels,
        chunk_size: int,
        with_entropy: bool,
        shard: Optional[VocabShard],
    ):
        n_tokens = hidden.shape[0]
        acc = accumulate_dtype(hidden.dtype)
        need = ctx.needs_input_grad[:3]
        reduce_now = weights is not None and any(need)
        grad_h, grad_w, grad_b = _grad_buffers(
            hidden, weight, bias, need if reduce_now else (False,) * 3, acc
        )

        outputs = {k: [] for k in ("loss", "logprobs", "probs", "entropy", "scale")}
        for start in range(0, n_tokens, chunk_size):
            rows = slice(start, min(start + chunk_size, n_tokens))
            h = hidden[rows]
            logits = _head_chunk(h, weight, bias)
            result = _chunk_grads(
                logits,
                kernels,
                targets[rows],
                advantages[rows],
                valid[rows],
                weights[rows] if reduce_now else None,
                tau,
                temperature,
                with_entropy,
                shard,
            )
            for key, value in zip(outputs, result):
                outputs[key].append(value)
            if reduce_now:
                _accumulate(logits, h, weight, grad_h, grad_w, grad_b, rows)
            del logits

        def cat(key):
            parts = [p for p in outputs[key] if p is not None]
            return torch.cat(parts) if parts else hidden.new_empty(0, dtype=acc)

        loss, logprobs, probs, entropy, scale = (cat(k) for k in outputs)
        if weights is not None:
            loss = (loss * weights).sum()
        if grad_h is not None and shard is not None:
            _sum_over_ranks(grad_h, shard)  # dh = sum_r G_r W_r
        ctx.reduce_now = reduce_now
        ctx.chunk_size = chunk_size
        ctx.temperature = temperature
        ctx.kernels = kernels
        ctx.shard = shard
        ctx.param_dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        if reduce_now:
            # Plain attributes, not saved tensors: the backward takes them over (below).
            ctx.precomputed = (grad_h, grad_w, grad_b)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, scale)
        ctx.mark_non_differentiable(logprobs, probs, entropy)
        return loss, logprobs, probs, entropy

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.reduce_now:
            if ctx.precomputed is None:
                raise RuntimeError(
                    "fused_linear_gft_loss: a second backward through the same graph; the "
                    "gradients computed in the forward were handed to the first one "
                    "(recompute the loss instead of using retain_graph=True)"
                )
            # Hand the buffers over: with no other reference left, autograd takes dW as
            # weight.grad instead of copying it (one V x H buffer, not two), and nothing
            # outlives the step while the caller still holds the loss.
            grad_h, grad_w, grad_b = ctx.precomputed
            ctx.precomputed = None
            # Reduced modes: the output is sum(w * l), computed with w folded into G;
            # the upstream scalar only scales the precomputed gradients, in place.
            return _scaled_grads(ctx, grad_h, grad_w, grad_b, grad_loss)

        hidden, weight, bias, targets, scale = ctx.saved_tensors
        acc = scale.dtype
        grad_h, grad_w, grad_b = _grad_buffers(hidden, weight, bias, (need_h, need_w, need_b), acc)
        coef_all = grad_loss.to(acc) * scale / ctx.temperature
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, min(start + ctx.chunk_size, hidden.shape[0]))
            h = hidden[rows]
            logits = _head_chunk(h, weight, bias)
            stats = row_statistics(
                ctx.kernels, logits, targets[rows], ctx.temperature, False, ctx.shard
            )
            row_gradient(ctx.kernels, logits, stats, coef_all[rows], ctx.temperature, logits)
            _accumulate(logits, h, weight, grad_h, grad_w, grad_b, rows)
        if grad_h is not None and ctx.shard is not None:
            _sum_over_ranks(grad_h, ctx.shard)
        return _scaled_grads(ctx, grad_h, grad_w, grad_b, None)


def _grad_buffers(hidden, weight, bias, need, acc: torch.dtype):
    """dh in the input dtype (rows are written once); dW, db zeroed in fp32 (accumulated)."""
    need_h, need_w, need_b = need
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_b = (
        torch.zeros(bias.shape, dtype=acc, device=bias.device)
        if need_b and bias is not None
        else None
    )
    return grad_h, grad_w, grad_b


def _sum_over_ranks(tensor: torch.Tensor, shard: VocabShard) -> None:
    import torch.distributed as dist

    dist.all_reduce(tensor, group=shard.group)


def _scaled_grads(ctx, grad_h, grad_w, grad_b, g: Optional[torch.Tensor]):
    """Scale by the upstream scalar (reduced modes) and cast dW/db to the params' dtypes."""
    weight_dtype, bias_dtype = ctx.param_dtypes
    if g is not None and not bool(g == 1):
        for grad in (grad_h, grad_w, grad_b):
            if grad is not None:
                grad.mul_(g.to(grad.dtype))
    return (
        grad_h,
        grad_w.to(weight_dtype) if grad_w is not None else None,
        grad_b.to(bias_dtype) if grad_b is not None else None,
    ) + (None,) * 10


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
    num_tokens: Optional[float] = None,
    max_response_length: Optional[int] = None,
    return_stats: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    process_group: Optional[object] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, GFTStats]]:
    """The GFT loss of ``logits = hidden @ weight.T (+ bias)`` without materialising them.

    Args:
        hidden: ``(B, T, H)`` or ``(N, H)``, float32/bfloat16/float16 (float64 on the
            ``torch``/``cpu`` backends).
        weight: ``(V, H)``, the lm_head layout, same dtype and device as ``hidden``;
            may be frozen or tied (no ``requires_grad``).
        targets, advantages, mask: as in :func:`gft_kernels.gft_loss`, over the leading
            dims of ``hidden``.
        bias: optional ``(V,)``.
        chunk_size: tokens per chunk; default from V and a memory budget (256 MiB of
            fp32 logits on CPU, 1 GiB on CUDA).
        process_group: vocab-parallel head: ``weight`` (and ``bias``) hold this rank's
            contiguous block of vocabulary rows (rank order, any sizes); ``hidden`` and
            the token inputs are replicated. ``dh`` is summed across ranks, ``dW`` stays
            local.
        Other keywords: as in :func:`gft_kernels.gft_loss`.

    Returns:
        The loss in fp32 (fp64 for fp64 input), plus :class:`GFTStats` when
        ``return_stats=True`` (stats of masked tokens are 0). Gradients flow to
        ``hidden``, ``weight`` and ``bias``; ``dW`` and ``db`` accumulate in fp32 across
        chunks. Memory: O(chunk_size x V) for the logits chunk plus the gradients.
    """
    _checks.check_float_tensor("hidden", hidden, dims=(2, 3))
    _checks.check_nonempty("hidden", hidden, "token and one hidden unit")
    _checks.check_float_tensor("weight", weight, dims=(2,))
    _checks.check_nonempty("weight", weight, "vocabulary row")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: expected shape (V, {hidden.shape[-1]}) (the lm_head layout, H from "
            f"hidden), got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected dtype {hidden.dtype} (as hidden), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: expected device {hidden.device}, got {weight.device}")
    vocab_size = weight.shape[0]
    if bias is not None:
        _checks.check_float_tensor("bias", bias, dims=(1,))
        if tuple(bias.shape) != (vocab_size,):
            raise ValueError(f"bias: expected shape ({vocab_size},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise TypeError(
                f"bias: expected {weight.dtype} on {weight.device}, got {bias.dtype} on "
                f"{bias.device}"
            )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    kernels, shard, batch = prepare_call(
        hidden,
        vocab_size,
        targets,
        advantages,
        mask,
        backend=backend,
        process_group=process_group,
        tau=tau,
        temperature=temperature,
        loss_agg_mode=loss_agg_mode,
        ignore_index=ignore_index,
        num_tokens=num_tokens,
        max_response_length=max_response_length,
        return_stats=return_stats,
    )
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    n_tokens = hidden_2d.shape[0]
    # Without stats, only tokens with a non-zero gradient reach the head; with stats,
    # every valid token does (their log-probs and entropies are wanted).
    keep = batch.valid if return_stats else batch.valid & (batch.advantages != 0)
    index = keep.nonzero().squeeze(1)
    kept = index.numel()
    chunk = chunk_size or default_chunk_size(max(kept, 1), vocab_size, hidden.device)
    weights = None if batch.loss_agg_mode == "none" else batch.weights[index]
    token_loss, logprobs, probs, entropy = FusedLinearGFTFunction.apply(
        hidden_2d.index_select(0, index),
        weight,
        bias,
        batch.targets[index],
        batch.advantages[index],
        batch.valid[index],
        weights,
        batch.tau,
        batch.temperature,
        kernels,
        chunk,
        return_stats,
        shard,
    )

    def scatter(values: torch.Tensor) -> torch.Tensor:
        full = values.new_zeros(n_tokens)
        return full.index_put((index,), values)

    if batch.loss_agg_mode == "none":
        loss = scatter(token_loss).reshape(batch.token_shape)
    else:
        loss = token_loss
    if not return_stats:
        return loss
    return loss, make_stats(batch, scatter(logprobs), scatter(probs), scatter(entropy))
