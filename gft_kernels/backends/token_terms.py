"""The per-token GFT objective in plain PyTorch: the specification every kernel is tested
against.

From each row's statistics (``m``, ``S``, ``S_1``, ``W`` and ``z'_y``, see
:class:`~gft_kernels.backends.base.PartialStats`) everything per token follows in O(N)
work, in these steps:

1. the data checks (:func:`value_flags`, :func:`raise_for_flags`);
2. the token inputs: flags -> valid -> per-token advantages -> local targets
   (:func:`token_targets`);
3. the row statistics, of one block of columns or of several combined exactly
   (:func:`combine_partials`: the column segments of one row, or vocab shards on ranks);
4. the per-token terms (:func:`token_terms`): ``log p``, ``q`` and the entropy, then the
   objective's loss and its gradient factor ``scale = -d loss / d log p`` (:class:`GFT`:
   ``-A c log p`` and ``A c``);
5. the row gradient, which multiplies ``scale`` (``RowBackend.row_grad``).

:func:`token_pass_from_statistics` is those steps, once: the chunked-PyTorch backend, the
Triton pass over column segments, the vocab-parallel path and a custom
:class:`Objective` (``gft_kernels.objective``) all run it. The fused kernels compute the
same math inside their row pass: the fast path for the built-in GFT objective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from gft_kernels.backends.base import (
    PartialStats,
    RowBackend,
    RowParams,
    TokenInputs,
    TokenPass,
    TokenPassCall,
)

SYNC_CHECKS_ENV = "GFT_KERNELS_SYNC_CHECKS"

# Bits of the per-token error flags written by the kernels' data checks.
BAD_TARGET = 1
BAD_MASK = 2
BAD_ADVANTAGE = 4


def transform_logits(z: Tensor, params: RowParams) -> Tensor:
    """``z' = cap * tanh(z * scale / cap)`` (or ``z * scale``), in place on a private copy."""
    if params.logit_softcap is not None:
        return z.mul_(params.softcap_slope).tanh_().mul_(params.logit_softcap)
    if params.logit_scale != 1.0:
        return z.mul_(params.logit_scale)
    return z


def transform_slope(z_transformed: Tensor, params: RowParams) -> Tensor:
    """``dz'/dz`` as a function of ``z'``: ``scale * (1 - (z' / cap)^2)`` or ``scale``."""
    if params.logit_softcap is None:
        return torch.full_like(z_transformed, params.logit_scale)
    t = z_transformed / params.logit_softcap
    return (1.0 - t * t).mul_(params.logit_scale)


# --- 1. data checks ------------------------------------------------------------------


def value_flags(tokens: TokenInputs, vocab_size: int, ignore_index: int) -> Tensor:
    """The kernels' data checks in PyTorch: int32 ``(N,)`` flags (0 where fine)."""
    targets = tokens.targets
    bad_target = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    flags = bad_target.to(torch.int32) * BAD_TARGET
    if tokens.mask is not None:
        flags |= ((tokens.mask != 0) & (tokens.mask != 1)).to(torch.int32) * BAD_MASK
    bad_adv = ~torch.isfinite(tokens.advantages)
    if tokens.tokens_per_advantage > 1:
        bad_adv = bad_adv.repeat_interleave(tokens.tokens_per_advantage)
    flags |= bad_adv.to(torch.int32) * BAD_ADVANTAGE
    return flags


def _first(host_flags, bit: int) -> int:
    return int((host_flags & bit).nonzero()[0][0])


def raise_for_flags(
    flags: Tensor,
    targets: Tensor,
    mask: Optional[Tensor],
    advantages: Tensor,
    tokens_per_advantage: int,
    vocab_size: int,
    ignore_index: int,
) -> None:
    """Turn the kernels' error flags into the library's ``ValueError``.

    On CUDA this is a device-side assert (no host synchronisation; the message is fixed,
    and the CUDA context is lost afterwards, as with any device assert). With
    ``GFT_KERNELS_SYNC_CHECKS=1`` the flags are copied to the host instead (one sync) and a
    ``ValueError`` names the first offending value, as it does on the CPU, where the flags
    are read from host memory directly (no dispatch, no copy).
    """
    targets_msg = f"targets: expected values in [0, {vocab_size}) or ignore_index={ignore_index}"
    if flags.device.type != "cpu" and os.environ.get(SYNC_CHECKS_ENV, "0") not in ("", "0"):
        flags, targets, advantages = flags.cpu(), targets.cpu(), advantages.cpu()
        mask = None if mask is None else mask.cpu()
    if flags.device.type != "cpu":
        for bit, what in (
            (BAD_TARGET, targets_msg + ", got a value outside"),
            (BAD_MASK, "mask: expected 0/1 values, got another value"),
            (BAD_ADVANTAGE, "advantages: expected finite values, got NaN or inf"),
        ):
            torch._assert_async((flags & bit).eq(0).all(), what)
        return
    host = flags.numpy()
    if not host.any():
        return
    if (host & BAD_TARGET).any():
        row = _first(host, BAD_TARGET)
        raise ValueError(f"{targets_msg}, got {int(targets.numpy()[row])} (token {row})")
    if (host & BAD_MASK).any():
        row = _first(host, BAD_MASK)
        value = mask.float().numpy()[row] if mask.dtype != torch.float32 else mask.numpy()[row]
        raise ValueError(f"mask: expected 0/1 values, got {float(value)} (token {row})")
    row = _first(host, BAD_ADVANTAGE) // tokens_per_advantage
    raise ValueError(
        f"advantages: expected finite values, got {float(advantages.numpy()[row])} (entry {row})"
    )


def check_token_values(
    tokens: TokenInputs, vocab_size: int, ignore_index: int, *, host: bool
) -> None:
    """The data checks of a pass. ``host``: read the flags on the host (one sync), so that
    a bad value raises ``ValueError`` on any device; else :func:`raise_for_flags` as the
    kernels use it (a device-side assert on CUDA, no sync)."""
    flags = value_flags(tokens, vocab_size, ignore_index)
    if host:
        if not bool(flags.any()):
            return
        mask = None if tokens.mask is None else tokens.mask.cpu()
        tokens = TokenInputs(
            tokens.targets.cpu(), tokens.advantages.cpu(), mask, tokens.tokens_per_advantage
        )
        flags = flags.cpu()
    raise_for_token_flags(flags, tokens, vocab_size, ignore_index)


def raise_for_token_flags(
    flags: Tensor, tokens: TokenInputs, vocab_size: int, ignore_index: int
) -> None:
    """:func:`raise_for_flags` for the token inputs of a pass."""
    raise_for_flags(
        flags,
        tokens.targets,
        tokens.mask,
        tokens.advantages,
        tokens.tokens_per_advantage,
        vocab_size,
        ignore_index,
    )


# --- 2. token inputs -------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnBlock:
    """The vocabulary columns ``[offset, offset + size)`` a pass reads, of ``total``."""

    offset: int
    size: int
    total: int

    @classmethod
    def whole(cls, vocab_size: int) -> ColumnBlock:
        return cls(0, vocab_size, vocab_size)


@dataclass(frozen=True)
class TokenTargets:
    """What the terms need of the token inputs, all ``(N,)``: ``valid`` (bool: unmasked and
    not ``ignore_index``), per-token ``advantages`` and ``local`` (int64: the target's
    column in the block read, -1 where it lives elsewhere or the token is invalid)."""

    valid: Tensor
    advantages: Tensor
    local: Tensor


def token_targets(tokens: TokenInputs, ignore_index: int, columns: ColumnBlock) -> TokenTargets:
    """flags -> valid -> per-token advantages -> local targets (after the data checks)."""
    valid = tokens.targets != ignore_index
    if tokens.mask is not None:
        valid = valid & (tokens.mask != 0)
    advantages = tokens.advantages
    if tokens.tokens_per_advantage > 1:
        advantages = advantages.repeat_interleave(tokens.tokens_per_advantage)
    local = tokens.targets.long() - columns.offset
    here = valid & (local >= 0) & (local < columns.size)
    return TokenTargets(valid, advantages, torch.where(here, local, torch.full_like(local, -1)))


# --- 3. row statistics of blocks of columns ----------------------------------------------


def combine_partials(part, params: RowParams, *, reduce_max, reduce_sum):
    """Exact row summary ``(M, S, S_1, W, z_y)`` of rows split into blocks of columns.

    ``part`` holds per-block statistics (a ``PartialStats``); ``reduce_max``/``reduce_sum``
    combine them across blocks (a reduction over the last dim for blocks of one row, or an
    all-reduce for blocks on different ranks). With ``M = max_r m_r`` and
    ``d_r = (m_r - M) / T``: ``S = sum_r S_r exp(d_r)``, ``W = sum_r exp(d_r) (W_r + d_r S_r)``;
    ``z_y`` comes from the one block that holds the target (the others hold 0).
    """
    row_max = reduce_max(part.row_max)
    # A block of -inf has m_r = -inf: its factor is exp(-inf) = 0. A row that is -inf in
    # every block keeps M = -inf; shifting by 0 then avoids -inf - -inf.
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    delta_1 = part.row_max - shift
    delta_t = delta_1 * params.inv_temperature
    factor_t = torch.exp(delta_t)
    sums = [part.sum_exp * factor_t, part.sum_exp_1 * torch.exp(delta_1), part.target_logit]
    if part.weighted is not None:
        live = factor_t > 0  # d_r = -inf on an all -inf block: its W_r term is 0, not NaN
        sums.append(torch.where(live, factor_t * (part.weighted + delta_t * part.sum_exp), 0.0))
    total = reduce_sum(torch.stack(sums))
    weighted = total[3] if part.weighted is not None else None
    return row_max, total[0], total[1], weighted, total[2]


class BlockReduce(NamedTuple):
    """How :func:`combine_partials` combines blocks: ``max`` of the references, ``sum`` of
    the stacked sums (``(k, N, ...)``)."""

    max: Callable[[Tensor], Tensor]
    sum: Callable[[Tensor], Tensor]


# The column segments of one row, held along the statistics' last dim.
SEGMENTS = BlockReduce(lambda x: x.amax(-1, keepdim=True), lambda stacked: stacked.sum(-1))

# ``statistics(local_targets, rows)``: the :class:`PartialStats` of the rows ``rows``
# (int64 indices; None: every row), with ``weighted`` when stats are asked for.
Statistics = Callable[[Tensor, Optional[Tensor]], PartialStats]


def _scatter_rows(part: PartialStats, rows: Tensor, n_rows: int) -> PartialStats:
    """Statistics of the rows read, placed among rows that were not: ``m = 0``, ``S = 1``."""

    def place(values: Tensor, fill: float) -> Tensor:
        full = torch.full((n_rows,), fill, dtype=values.dtype, device=values.device)
        full[rows] = values
        return full

    weighted = None if part.weighted is None else place(part.weighted, 0.0)
    return PartialStats(
        place(part.row_max, 0.0),
        place(part.sum_exp, 1.0),
        place(part.sum_exp_1, 1.0),
        weighted,
        place(part.target_logit, 0.0),
    )


# --- 4. the objective ------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectiveInputs:
    """What an :class:`Objective` reads per token, all ``(N,)`` in the accumulate dtype.

    ``logprobs`` is ``log p`` (at temperature ``T``), ``probs`` the DCR probability ``q``
    (at temperature 1), ``advantages`` one per token; ``valid`` (bool) marks the tokens that
    may carry loss: unmasked, not ``ignore_index``, chosen by
    :meth:`Objective.carries_loss`, in a row whose max is finite or that holds a NaN
    (``logprobs`` is ``-inf`` and ``probs`` 0 on the other valid tokens, both 0 on invalid
    ones). ``params`` holds ``tau``, the temperature and the logit transform; ``extra`` the
    objective's own per-token tensors, by the names of :attr:`Objective.extra_inputs`.
    """

    logprobs: Tensor
    probs: Tensor
    advantages: Tensor
    valid: Tensor
    params: RowParams
    extra: Mapping[str, Tensor]


class Objective:
    """A per-token objective: the seam for a loss variant (``docs/loss_variants.md``).

    Called with :class:`ObjectiveInputs`, it returns ``(loss, scale)``, both ``(N,)``:
    the per-token loss and ``scale = -d loss / d log p``, the coefficient the row gradient
    multiplies (``d loss / dz = scale / T * (softmax(z' / T) - onehot(y)) * dz'/dz``); both
    0 where ``valid`` is False. Gradients reach the logits through ``log p`` only: ``q``,
    the advantages and the extra inputs are constants.
    """

    # Names of the extra per-token tensors the objective reads (``ObjectiveInputs.extra``).
    extra_inputs: Tuple[str, ...] = ()

    def carries_loss(self, valid: Tensor, advantages: Tensor) -> Tensor:
        """The tokens whose rows a pass without stats must read (bool ``(N,)``); the rest
        get ``loss = scale = 0`` without being read. Default: every valid token."""
        return valid

    def __call__(self, inputs: ObjectiveInputs) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not implement __call__")


def dcr_coefficient(probs: Tensor, tau: float) -> Tensor:
    """``c = q if q <= tau else 1`` (no gradient flows through it). ``q`` is compared in
    its own dtype with ``tau`` rounded to it, as a tensor-scalar comparison does;
    ``NaN <= tau`` is false, so a row holding a NaN takes ``c = 1``."""
    return torch.where(probs <= tau, probs, torch.ones_like(probs))


class GFT(Objective):
    """The built-in objective, ``loss = -A c log p`` with ``scale = A c``
    (``docs/design.md``, section 1); the fused kernels compute exactly this in their row
    pass. A zero advantage carries no loss, so its rows are not read without stats."""

    def carries_loss(self, valid: Tensor, advantages: Tensor) -> Tensor:
        return valid & (advantages != 0)

    def __call__(self, inputs: ObjectiveInputs) -> Tuple[Tensor, Tensor]:
        dcr = dcr_coefficient(inputs.probs, inputs.params.tau)
        scale = torch.where(inputs.valid, inputs.advantages * dcr, torch.zeros_like(dcr))
        # Exactly 0 where scale is 0, even where log p = -inf.
        loss = torch.where(scale != 0, -scale * inputs.logprobs, torch.zeros_like(scale))
        return loss, scale


GFT_OBJECTIVE = GFT()


def token_terms(
    row_max: Tensor,
    sum_exp: Tensor,
    sum_exp_1: Tensor,
    weighted: Optional[Tensor],
    target_logit: Tensor,
    valid: Tensor,
    advantages: Tensor,
    params: RowParams,
    objective: Objective = GFT_OBJECTIVE,
    extra: Optional[Mapping[str, Tensor]] = None,
) -> Tuple[Tensor, ...]:
    """``(loss, logprobs, probs, entropy, scale)`` per token, all ``(N,)``.

    ``log p = (z'_y - m) / T - log S``, ``q = exp(z'_y - m) / S_1``, then the objective's
    ``(loss, scale)`` (:class:`GFT`: ``c = q if q <= tau else 1``, ``scale = A c`` on
    valid tokens of live rows, ``loss = -scale * log p``, exactly 0 where ``scale`` is 0).

    A row holding a NaN has ``S = NaN`` (every backend's sums pass NaN on, while their max
    may skip it): it stays live, so its ``log p``, ``q`` and entropy are NaN, ``c = 1`` and
    a token that carries loss gets a NaN loss and gradient. A row without NaN whose max is
    not finite (all ``-inf``, or a ``+inf`` entry) carries no loss and no gradient; its
    ``log p`` is ``-inf`` and ``q``, entropy are 0.
    """
    finite = torch.isfinite(row_max)
    # Decided from S alone: the max of a row with a NaN may be NaN, -inf or a number,
    # depending on how the backend's max treats NaN.
    poisoned = torch.isnan(sum_exp)
    shift = torch.where(finite, row_max, torch.zeros_like(row_max))
    log_sum = torch.log(sum_exp)
    live_row = finite | poisoned
    live = valid & live_row
    logprobs = (target_logit - shift) * params.inv_temperature - log_sum
    logprobs = torch.where(live, logprobs, torch.where(valid, -float("inf"), 0.0))
    probs = torch.exp(target_logit - shift) / sum_exp_1
    probs = torch.where(live, probs, torch.zeros_like(probs))
    inputs = ObjectiveInputs(logprobs, probs, advantages, live, params, extra or {})
    loss, scale = objective(inputs)
    entropy = None
    if weighted is not None:
        entropy = torch.where(live_row, log_sum - weighted / sum_exp, torch.zeros_like(log_sum))
    return loss, logprobs, probs, entropy, scale


# --- all steps ---------------------------------------------------------------------------


def token_pass_from_statistics(
    backend: RowBackend,
    call: TokenPassCall,
    *,
    statistics: Optional[Statistics] = None,
    reduce: Optional[BlockReduce] = None,
    columns: Optional[ColumnBlock] = None,
    host_checks: bool = True,
    compact: bool = False,
    objective: Objective = GFT_OBJECTIVE,
    extra: Optional[Mapping[str, Tensor]] = None,
) -> Tuple[TokenPass, Tensor]:
    """``RowBackend.token_pass`` from row statistics: the data checks, the token inputs,
    the statistics, the per-token terms of ``objective`` and, when ``call`` asks for it,
    the row gradient (``backend.row_grad``). Returns the pass and the local targets
    (``(N,)`` int64) that ``row_grad`` takes for this block.

    ``statistics`` gives the row statistics (default: ``backend.partial_stats`` of the
    rows of ``call.logits`` as one block); ``reduce`` combines blocks exactly
    (:func:`combine_partials`: :data:`SEGMENTS` for the column segments of one row,
    all-reduces for vocab shards); ``columns`` is the block of the vocabulary
    ``call.logits`` holds (default: all of it). ``host_checks``: see
    :func:`check_token_values`. ``compact``: without stats, only the rows that carry loss
    are passed to ``statistics`` (found with ``nonzero``, a host sync); the others get
    ``m = 0``, ``S = 1`` and zero terms. ``extra`` holds the objective's per-token tensors.
    """
    logits, params, with_stats = call.logits, call.params, call.with_stats
    columns = columns or ColumnBlock.whole(logits.shape[1])
    check_token_values(call.tokens, columns.total, params.ignore_index, host=host_checks)
    inputs = token_targets(call.tokens, params.ignore_index, columns)
    active = inputs.valid
    if not with_stats:
        active = objective.carries_loss(inputs.valid, inputs.advantages)
    if statistics is None:

        def statistics(local: Tensor, rows: Optional[Tensor]) -> PartialStats:
            if rows is not None:
                logits_read, local = logits.index_select(0, rows), local[rows]
            else:
                logits_read = logits
            return backend.partial_stats(logits_read, local, params, with_entropy=with_stats)

    rows = active.nonzero().reshape(-1) if compact and not with_stats else None
    part = statistics(inputs.local, rows)
    if reduce is not None:
        part = PartialStats(
            *combine_partials(part, params, reduce_max=reduce.max, reduce_sum=reduce.sum)
        )
    if rows is not None:
        part = _scatter_rows(part, rows, logits.shape[0])
    # A reduction over column segments keeps the reference's last dim.
    row_max, sum_exp = part.row_max.reshape(-1), part.sum_exp.contiguous()
    loss, logprobs, probs, entropy, scale = token_terms(
        row_max,
        sum_exp,
        part.sum_exp_1,
        part.weighted,
        part.target_logit,
        active,
        inputs.advantages,
        params,
        objective,
        extra,
    )
    if call.grad_out is not None:
        backend.row_grad(
            logits, inputs.local, row_max, sum_exp, call.grad_weights, scale, params, call.grad_out
        )
    return TokenPass(loss, logprobs, probs, entropy, row_max, sum_exp, scale), inputs.local
