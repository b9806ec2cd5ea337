"""``gft_loss``: the fused GFT loss over logits."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from gft_kernels import _checks
from gft_kernels.function import GFTTokenLossFunction
from gft_kernels.stats import GFTStats
from gft_kernels.tokens import make_stats, prepare_call, reduce_loss


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
) -> Union[torch.Tensor, Tuple[torch.Tensor, GFTStats]]:
    """The GFT loss ``-A * c * log p`` over logits, in one chunked pass each way.

    Args:
        logits: ``(B, T, V)`` or ``(N, V)``, float32/bfloat16/float16 (float64 on the
            ``torch`` and ``cpu`` backends). Arithmetic is fp32 (fp64 for fp64 input).
        targets: int64, shaped like the leading dims of ``logits``; ``ignore_index``
            marks padding.
        advantages: ``(B,)`` per sequence (3-D logits only) or shaped like ``targets``.
        mask: optional 0/1 or bool tensor shaped like ``targets``.
        tau: DCR threshold, ``c = q if q <= tau else 1``; ``>= 0``.
        temperature: ``> 0``; ``log p`` is read from ``z / T``, ``q`` from ``z``.
        loss_agg_mode: ``token-mean``, ``seq-mean-token-sum``, ``seq-mean-token-mean``,
            ``seq-mean-token-sum-norm`` (3-D only for the ``seq-*`` modes), ``sum`` or
            ``none`` (per-token losses shaped like ``targets``).
        num_tokens: ``token-mean`` denominator (e.g. the global count under data
            parallelism); default: the number of valid tokens.
        max_response_length: ``seq-mean-token-sum-norm`` denominator; default ``T``.
        return_stats: also return a :class:`GFTStats` from the same pass.
        backend: ``auto`` (CUDA -> triton, CPU -> native C++ if it builds, else torch),
            ``triton``, ``cpu`` or ``torch``.
        inplace_backward: write the logits' gradient into the logits' own storage (saves
            one ``N x V`` buffer; the logits are destroyed by the backward pass).
        process_group: vocab-parallel logits: ``logits`` holds this rank's contiguous
            block of vocabulary columns (blocks in rank order, any sizes); ``targets``
            are global ids and every other input is replicated. Statistics are combined
            with O(N) all-reduces; the gradient stays local.

    Returns:
        The loss (0-dim, or ``targets``-shaped for ``none``) in fp32 (fp64 for fp64
        logits), and the stats when ``return_stats=True``.
    """
    _checks.check_float_tensor("logits", logits, dims=(2, 3))
    _checks.check_nonempty("logits", logits, "token and one vocabulary entry")
    vocab_size = logits.shape[-1]
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward: expected a bool, got {type(inplace_backward).__name__}")
    kernels, shard, batch = prepare_call(
        logits,
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
    logits_2d = logits.reshape(-1, vocab_size)
    if logits_2d.stride(-1) != 1:
        logits_2d = logits_2d.contiguous()
    token_loss, logprobs, probs, entropy = GFTTokenLossFunction.apply(
        logits_2d,
        batch.targets,
        batch.advantages,
        batch.valid,
        batch.tau,
        batch.temperature,
        kernels,
        return_stats,
        inplace_backward,
        shard,
    )
    loss = reduce_loss(token_loss, batch)
    if not return_stats:
        return loss
    return loss, make_stats(batch, logprobs, probs, entropy)
