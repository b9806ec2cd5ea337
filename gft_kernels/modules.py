"""``nn.Module`` wrappers that hold the loss keywords."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from gft_kernels._options import LOSS_AGG_MODES, check_choice
from gft_kernels._prepare import check_options
from gft_kernels.backends import check_backend_name
from gft_kernels.fused_linear import fused_linear_gft_loss
from gft_kernels.loss import gft_loss


class _KeywordLoss(nn.Module):
    """Holds a loss function's keywords (checked at construction); per-call keywords
    override them."""

    def __init__(self, constructor_locals: Dict[str, Any]) -> None:
        """``constructor_locals``: ``locals()`` on entry to the subclass's ``__init__``,
        whose keyword-only parameters (declared there once, with types and defaults) are
        the keywords to hold."""
        super().__init__()
        kwargs = {k: v for k, v in constructor_locals.items() if k not in ("self", "__class__")}
        check_options(
            tau=kwargs["tau"],
            temperature=kwargs["temperature"],
            num_tokens=None,
            max_response_length=None,
            return_stats=kwargs["return_stats"],
            logit_scale=kwargs["logit_scale"],
            logit_softcap=kwargs["logit_softcap"],
            ignore_index=kwargs["ignore_index"],
        )
        check_choice("loss_agg_mode", kwargs["loss_agg_mode"], LOSS_AGG_MODES)
        check_backend_name("backend", kwargs["backend"])
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
        logit_scale: float = 1.0,
        logit_softcap: Optional[float] = None,
    ) -> None:
        super().__init__(locals())

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
        logit_scale: float = 1.0,
        logit_softcap: Optional[float] = None,
        compact_tokens: bool = True,
    ) -> None:
        super().__init__(locals())

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
