"""``gft_loss``: the fused GFT loss over logits."""

from __future__ import annotations

from typing import Literal, Optional, Tuple, Union, overload

import torch

from gft_kernels import _checks
from gft_kernels._prepare import make_stats, prepare_tokens, reduce_loss
from gft_kernels._token_loss_op import ShardedTokenLoss, TokenLossArgs, token_loss
from gft_kernels.stats import GFTStats


# The overloads type the result by return_stats (a bool variable: either); the
# implementation below holds the defaults, and is the signature seen at run time.
@overload
def gft_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = ...,
    *,
    tau: float = ...,
    temperature: float = ...,
    loss_agg_mode: str = ...,
    ignore_index: int = ...,
    num_tokens: Optional[float] = ...,
    max_response_length: Optional[int] = ...,
    return_stats: Literal[False] = ...,
    backend: str = ...,
    inplace_backward: bool = ...,
    process_group: Optional[object] = ...,
    logit_scale: float = ...,
    logit_softcap: Optional[float] = ...,
) -> torch.Tensor: ...


@overload
def gft_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = ...,
    *,
    tau: float = ...,
    temperature: float = ...,
    loss_agg_mode: str = ...,
    ignore_index: int = ...,
    num_tokens: Optional[float] = ...,
    max_response_length: Optional[int] = ...,
    return_stats: Literal[True],
    backend: str = ...,
    inplace_backward: bool = ...,
    process_group: Optional[object] = ...,
    logit_scale: float = ...,
    logit_softcap: Optional[float] = ...,
) -> Tuple[torch.Tensor, GFTStats]: ...


@overload
def gft_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = ...,
    *,
    tau: float = ...,
    temperature: float = ...,
    loss_agg_mode: str = ...,
    ignore_index: int = ...,
    num_tokens: Optional[float] = ...,
    max_response_length: Optional[int] = ...,
    return_stats: bool = ...,
    backend: str = ...,
    inplace_backward: bool = ...,
    process_group: Optional[object] = ...,
    logit_scale: float = ...,
    logit_softcap: Optional[float] = ...,
) -> Union[torch.Tensor, Tuple[torch.Tensor, GFTStats]]: ...


def gft_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    tau: float = 0.1,
    temperature: float = 1.0,
    loss_agg_mode: str = "token-mean",
    ignore_index: int = -100,
    num_tokens: Optional[float] = None,
    max_response_length: Optional[int] = None,
    return_stats: bool = False,
    backend: str = "auto",
    inplace_backward: bool = False,
    process_group: Optional[object] = None,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, GFTStats]]:
    """The GFT loss ``-A * c * log p`` over logits, in one chunked pass each way.

    Args:
        logits: ``(B, T, V)`` or ``(N, V)``, float32/bfloat16/float16 (float64 on the
            ``torch`` and ``cpu`` backends). Arithmetic is fp32 (fp64 for fp64 input).
        targets: int64 or int32, shaped like the leading dims of ``logits``;
            ``ignore_index`` (a value the targets' dtype holds) marks padding. Values
            are checked in the kernels (a target outside ``[0, V)`` raises
            ``ValueError``; on CUDA a device-side assert).
        advantages: ``(B,)`` per sequence (3-D logits only) or shaped like ``targets``.
        mask: optional 0/1 tensor (bool, integer or float) shaped like ``targets``.
        tau: DCR threshold, ``c = q if q <= tau else 1``; ``>= 0``.
        temperature: ``> 0``; ``log p`` is read from ``z / T``, ``q`` from ``z``. At
            least the smallest normal number of the arithmetic (``1.18e-38`` in fp32,
            ``2.2e-308`` for fp64 input), so that ``1 / T`` is finite.
        loss_agg_mode: ``token-mean``, ``seq-mean-token-sum``, ``seq-mean-token-mean``,
            ``seq-mean-token-sum-norm`` (3-D only for the ``seq-*`` modes), ``sum`` or
            ``none`` (per-token losses shaped like ``targets``).
        num_tokens: ``token-mean`` denominator (e.g. the global count under data
            parallelism), a number ``>= 0`` or a 1-element tensor (not read on the host,
            so it costs no synchronisation); default: the number of valid tokens. A
            token that carries no loss weighs 0 whatever the count, so 0 on a batch with
            no valid token gives a loss of 0 and zero gradients; 0 with valid tokens is
            a division by zero (a non-finite loss), as in the naive formula.
        max_response_length: ``seq-mean-token-sum-norm`` denominator; default ``T``.
        return_stats: also return a :class:`GFTStats` from the same pass.
        backend: ``auto`` (CUDA -> triton, CPU -> native C++ if it builds, else torch),
            ``triton``, ``cpu`` or ``torch``.
        inplace_backward: write the logits' gradient into the logits' own storage (saves
            one ``N x V`` buffer). The logits are overwritten by the backward pass, and
            autograd sees the write: another node that saved the same logits (e.g. a
            z-loss whose backward runs later) raises instead of reading gradients, and a
            second backward through the loss raises. Needs logits that require grad and
            whose elements do not overlap in memory. Under ``torch.no_grad()`` or
            ``inference_mode`` (no backward will run) the loss is computed as usual.
        process_group: vocab-parallel logits: ``logits`` holds this rank's contiguous
            block of vocabulary columns (blocks in rank order, any sizes); ``targets``
            are global ids and every other input is replicated. Statistics are combined
            with O(N) all-reduces; the gradient stays local.
        logit_scale: heads with a logit transform: ``z' = z * logit_scale``, or, with
            ``logit_softcap``, ``z' = cap * tanh(z * logit_scale / cap)`` (Gemma-2/3
            final-logit soft-capping), applied inside the kernels before everything else.
        logit_softcap: the soft-cap ``cap > 0``, or None.

    Returns:
        The loss (0-dim, or ``targets``-shaped for ``none``) in fp32 (fp64 for fp64
        logits), and the stats when ``return_stats=True``.
    """
    _checks.check_float_tensor("logits", logits, dims=(2, 3))
    _checks.check_nonempty("logits", logits, "token and one vocabulary entry")
    vocab_size = logits.shape[-1]
    _checks.check_bool("inplace_backward", inplace_backward)
    # Without grad mode no backward will run, so there is nothing to overwrite: an eval
    # loop with GFTLoss(inplace_backward=True), or the first forward of a reentrant
    # checkpoint (its recompute runs with grad mode on and writes in place).
    inplace_backward = inplace_backward and torch.is_grad_enabled()
    _checks.check_no_function_transform(
        "gft_kernels.gft_loss", (logits, targets, advantages, mask, num_tokens), inplace_backward
    )
    batch = prepare_tokens(
        logits,
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
    )
    logits_2d = logits.reshape(-1, vocab_size)
    if logits_2d.stride(-1) != 1:
        logits_2d = logits_2d.contiguous()
    if inplace_backward:
        _checks.check_inplace_logits(logits, logits_2d)
    args = TokenLossArgs(
        logits=logits_2d,
        targets=batch.targets,
        advantages=batch.advantages,
        mask=batch.mask,
        tokens_per_advantage=batch.tokens_per_advantage,
        params=batch.params,
        with_stats=return_stats,
        backend=batch.backend,
        inplace_backward=inplace_backward,
    )
    if process_group is None:
        token_loss_t, logprobs, probs, entropy, *_ = token_loss(*args.flat())
    else:
        from gft_kernels._vocab_parallel import vocab_shard

        shard = vocab_shard(process_group, vocab_size, logits.device)
        token_loss_t, logprobs, probs, entropy = ShardedTokenLoss.apply(logits_2d, args, shard)
    loss = reduce_loss(token_loss_t, batch)
    if not return_stats:
        return loss
    return loss, make_stats(batch, logprobs, probs, entropy)
