"""gft_kernels: fused, memory-lean kernels for the Group Fine-Tuning (GFT) loss.

Public API (docs/design.md, section 2)::

    from gft_kernels import (gft_loss, fused_linear_gft_loss, group_advantages,
                             GFTLoss, FusedLinearGFTLoss, GFTStats)
"""

from gft_kernels import _checkout
from gft_kernels.advantages import group_advantages
from gft_kernels.fused_linear import fused_linear_gft_loss
from gft_kernels.loss import gft_loss
from gft_kernels.modules import FusedLinearGFTLoss, GFTLoss
from gft_kernels.stats import GFTStats

__version__ = "0.1.0"

# gft_kernels.integration and gft_kernels.csrc from a plain checkout, too (see _checkout).
_checkout.install()

__all__ = [
    "gft_loss",
    "fused_linear_gft_loss",
    "group_advantages",
    "GFTLoss",
    "FusedLinearGFTLoss",
    "GFTStats",
    "__version__",
]
