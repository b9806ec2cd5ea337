"""The GFT loss as a verl (>= 0.9.1) policy-loss plug-in: mode ``"gft"``.

Importing this module registers :func:`gft_policy_loss` under
``actor_rollout_ref.actor.policy_loss.loss_mode=gft``. verl computes the per-token
log-probs itself (at the rollout temperature) and calls the plug-in once per micro-batch;
the loss is

    l_t = -A_t * c_t * log p_t,   c_t = stopgrad(q_t if q_t <= tau else 1),   q_t = exp(log p_t)

aggregated with verl's ``global_batch_info`` (see :mod:`.aggregation`), so the summed
micro-batch gradients do not depend on the micro-batch split or the data-parallel size.

Limitation: this path only sees ``log p`` at the rollout temperature ``T``, so ``q`` is
read at ``T`` too; GFT defines ``q`` at temperature 1. The two agree only at ``T = 1``.
At other temperatures use the fused engine (:mod:`.engine`), which reads ``q`` at
temperature 1 from the hidden states.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from verl.trainer.ppo.core_algos import register_policy_loss
from verl.workers.config import PolicyLossConfig

from .aggregation import aggregation_weights, global_batch_info

DEFAULT_TAU = 0.1
LOSS_MODE = "gft"


def _check_nonnegative(name: str, value: Any, *, zero_allowed: bool) -> float:
    """A finite real number ``>= 0`` (``tau``) or ``> 0`` (a temperature)."""
    interval = "[0, inf)" if zero_allowed else "(0, inf)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number in {interval}, got {type(value).__name__}")
    value = float(value)
    if not (0 <= value if zero_allowed else 0 < value) or not value < float("inf"):
        raise ValueError(f"{name}: expected a number in {interval}, got {value}")
    return value


def _check_tau(name: str, value: Any) -> float:
    return _check_nonnegative(name, value, zero_allowed=True)


def _check_temperature(name: str, value: Any) -> float:
    return _check_nonnegative(name, value, zero_allowed=False)


@dataclass
class GFTPolicyLossConfig(PolicyLossConfig):
    """verl's ``PolicyLossConfig`` plus GFT's DCR threshold.

    Select it in the trainer config (``PolicyLossConfig`` itself is a strict dataclass, so
    ``+...policy_loss.tau=`` alone is refused there)::

        actor_rollout_ref.actor.policy_loss._target_=gft_kernels.integration.verl.GFTPolicyLossConfig
        actor_rollout_ref.actor.policy_loss.loss_mode=gft
        +actor_rollout_ref.actor.policy_loss.tau=0.1

    Args:
        tau: DCR threshold in ``[0, inf)``; None: ``tao`` if given, else 0.1.
        tao: the published fork's spelling of ``tau`` (an alias; both given must agree).
        logprob_temperature: the temperature of ``log p`` in the update. None (default):
            the rollout temperature, verl's choice. ``1.0``: the published fork's choice
            (its update sets the temperature to 1, so ``log p`` is the model's own at any
            rollout temperature). Only the fused engine can take a temperature of its
            own; verl's logits path (this plug-in alone) refuses any value.
        fused_head: the fused engine's head strategy (``head`` of
            ``fused_linear_gft_loss``): None (default) is ``"chunked"``; ``"blockwise"``
            or ``"blockwise_exact"`` (Triton, on GPU). verl's logits path forms the logits
            itself and refuses any value.
    """

    loss_mode: str = LOSS_MODE
    tau: Optional[float] = None
    tao: Optional[float] = None
    logprob_temperature: Optional[float] = None
    fused_head: Optional[str] = None

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if callable(parent):
            parent()
        tau = None if self.tau is None else _check_tau("policy_loss.tau", self.tau)
        tao = None if self.tao is None else _check_tau("policy_loss.tao", self.tao)
        if tau is not None and tao is not None and tau != tao:
            raise ValueError(
                f"policy_loss.tao: an alias of tau, expected {tau} (as tau) or unset, got {tao}"
            )
        if self.logprob_temperature is not None:
            _check_temperature("policy_loss.logprob_temperature", self.logprob_temperature)
        if self.fused_head is not None:
            _check_head("policy_loss.fused_head", self.fused_head)
        resolved = tau if tau is not None else tao if tao is not None else DEFAULT_TAU
        # verl's configs freeze their fields after construction.
        object.__setattr__(self, "tau", resolved)
        object.__setattr__(self, "tao", resolved)


def _get(config: Any, key: str) -> Any:
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get(key)
    getter = getattr(config, "get", None)
    if callable(getter):  # verl BaseConfig, omegaconf DictConfig
        return getter(key, None)
    return getattr(config, key, None)


def resolve_tau(config: Any) -> float:
    """``tau`` of an actor config: ``config.policy_loss.tau`` (or ``.tao``), else 0.1.

    ``config`` is verl's ``ActorConfig`` (or a dict / DictConfig of the same shape); a
    ``policy_loss`` that is not a :class:`GFTPolicyLossConfig` has no ``tau`` and gives
    the published default, 0.1.
    """
    policy_loss = _get(config, "policy_loss")
    tau = _get(policy_loss, "tau")
    if tau is None:
        tau = _get(policy_loss, "tao")
    return DEFAULT_TAU if tau is None else _check_tau("policy_loss.tau", tau)


def resolve_logprob_temperature(config: Any) -> Optional[float]:
    """``policy_loss.logprob_temperature`` of an actor config, or None (rollout's)."""
    value = _get(_get(config, "policy_loss"), "logprob_temperature")
    return None if value is None else _check_temperature("policy_loss.logprob_temperature", value)


def _check_head(name: str, value: Any) -> str:
    from gft_kernels._head import HEAD_STRATEGIES

    if value not in HEAD_STRATEGIES:
        raise ValueError(f"{name}: expected one of {', '.join(HEAD_STRATEGIES)}, got {value!r}")
    return value


def resolve_fused_head(config: Any) -> str:
    """``policy_loss.fused_head`` of an actor config (``"chunked"`` when unset)."""
    value = _get(_get(config, "policy_loss"), "fused_head")
    return "chunked" if value is None else _check_head("policy_loss.fused_head", value)


def gft_token_coefficients(
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    tau: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(-A * c * w, q)``: the detached factor of each token's ``log p`` and its ``q``.

    ``q = exp(log_prob)`` (detached), ``c = q if q <= tau else 1``; ``w`` carries the
    aggregation (and any importance weights) and is 0 on masked tokens.
    """
    q = log_prob.detach().exp()
    coef = torch.where(q <= tau, q, torch.ones_like(q))
    return -advantages.detach().to(log_prob.dtype) * coef * weights.to(log_prob.dtype), q


def gft_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """GFT policy loss of one micro-batch in verl 0.9's policy-loss convention.

    Args:
        old_log_prob: ``(B, T)`` rollout-policy log-probs (only for the ``ppo_kl`` metric).
        log_prob: ``(B, T)`` current log-probs at the rollout temperature; the only input
            with a gradient. ``q = exp(log_prob)``: exact GFT only at temperature 1.
        advantages: ``(B, T)`` (verl broadcasts sequence advantages to tokens).
        response_mask: ``(B, T)``, 1 (True) on response tokens.
        loss_agg_mode: token-mean, token-sum, seq-mean-token-sum, seq-mean-token-mean or
            seq-mean-token-sum-norm, with verl's definitions.
        config: verl's ``ActorConfig``: ``policy_loss.tau`` (:func:`resolve_tau`) and the
            ``global_batch_info`` verl's ``ppo_loss`` fills in (mini-batch token and
            sequence counts, ``dp_size``, ``loss_scale_factor``).
        rollout_is_weights: optional ``(B, T)`` importance weights multiplying each token.

    Returns:
        ``(loss, metrics)``: the 0-dim loss, whose micro-batch sum over the mini-batch is
        the mini-batch loss; metrics ``actor/gft_rectified_fraction`` (share of response
        tokens with ``q <= tau``) and ``actor/ppo_kl`` (masked mean of
        ``old_log_prob - log_prob``), both of this micro-batch.
    """
    if not isinstance(log_prob, torch.Tensor) or log_prob.dim() != 2:
        shape = tuple(log_prob.shape) if isinstance(log_prob, torch.Tensor) else log_prob
        raise ValueError(f"log_prob: expected (batch, response_length), got {shape}")
    shape = log_prob.shape
    for name, tensor in (
        ("old_log_prob", old_log_prob),
        ("advantages", advantages),
        ("response_mask", response_mask),
        ("rollout_is_weights", rollout_is_weights),
    ):
        if tensor is not None and tensor.shape != shape:
            raise ValueError(
                f"{name}: expected shape {tuple(shape)} (as log_prob), got {tuple(tensor.shape)}"
            )
    tau = resolve_tau(config)
    if resolve_logprob_temperature(config) is not None:
        raise ValueError(
            "policy_loss.logprob_temperature: only the fused engine (actor_rollout_ref.model."
            "external_lib=gft_kernels.integration.verl.use_fused_engine) computes log p at a "
            "temperature of its own; verl's logits path gives this loss log p at the rollout "
            f"temperature. Got {resolve_logprob_temperature(config)}: use the fused engine, "
            "or leave it unset (and set the rollout temperature)"
        )
    if _get(_get(config, "policy_loss"), "fused_head") is not None:
        raise ValueError(
            "policy_loss.fused_head: only the fused engine (actor_rollout_ref.model."
            "external_lib=gft_kernels.integration.verl.use_fused_engine) has a fused head; "
            "verl's logits path forms the logits itself. Use the fused engine, or leave it "
            "unset"
        )
    mask = response_mask.to(torch.bool)
    weights = aggregation_weights(
        mask, loss_agg_mode, dtype=log_prob.dtype, **global_batch_info(config)
    )
    if rollout_is_weights is not None:
        weights = weights * rollout_is_weights.detach().to(log_prob.dtype)
    factor, q = gft_token_coefficients(log_prob, advantages, weights, tau)
    # Masked tokens and c = 0 (q = 0, log p = -inf) give exactly 0 loss and gradient.
    live = mask & (factor != 0)
    loss = (factor * torch.where(live, log_prob, torch.zeros_like(log_prob))).sum()

    n_valid = mask.sum().clamp_min(1)
    rectified = ((q <= tau) & mask).sum() / n_valid
    kl = torch.where(mask, (old_log_prob - log_prob).detach(), torch.zeros_like(q)).sum() / n_valid
    rect_value, kl_value = torch.stack([rectified.to(q.dtype), kl.to(q.dtype)]).tolist()
    return loss, {"actor/gft_rectified_fraction": rect_value, "actor/ppo_kl": kl_value}


def register() -> None:
    """Registers :func:`gft_policy_loss` as verl policy-loss mode ``"gft"`` (idempotent)."""
    register_policy_loss(LOSS_MODE)(gft_policy_loss)


register()
