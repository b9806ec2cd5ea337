"""Head strategies of the fused linear loss: how ``h W^T (+ b)`` meets the row pass.

``chunked`` (today's only strategy): tokens are processed in chunks; per chunk the
logits ``h_c W^T (+ b)`` are formed, one fused row pass turns them into per-token losses
and, in the same buffer and the same launch, into the logits-gradient ``G_c``; then
``dh_c = G_c W`` and ``dW += G_c^T h_c``. Memory: one ``chunk x V`` buffer plus the
gradients, never ``N x V``.

``blockwise`` (:mod:`gft_kernels._head_blockwise`; Triton): logit tiles are formed with
``tl.dot`` and folded into per-token statistics in registers, then recomputed for the
gradients; no ``chunk x V`` buffer exists. ``blockwise_exact`` is the same without
gradient filtering. Every strategy takes the arguments of :func:`chunked_head`; the
public function, the custom op and the autograd formula above them are shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from gft_kernels._vocab_parallel import ShardedRows, VocabShard
from gft_kernels.backends import RowBackend, RowParams
from gft_kernels.backends.base import TokenInputs
from gft_kernels.backends.token_terms import value_flags
from gft_kernels.backends.torch_rows import accumulate_dtype

# Bytes of one chunk's logits (plus their fp32 copy where dW needs one) when chunk_size is
# not given: large enough for efficient matmuls and few re-reads of the fp32 dW (each chunk
# adds its product into it), small enough that the head's memory stays of the order of
# dW's. On a Qwen2.5-0.5B head at N=2048 on CPU, 256 and 512 MiB measured 1.07x-1.10x the
# unchunked GEMMs, within noise of each other, 1 GiB 1.06x at twice the chunk memory
# (python -m benchmarks.chunk_budget).
_CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 512 << 20}


@dataclass
class HeadInputs:
    """Token inputs of one fused-linear call, ``(N, ...)`` each (see ``TokenBatch``)."""

    hidden: torch.Tensor  # (N, H)
    weight: torch.Tensor  # (V_local, H)
    bias: Optional[torch.Tensor]  # (V_local,)
    targets: torch.Tensor  # (N,) int64/int32, ignore_index kept
    advantages: torch.Tensor  # (N // tokens_per_advantage,) accumulate dtype
    tokens_per_advantage: int
    mask: Optional[torch.Tensor]  # (N,) uint8/float32
    params: RowParams


@dataclass
class HeadOutputs:
    """Per-token outputs ``(N,)`` and the gradients asked for (None otherwise)."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    probs: torch.Tensor
    entropy: Optional[torch.Tensor]
    grad_hidden: Optional[torch.Tensor]
    grad_weight: Optional[torch.Tensor]  # accumulated in fp32 (fp64 for fp64)
    grad_bias: Optional[torch.Tensor]


def upcasts_for_dw(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether dW of a reduced-precision head needs an fp32 copy of each chunk: CUDA
    accumulates in fp32 inside the GEMM (``out_dtype``), the CPU GEMM cannot."""
    return dtype in (torch.bfloat16, torch.float16) and device.type != "cuda"


def default_chunk_size(
    n_tokens: int, vocab_size: int, dtype: torch.dtype, device: torch.device
) -> int:
    per_row = vocab_size * (
        torch.finfo(dtype).bits // 8 + (4 if upcasts_for_dw(dtype, device) else 0)
    )
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cpu"])
    return max(1, min(max(n_tokens, 1), budget // per_row))


def _logits_chunk(
    h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor
) -> torch.Tensor:
    if bias is not None:
        return torch.addmm(bias, h, weight.t(), out=out)
    return torch.mm(h, weight.t(), out=out)


_CUDA_OUT_DTYPE_OK = True


def _accumulate_dw(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, first: bool) -> None:
    """``grad_w += g^T h`` (``grad_w = g^T h`` for the ``first`` chunk: the buffer is
    not zero-filled first, and ``beta = 0`` never reads it) with the sum kept in
    ``grad_w``'s precision (fp32 for 16-bit heads): no chunk's partial product is rounded
    to 16 bits, and no ``V x H`` temporary is allocated per chunk."""
    global _CUDA_OUT_DTYPE_OK
    beta = 0.0 if first else 1.0
    if g.dtype == grad_w.dtype:
        grad_w.addmm_(g.t(), h, beta=beta)
        return
    if g.is_cuda and _CUDA_OUT_DTYPE_OK:
        try:
            torch.addmm(grad_w, g.t(), h, beta=beta, out_dtype=grad_w.dtype, out=grad_w)
            return
        except (RuntimeError, TypeError):  # an older torch without the fp32-output GEMM
            _CUDA_OUT_DTYPE_OK = False
    grad_w.addmm_(g.t().to(grad_w.dtype), h.to(grad_w.dtype), beta=beta)


def must_not_sync(device: torch.device) -> bool:
    """Whether the head must run without a host synchronisation (no token compaction):
    while ``torch.compile`` traces the call (compiled graphs are meant to run ahead of the
    host, and ``mode="reduce-overhead"`` replays them as CUDA graphs), or while the current
    stream of ``device`` is being captured into a CUDA graph, where a sync fails the
    capture."""
    if torch.compiler.is_compiling():
        return True
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _carries_loss(
    targets: torch.Tensor,
    per_token_adv: torch.Tensor,
    mask: Optional[torch.Tensor],
    ignore_index: int,
) -> torch.Tensor:
    keep = (targets != ignore_index) & (per_token_adv != 0)
    if mask is not None:
        keep &= mask != 0
    return keep


def _compact_index(inputs: HeadInputs, per_token_adv: torch.Tensor, vocab: int) -> torch.Tensor:
    """Tokens that can carry loss, plus any holding a bad value (so that the kernels still
    see and report it); the call's one host synchronisation."""
    p = inputs.params
    keep = _carries_loss(inputs.targets, per_token_adv, inputs.mask, p.ignore_index)
    tokens = TokenInputs(inputs.targets, per_token_adv, inputs.mask, 1)
    bad = value_flags(tokens, vocab, p.ignore_index)
    return (keep | (bad != 0)).nonzero().squeeze(1)


@dataclass
class KeptTokens:
    """The tokens a head computes: all of them, or (compacted) those that can carry loss,
    ``index`` then holding their rows among the call's ``n_tokens``. ``advantages`` is one
    per token; ``weights`` the kept ``grad_weights`` (None: none given)."""

    hidden: torch.Tensor
    targets: torch.Tensor
    advantages: torch.Tensor
    mask: Optional[torch.Tensor]
    weights: Optional[torch.Tensor]
    index: Optional[torch.Tensor]
    n_tokens: int

    def scatter(self, values: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Per-kept-token ``values`` (``(kept, ...)``) back among all tokens, 0 elsewhere."""
        if values is None or self.index is None:
            return values
        full = values.new_zeros((self.n_tokens, *values.shape[1:]))
        return full.index_copy_(0, self.index, values)


def keep_tokens(
    inputs: HeadInputs,
    grad_weights: Optional[torch.Tensor],
    *,
    compact: bool,
    with_stats: bool,
    vocab: int,
) -> KeptTokens:
    """The token inputs a head runs on: every token, or when ``compact`` (without stats,
    and unless :func:`must_not_sync`) only those that can carry loss (one host sync)."""
    hidden, targets, mask, weights = inputs.hidden, inputs.targets, inputs.mask, grad_weights
    n_tokens = hidden.shape[0]
    adv = inputs.advantages
    if inputs.tokens_per_advantage > 1:
        adv = adv.repeat_interleave(inputs.tokens_per_advantage)
    index = None
    if compact and not with_stats and not must_not_sync(hidden.device):
        index = _compact_index(inputs, adv, vocab)
        hidden, targets, adv = hidden.index_select(0, index), targets[index], adv[index]
        mask = None if mask is None else mask[index]
        weights = None if weights is None else weights[index]
    return KeptTokens(hidden, targets, adv, mask, weights, index, n_tokens)


def chunked_head(
    rows: RowBackend,
    inputs: HeadInputs,
    *,
    grad_weights: Optional[torch.Tensor],
    need_grads: Tuple[bool, bool, bool],
    with_stats: bool,
    compact: bool,
    chunk_size: Optional[int],
    shard: Optional[VocabShard],
) -> HeadOutputs:
    """The chunked head. With ``grad_weights`` (``(N,)``: ``w_t``, or the upstream
    gradient per token) the gradients in ``need_grads`` (hidden, weight, bias) are
    computed in the same pass; rows that carry no loss are skipped when ``compact``
    (unless :func:`must_not_sync`)."""
    weight, bias = inputs.weight, inputs.bias
    acc = accumulate_dtype(inputs.hidden.dtype)
    vocab = weight.shape[0] if shard is None else shard.total
    tokens = keep_tokens(inputs, grad_weights, compact=compact, with_stats=with_stats, vocab=vocab)
    hidden, targets, adv, mask = tokens.hidden, tokens.targets, tokens.advantages, tokens.mask
    weights, index = tokens.weights, tokens.index
    kept = hidden.shape[0]
    want = weights is not None and any(need_grads)
    need_h, need_w, need_b = need_grads if want else (False, False, False)
    grad_h = torch.empty_like(hidden) if need_h else None
    # Written by the first chunk's product (zero-filled only when there is no chunk).
    grad_w = None
    if need_w:
        make = torch.empty if kept > 0 else torch.zeros
        grad_w = make(weight.shape, dtype=acc, device=weight.device)
    grad_b = None
    if need_b and bias is not None:
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device)
    # A token that carries no loss has a zero gradient row, but 0 * NaN = NaN: a NaN or inf
    # in its hidden state would still reach every entry of dW = G^T h. Where such tokens
    # were not dropped, their hidden rows are zeroed per chunk for that product only: a
    # chunk x H copy (1/V of the product's work), with no value read on the host.
    idle = None
    if grad_w is not None and index is None:
        idle = ~_carries_loss(targets, adv, mask, inputs.params.ignore_index).unsqueeze(1)

    if shard is not None:  # the same pass, its statistics combined across the ranks
        rows = ShardedRows(rows, shard)
    step = chunk_size or default_chunk_size(kept, weight.shape[0], hidden.dtype, hidden.device)
    n_chunks = -(-kept // step)
    if chunk_size is None and n_chunks:  # as few chunks as the budget allows, equal (+-1)
        bounds = [kept * i // n_chunks for i in range(n_chunks + 1)]
    else:
        bounds = [min(i * step, kept) for i in range(n_chunks + 1)]
    # One chunk buffer serves every chunk: a fresh one per chunk would fault in its pages
    # again each time (the CPU allocator returns large blocks to the system).
    largest = max((b - a for a, b in zip(bounds, bounds[1:])), default=0)
    buffer = hidden.new_empty(largest, weight.shape[0])
    parts = []
    for start, stop in zip(bounds, bounds[1:]):
        sl = slice(start, stop)
        h = hidden[sl]
        logits = _logits_chunk(h, weight, bias, buffer[: stop - start])
        chunk_mask = None if mask is None else mask[sl]
        out = rows.token_pass(
            logits,
            targets[sl],
            adv[sl],
            chunk_mask,
            inputs.params,
            tokens_per_advantage=1,
            with_stats=with_stats,
            grad_weights=weights[sl] if want else None,
            grad_out=logits if want else None,
        )
        parts.append((out.loss, out.logprobs, out.probs, out.entropy))
        if want:
            if grad_h is not None:
                torch.mm(logits, weight, out=grad_h[sl])
            if grad_w is not None:
                h_dw = h if idle is None else h.masked_fill(idle[sl], 0)
                _accumulate_dw(grad_w, logits, h_dw, first=start == 0)
            if grad_b is not None:
                grad_b.add_(logits.sum(0, dtype=grad_b.dtype))
        del logits
    del buffer

    def gather(i: int) -> Optional[torch.Tensor]:
        if i == 3 and not with_stats:
            return None
        values = torch.cat([p[i] for p in parts]) if parts else hidden.new_empty(0, dtype=acc)
        return tokens.scatter(values)

    if grad_h is not None and shard is not None:
        import torch.distributed as dist

        dist.all_reduce(grad_h, group=shard.group)  # dh = sum_r G_r W_r
    grad_h = tokens.scatter(grad_h)
    return HeadOutputs(gather(0), gather(1), gather(2), gather(3), grad_h, grad_w, grad_b)


def blockwise_head(*args, **kwargs) -> HeadOutputs:
    """The blockwise head (:mod:`gft_kernels._head_blockwise`, imported on first use: it
    loads Triton)."""
    from gft_kernels._head_blockwise import blockwise_head as run

    return run(*args, **kwargs)


def blockwise_exact_head(*args, **kwargs) -> HeadOutputs:
    """The blockwise head without gradient filtering."""
    return blockwise_head(*args, filter_gradients=False, **kwargs)


HEAD_STRATEGIES: Dict[str, Callable[..., HeadOutputs]] = {
    "chunked": chunked_head,
    "blockwise": blockwise_head,
    "blockwise_exact": blockwise_exact_head,
}
