"""Diagnostics returned by ``return_stats=True``."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GFTStats:
    """Detached per-token diagnostics from the same pass that computed the loss.

    Attributes:
        logprobs: ``log p`` at temperature T, shaped like ``targets``; fp32 (fp64 for
            fp64 input). Tokens that are masked or ``ignore_index`` hold the value for the
            substituted target 0 and should be read through the mask.
        probs: the DCR probability ``q = softmax(z)_y`` (temperature 1), same shape.
        entropy: entropy of ``softmax(z / T)`` per token, same shape.
        rectified_fraction: 0-dim tensor, share of valid tokens with ``q <= tau``
            (0 when no token is valid).
    """

    logprobs: torch.Tensor
    probs: torch.Tensor
    entropy: torch.Tensor
    rectified_fraction: torch.Tensor
