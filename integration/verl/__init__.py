"""GFT on verl (>= 0.9.1): ``gft_kernels.integration.verl``.

Importing this package registers verl policy-loss mode ``"gft"`` (it is also declared as
a ``verl.plugins`` entry point, so ``import verl`` loads it wherever gft-kernels is
installed). Three parts:

- :mod:`.policy_loss`: :func:`gft_policy_loss` and :class:`GFTPolicyLossConfig`
  (``policy_loss._target_``, with ``tau``). It reads ``q`` from verl's log-probs at the
  rollout temperature: exact GFT only at temperature 1.
- :mod:`.engine`: :class:`GFTFSDPEngine`, verl's FSDP language-model engine whose
  training forward computes the whole GFT loss with ``fused_linear_gft_loss`` from the
  hidden states (no logits, ``q`` at temperature 1). Selected by importing
  ``gft_kernels.integration.verl.use_fused_engine`` in the workers
  (``actor_rollout_ref.model.external_lib=...`` or ``VERL_USE_EXTERNAL_MODULES``).
- :mod:`.hybrid`: :class:`HybridGroupAgentLoop`, the rollout component that adds each
  prompt's expert/teacher responses to the uid group of the policy's samples.
- :mod:`.metrics`: :class:`GFTReplayBuffer`, verl's sync V1 sampler that adds per-source
  metrics (``gft/self/score/mean``, ...) to each training step's log
  (``trainer.v1.sampler.custom_sampler``).

Needs verl (``pip install "gft-kernels[verl]"``).
"""

from __future__ import annotations

import importlib
from typing import Any

from .aggregation import VERL_LOSS_AGG_MODES, aggregation_weights, global_batch_info
from .policy_loss import (
    DEFAULT_TAU,
    GFTPolicyLossConfig,
    gft_policy_loss,
    resolve_tau,
)

__all__ = [
    "DEFAULT_TAU",
    "GFTFSDPEngine",
    "GFTPolicyLossConfig",
    "GFTReplayBuffer",
    "HybridGroupAgentLoop",
    "VERL_LOSS_AGG_MODES",
    "aggregation_weights",
    "gft_policy_loss",
    "global_batch_info",
    "register_fused_engine",
    "resolve_tau",
]

# The engine imports verl's FSDP engine (and transformers), the agent loop verl's rollout
# stack, the sampler verl's trainer and TransferQueue: all on first use, so the entry
# point loaded by `import verl` stays light.
_LAZY = {
    "GFTFSDPEngine": "engine",
    "register_fused_engine": "engine",
    "HybridGroupAgentLoop": "hybrid",
    "GFTReplayBuffer": "metrics",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
