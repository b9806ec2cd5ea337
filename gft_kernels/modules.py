"""``nn.Module`` wrappers that hold the loss keywords."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from gft_kernels.fused_linear import fused_linear_gft_loss
from gft_kernels.loss import gft_loss


class _KeywordLoss(nn.Module):
    """Holds a loss function's keywords; per-call keywords override them."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.kwargs = kwargs

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class GFTLoss(_KeywordLoss):
    """Module form of :func:`gft_kernels.gft_loss`; keywords are fixed at construction.

    ``forward(logits, targets, advantages, mask=None, **overrides)`` accepts the same
    per-call keywords (e.g. ``num_tokens``) to override the stored ones.
    """

    def __init__(
        self,
        *,
        tau: float = 0.1,
        temperature: float = 1.0,
        loss_agg_mode: str = "token-mean",
        ignore_index: int = -100,
        return_stats: bool = False,
        backend: str = "auto",
        inplace_backward: bool = False,
    ) -> None:
        super().__init__(
            tau=tau,
            temperature=temperature,
            loss_agg_mode=loss_agg_mode,
            ignore_index=ignore_index,
            return_stats=return_stats,
            backend=backend,
            inplace_backward=inplace_backward,
        )

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        advantages: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        **overrides: Any,
    ):
        return gft_loss(logits, targets, advantages, mask, **{**self.kwargs, **overrides})


class FusedLinearGFTLoss(_KeywordLoss):
    """Module form of :func:`gft_kernels.fused_linear_gft_loss`.

    ``forward(hidden, weight, targets, advantages, mask=None, bias=None, **overrides)``;
    pass ``lm_head.weight`` (and ``lm_head.bias``) so tied or frozen heads work as-is.
    """

    def __init__(
        self,
        *,
        tau: float = 0.1,
        temperature: float = 1.0,
        loss_agg_mode: str = "token-mean",
        ignore_index: int = -100,
        return_stats: bool = False,
        backend: str = "auto",
        chunk_size: Optional[int] = None,
    ) -> None:
        super().__init__(
            tau=tau,
            temperature=temperature,
            loss_agg_mode=loss_agg_mode,
            ignore_index=ignore_index,
            return_stats=return_stats,
            backend=backend,
            chunk_size=chunk_size,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        advantages: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
        **overrides: Any,
    ):
        return fused_linear_gft_loss(
            hidden, weight, targets, advantages, mask, bias=bias, **{**self.kwargs, **overrides}
        )
