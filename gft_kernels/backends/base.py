"""The row-kernel contract every backend implements, written once.

A backend turns rows of logits into the per-token GFT quantities and, on request, into the
gradient of the loss with respect to those logits. Three primitives cover every public path
(logits-level, fused linear head, vocab-parallel shards):

* ``token_pass``: one pass over each row producing every per-token quantity of the loss
  (and, when ``grad_weights``/``grad_out`` are given, the gradient in the same launch);
* ``partial_stats``: the row statistics of a block of vocabulary columns only, for heads
  sharded across ranks (the blocks are combined with O(N) all-reduces, then
  :func:`gft_kernels.backends.token_terms.token_pass_from_statistics` finishes the job);
* ``row_grad``: the gradient of rows whose statistics are known.

Numerics shared by all backends (this is what makes them agree bit-for-bit in the cases
that matter): with ``z'`` the transformed logits (soft-cap / scale), ``m = max_v z'_v``
and ``x_v = (z'_v - m) / T``, a row is summarised by ``m`` and ``S = sum_v exp(x_v)``
(never by a rounded ``lse = m / T + log S``). The softmax is ``exp(x_v) / S`` in the
forward and the backward alike, so no product is ever fused with a rounded ``lse``: a
certain token (``x = 0`` and ``S = 1``) gets a gradient of exactly 0 at any temperature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# The smallest inverse temperature the fp32 kernels use: 1 / T below it would flush to 0
# and turn (-inf) * 0 into NaN; such a temperature is uniform to fp32 precision anyway.
MIN_INV_TEMPERATURE = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class RowParams:
    """Scalar options of a row pass, checked by the public functions."""

    tau: float
    temperature: float
    logit_scale: float = 1.0
    logit_softcap: Optional[float] = None
    ignore_index: int = -100

    @property
    def inv_temperature(self) -> float:
        return max(1.0 / self.temperature, MIN_INV_TEMPERATURE)

    @property
    def unit_temperature(self) -> bool:
        return self.temperature == 1.0

    @property
    def transforms_logits(self) -> bool:
        return self.logit_softcap is not None or self.logit_scale != 1.0

    @property
    def softcap_slope(self) -> float:
        """``scale / cap``: the soft-capped logit is ``cap * tanh(z * scale / cap)``."""
        assert self.logit_softcap is not None
        return self.logit_scale / self.logit_softcap


@dataclass
class TokenPass:
    """Per-token outputs of :meth:`RowBackend.token_pass`, all ``(N,)`` in the accumulate
    dtype (fp64 for fp64 logits, else fp32).

    ``loss`` is ``-A c log p`` (exactly 0 where ``scale`` is 0); ``scale`` is ``A c`` on
    tokens that carry loss and 0 elsewhere; ``row_max``/``sum_exp`` are the row summary
    ``m`` and ``S = sum exp((z' - m) / T)`` the backward reads (``m`` a reference as in
    :class:`PartialStats`: the row's max, or near ``T`` times its tempered logsumexp).
    ``logprobs``/``probs`` are 0 on invalid tokens; ``entropy`` is None unless stats were
    requested.
    """

    loss: torch.Tensor
    logprobs: torch.Tensor
    probs: torch.Tensor
    entropy: Optional[torch.Tensor]
    row_max: torch.Tensor
    sum_exp: torch.Tensor
    scale: torch.Tensor


@dataclass
class PartialStats:
    """Statistics of one block of vocabulary columns per row, all ``(N,)``.

    ``row_max`` is the block's reference ``m_r``: its max (``-inf`` for a block of
    ``-inf``), or on the Triton path's fixed-reference loops (16-bit soft-capped logits at
    T != 1) a point within ``T log 2`` of ``T`` times the block's tempered logsumexp, so
    that ``1 <= sum_exp < 2``. Only ``(m_r, S_r)`` together carry meaning, and
    :func:`~gft_kernels.backends.token_terms.combine_partials` is exact for any
    reference. ``sum_exp``/``sum_exp_1`` are ``sum exp((z' - m_r) / T)`` and
    ``sum exp(z' - m_r)``,
    ``weighted`` is ``sum e x`` with ``x = (z' - m_r) / T`` (None unless requested) and
    ``target_logit`` is ``z'_y`` where the target lives in this block, else 0.
    """

    row_max: torch.Tensor
    sum_exp: torch.Tensor
    sum_exp_1: torch.Tensor
    weighted: Optional[torch.Tensor]
    target_logit: torch.Tensor


@dataclass(frozen=True)
class TokenInputs:
    """The per-token inputs of a row pass (contiguous: the public functions copy strided or
    broadcast views once, before dispatch).

    ``targets`` ``(N,)`` int64/int32 holds vocabulary ids or ``params.ignore_index``;
    ``advantages`` is ``(N // tokens_per_advantage,)`` in the accumulate dtype (one per
    sequence when ``tokens_per_advantage`` is the sequence length, else one per token);
    ``mask`` is None or ``(N,)`` uint8/float32 holding 0/1.
    """

    targets: torch.Tensor
    advantages: torch.Tensor
    mask: Optional[torch.Tensor]
    tokens_per_advantage: int


@dataclass(frozen=True)
class TokenPassCall:
    """One :meth:`RowBackend.token_pass` call, as the backend's ``_token_pass`` receives it:
    the arguments of the public method, the token inputs packed once. With
    ``grad_weights`` (``(N,)``, the aggregation weight ``w``, or the upstream gradient per
    token) and ``grad_out`` (``(N, V)`` in the logits' dtype, may be ``logits`` itself) the
    gradient is written in the same pass."""

    logits: torch.Tensor
    tokens: TokenInputs
    params: RowParams
    with_stats: bool
    grad_weights: Optional[torch.Tensor] = None
    grad_out: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class GradRows:
    """What the gradient of each row needs, all ``(N,)``: ``targets`` (the target's column
    in this block, -1 where it lives elsewhere), the row summary ``row_max``/``sum_exp``,
    the upstream gradient ``grad_rows`` and the coefficient ``scale`` of
    :class:`TokenPass`."""

    targets: torch.Tensor
    row_max: torch.Tensor
    sum_exp: torch.Tensor
    grad_rows: torch.Tensor
    scale: torch.Tensor


class RowBackend:
    """What a backend provides; the public methods are the calling convention every caller
    uses, and a backend subclasses this class and implements the three hooks
    (``_token_pass``, ``_partial_stats``, ``_row_grad``) behind them. Inputs are validated
    by the caller except where noted.

    Shapes: ``logits`` is ``(N, V)`` with a contiguous last dim (any row stride, possibly
    0); the token inputs are as in :class:`TokenInputs`.
    """

    name: str

    def token_pass(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        advantages: torch.Tensor,
        mask: Optional[torch.Tensor],
        params: RowParams,
        *,
        tokens_per_advantage: int,
        with_stats: bool,
        grad_weights: Optional[torch.Tensor] = None,
        grad_out: Optional[torch.Tensor] = None,
    ) -> TokenPass:
        """All per-token quantities in one pass over each row.

        Data checks happen here, without a host synchronisation where the backend can: a
        target outside ``[0, V)`` other than ``ignore_index``, a mask value other than 0/1
        or a non-finite advantage raises ``ValueError`` (on CUDA, a device-side assert).

        Without ``with_stats``, rows that carry no loss (invalid, or zero advantage) are
        not read. With ``grad_weights`` (``(N,)``, the aggregation weight ``w``) and
        ``grad_out`` (``(N, V)`` in the logits' dtype, may be ``logits`` itself), the
        gradient ``w A c / T * (softmax(z'/T) - onehot(y)) * dz'/dz`` is written in the
        same launch.
        """
        tokens = TokenInputs(targets, advantages, mask, tokens_per_advantage)
        return self._token_pass(
            TokenPassCall(logits, tokens, params, with_stats, grad_weights, grad_out)
        )

    def partial_stats(
        self,
        logits: torch.Tensor,
        local_targets: torch.Tensor,
        params: RowParams,
        *,
        with_entropy: bool,
    ) -> PartialStats:
        """Statistics of this block of columns; ``local_targets`` int64 ``(N,)`` is the
        target's column in the block or -1 where it lives elsewhere."""
        return self._partial_stats(logits, local_targets, params, with_entropy)

    def row_grad(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        row_max: torch.Tensor,
        sum_exp: torch.Tensor,
        grad_rows: torch.Tensor,
        scale: torch.Tensor,
        params: RowParams,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """Write ``grad_rows * scale / T * (exp(x) / S - onehot(y)) * dz'/dz`` into ``out``.

        ``out`` may be ``logits`` itself (in place) but must not otherwise overlap it.
        Rows whose coefficient ``grad_rows * scale`` is 0 are zero-filled without reading
        their logits; ``targets`` of -1 (target in another block) subtract nothing.
        """
        rows = GradRows(targets, row_max, sum_exp, grad_rows, scale)
        return self._row_grad(logits, rows, params, out)

    def _token_pass(self, call: TokenPassCall) -> TokenPass:
        """:meth:`token_pass`; ``token_pass_from_statistics(self, call)[0]``
        (:mod:`~gft_kernels.backends.token_terms`) implements it from :meth:`partial_stats`
        and :meth:`row_grad`, where no fused pass exists."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _token_pass")

    def _partial_stats(
        self, logits: Tensor, local_targets: Tensor, params: RowParams, with_entropy: bool
    ) -> PartialStats:
        """:meth:`partial_stats`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _partial_stats")

    def _row_grad(self, logits: Tensor, rows: GradRows, params: RowParams, out: Tensor) -> Tensor:
        """:meth:`row_grad`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _row_grad")
