"""The GFT policy loss in verl's policy-loss calling convention (no verl import needed).

verl computes per-token log-probs ``(B, T_resp)`` itself and hands them to a registered
policy-loss function. Register this one with verl's decorator, e.g.::

    from verl.trainer.ppo.core_algos import register_policy_loss
    from gft_kernels.integration import verl_policy_loss
    register_policy_loss("gft")(verl_policy_loss)      # actor.policy_loss.loss_mode=gft

verl releases up to 0.5 expect ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``
(:func:`verl_policy_loss`); later ones expect ``(pg_loss, metrics_dict)``
(:func:`verl_policy_loss_with_metrics`). Both accept verl's optional
``rollout_is_weights`` (per-token importance weights multiplying the per-token loss).

Aggregation follows DESIGN §1 on the micro-batch (verl up to 0.5): ``seq-mean-*`` divide
by all B sequences and ``token-mean`` by the micro-batch's tokens. Newer verl releases
divide ``seq-mean-*`` by the non-empty sequences and ``token-mean`` by a global token
count from ``config.global_batch_info``; those are not applied here.

This path reads ``q = exp(log_prob)`` from the log-probs verl already computed at its
rollout temperature, so ``q`` and ``log p`` share that temperature here (the fused
library path reads ``q`` at temperature 1; with temperature 1 they coincide).
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, Optional, Tuple

import torch

DEFAULT_TAU = 0.1
VERL_LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
    "sum",
)


def _lookup(config: Any, key: str) -> Any:
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get(key)
    getter = getattr(config, "get", None)
    if callable(getter):  # omegaconf DictConfig, verl's BaseConfig
        try:
            return getter(key, None)
        except Exception:  # noqa: BLE001 - some configs' get() has another signature
            pass
    return getattr(config, key, None)


def resolve_tau(config: Any) -> float:
    """``tau`` from ``config``: a dict or an object (DictConfig, verl ``ActorConfig``).

    Looked up as ``config.tau``, then ``config.policy_loss.tau`` (where verl keeps
    loss-specific options), then ``config.gft_tau``; :data:`DEFAULT_TAU` (0.1, the
    published GFT default) when none is set.
    """
    tau = _lookup(config, "tau")
    if tau is None:
        tau = _lookup(_lookup(config, "policy_loss"), "tau")
    if tau is None:
        tau = _lookup(config, "gft_tau")
    if tau is None:
        return DEFAULT_TAU
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not tau >= 0:
        raise ValueError(f"config.tau: expected a number in [0, inf), got {tau!r}")
    return float(tau)


def _aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """verl's ``agg_loss`` with DESIGN §1's definitions: empty mask or sequence adds 0."""
    masked = torch.where(mask, loss_mat, torch.zeros_like(loss_mat))
    weights = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        return masked.sum() / weights.sum().clamp_min(1)
    if mode == "seq-mean-token-sum":
        return masked.sum(-1).mean()
    if mode == "seq-mean-token-mean":
        per_seq = weights.sum(-1)
        seq = torch.where(per_seq > 0, masked.sum(-1) / per_seq.clamp_min(1), 0.0)
        return seq.mean()
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / loss_mat.shape[-1]
    if mode == "sum":
        return masked.sum()
    raise ValueError(
        f"loss_agg_mode: expected one of {', '.join(VERL_LOSS_AGG_MODES)}, got {mode!r}"
    )


def _gft_terms(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    config: Any,
    rollout_is_weights: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if log_prob.dim() != 2:
        raise ValueError(
            f"log_prob: expected (batch, response_length), got shape {tuple(log_prob.shape)}"
        )
    shape = log_prob.shape
    for name, t in (
        ("old_log_prob", old_log_prob),
        ("advantages", advantages),
        ("response_mask", response_mask),
        ("rollout_is_weights", rollout_is_weights),
    ):
        if t is not None and t.shape != shape:
            raise ValueError(
                f"{name}: expected shape {tuple(shape)} (as log_prob), got {tuple(t.shape)}"
            )
    tau = resolve_tau(config)
    mask = response_mask.bool()
    # Everything but log_prob is a constant of the loss (stopgrad), as in DESIGN §1.
    q = log_prob.detach().exp()
    coef = torch.where(q > tau, torch.ones_like(q), q)
    weight = -advantages.detach().to(log_prob.dtype) * coef
    if rollout_is_weights is not None:
        weight = weight * rollout_is_weights.detach().to(log_prob.dtype)
    # c = 0 (q = 0, log p = -inf) or a masked token: exactly 0 loss and 0 gradient, not NaN.
    live = mask & (weight != 0)
    safe_log_prob = torch.where(live, log_prob, torch.zeros_like(log_prob))
    loss_mat = weight * safe_log_prob
    pg_loss = _aggregate(loss_mat, mask, loss_agg_mode)

    n_valid = mask.sum().clamp_min(1)
    rectified = ((q <= tau) & mask).sum() / n_valid
    # verl's ppo_kl diagnostic: masked mean of old_log_prob - log_prob.
    diff = torch.where(mask, (old_log_prob - log_prob).detach(), torch.zeros_like(q))
    ppo_kl = diff.sum() / n_valid
    return pg_loss, rectified.to(q.dtype), ppo_kl


def verl_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GFT policy loss ``agg(-A * c * log_prob)``, ``c = stopgrad(q if q <= tau else 1)``,
    ``q = exp(log_prob)``, in verl's 4-tuple convention.

    Args:
        old_log_prob: ``(B, T)`` log-probs of the rollout policy (GFT does not use them;
            they feed the ``ppo_kl`` diagnostic).
        log_prob: ``(B, T)`` log-probs of the current policy; the only input with a gradient.
        advantages: ``(B, T)`` advantages (verl broadcasts sequence advantages to tokens).
        response_mask: ``(B, T)`` 1 on response tokens.
        loss_agg_mode: verl's ``token-mean``, ``seq-mean-token-sum``,
            ``seq-mean-token-mean``, ``seq-mean-token-sum-norm`` (``Tlen = T``), or
            ``sum``, with DESIGN §1's definitions: an
            empty mask or a fully masked sequence adds 0 (never NaN); ``seq-mean-*``
            divide by all ``B`` sequences.
        config: dict or object carrying ``tau`` (see :func:`resolve_tau`; default 0.1).
        rollout_is_weights: optional ``(B, T)`` weights multiplying the per-token loss.

    Returns:
        ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``: the 0-dim loss; as
        ``pg_clipfrac`` the share of valid tokens whose coefficient is rectified
        (``q <= tau``), GFT's analogue of clipping; ``ppo_kl`` = masked mean of
        ``old_log_prob - log_prob``; ``pg_clipfrac_lower`` = 0 (no lower clip in GFT).
    """
    pg_loss, rectified, ppo_kl = _gft_terms(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
        rollout_is_weights,
    )
    return pg_loss, rectified, ppo_kl, torch.zeros_like(rectified)


def verl_policy_loss_with_metrics(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """:func:`verl_policy_loss` in the newer ``(pg_loss, metrics)`` convention; metrics
    ``actor/pg_clipfrac`` (the rectified share), ``actor/ppo_kl``,
    ``actor/pg_clipfrac_lower`` (0) and ``actor/gft_rectified_fraction``."""
    pg_loss, rectified, ppo_kl = _gft_terms(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
        rollout_is_weights,
    )
    rect, kl = torch.stack([rectified, ppo_kl]).tolist()
    metrics = {
        "actor/pg_clipfrac": rect,
        "actor/ppo_kl": kl,
        "actor/pg_clipfrac_lower": 0.0,
        "actor/gft_rectified_fraction": rect,
    }
    return pg_loss, metrics
