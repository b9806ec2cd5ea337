"""verl's FSDP actor engine with the fused GFT head: :class:`GFTFSDPEngine`.

In a training step whose policy loss is mode ``"gft"``, the engine computes the whole GFT
loss inside the lm_head's forward with :func:`gft_kernels.fused_linear_gft_loss`: only the
hidden states that predict response tokens reach the head, the ``tokens x vocab`` logits
never exist, ``q`` is read at temperature 1 and ``log p`` at the rollout temperature (or at
``policy_loss.logprob_temperature``, 1 in the published fork's update), and
each token carries verl's global aggregation weight (:mod:`.aggregation`), so the summed
micro-batch gradients are the mini-batch gradient whatever the micro-batch split or
data-parallel size. The loss runs inside the head's own forward so that FSDP (1 or 2)
has gathered its weight there, tied or untied, and reduces its gradient afterwards.

Everything else is verl's: inference (``compute_log_prob``, the reference policy) returns
verl's log-probs and entropy, and other losses run verl's logits path.

Not supported with the fused head (refused with a ValueError): an entropy bonus
(``entropy_coeff != 0``), a KL loss (``use_kl_loss``), verl's own fused kernels
(``use_fused_kernels``), Ulysses sequence parallelism, distillation, and per-sample
temperatures that differ.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Tuple

import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_id, get_device_name, get_vendor
from verl.utils.metric import AggregationType, Metric
from verl.workers.engine import EngineRegistry, FSDPEngineWithLMHead
from verl.workers.engine.utils import detach_tree
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from gft_kernels import fused_linear_gft_loss

from ..heads import forward_replaced, head_params, output_head
from .aggregation import aggregation_weights
from .policy_loss import LOSS_MODE, resolve_fused_head, resolve_logprob_temperature, resolve_tau

ENGINE_BACKENDS = ("fsdp", "fsdp2")


def gft_actor_config(loss_function: Any) -> Optional[Any]:
    """The actor config of a GFT training loss, None for any other loss.

    verl's worker hands the engine ``functools.partial(ppo_loss, config=actor_config)``;
    the fused head replaces that loss when ``actor_config.policy_loss.loss_mode`` is
    ``"gft"``. A GFT policy loss inside another loss (distillation) is refused.
    """
    if not isinstance(loss_function, functools.partial):
        return None
    config = loss_function.keywords.get("config")
    policy_loss = getattr(config, "policy_loss", None)
    mode = policy_loss.get("loss_mode", None) if policy_loss is not None else None
    if mode != LOSS_MODE:
        return None
    if loss_function.func is not ppo_loss:
        raise ValueError(
            f"loss_function: the fused GFT engine computes verl's ppo_loss only, got "
            f"{getattr(loss_function.func, '__name__', loss_function.func)!r} with "
            "policy_loss.loss_mode=gft (distillation is not supported with it)"
        )
    return config


def _check_supported(config: Any, micro_batch: TensorDict, sp_size: int) -> None:
    if float(config.entropy_coeff) != 0.0:
        raise ValueError(
            f"actor.entropy_coeff: the fused GFT engine has no entropy bonus, expected 0, got "
            f"{config.entropy_coeff}"
        )
    if config.use_kl_loss:
        raise ValueError(
            "actor.use_kl_loss: the fused GFT engine has no KL loss, expected False, got True"
        )
    if tu.get_non_tensor_data(data=micro_batch, key="use_fused_kernels", default=False):
        raise ValueError(
            "model.use_fused_kernels: verl's fused kernels replace the lm_head the fused GFT "
            "engine computes its loss in, expected False, got True"
        )
    if tu.get_non_tensor_data(data=micro_batch, key="distillation_use_topk", default=False):
        raise ValueError("distillation: not supported by the fused GFT engine")
    if sp_size > 1:
        raise ValueError(
            f"ulysses_sequence_parallel_size: the fused GFT engine needs 1, got {sp_size}"
        )


def _scalar_temperature(temperature: Any) -> float:
    if isinstance(temperature, torch.Tensor):
        values = temperature.detach().flatten()
        if values.numel() == 0 or not bool((values == values[0]).all()):
            raise ValueError(
                "temperature: the fused GFT engine needs one temperature per micro-batch, got "
                f"per-sample values {values.tolist()}"
            )
        temperature = values[0].item()
    return float(temperature)


class GFTFSDPEngine(FSDPEngineWithLMHead):
    """verl's FSDP/FSDP2 language-model engine whose GFT training step uses the fused head.

    Register it with :func:`register_fused_engine` (importing
    ``gft_kernels.integration.verl.use_fused_engine`` does). The training forward of a
    ``policy_loss.loss_mode=gft`` actor returns the GFT loss of the micro-batch with the
    same value and gradient as verl's ``ppo_loss`` over exact per-token GFT losses (``q``
    at temperature 1), normalised by the mini-batch counts verl's engine provides.
    """

    def forward_step(self, micro_batch: TensorDict, loss_function, forward_only):
        config = None if forward_only else gft_actor_config(loss_function)
        if config is None:
            return super().forward_step(micro_batch, loss_function, forward_only)
        _check_supported(config, micro_batch, self.ulysses_sequence_parallel_size)
        return self._gft_forward_step(micro_batch, config)

    # -- layout ---------------------------------------------------------------------------

    def _response_rows(
        self, micro_batch: TensorDict, output_args: Dict[str, Any], hidden_shape: torch.Size
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows of the flattened head input that predict the response tokens, and targets.

        Response positions come from verl's own ``no_padding_2_padding`` (the slice it reads
        log-probs from), applied to the packed token indices: ``(B, T_resp)`` indices into
        the packed sequence, so the head sees exactly the tokens verl's loss would.
        """
        input_ids = micro_batch["input_ids"]
        offsets = input_ids.offsets()
        total = int(offsets[-1])
        packed = torch.arange(total, device=offsets.device)
        positions = no_padding_2_padding(packed, micro_batch)  # (B, T_resp)
        targets = output_args["input_ids_rmpad_rolled"].reshape(-1)[positions]
        if "temperature_rmpad" in output_args:  # packed (1, total + pad, H) head input
            rows = positions
        else:  # padded (B, max_seq_len, H) head input, sequence b left-aligned in row b
            width = hidden_shape[1]
            batch_index = torch.arange(positions.shape[0], device=positions.device)[:, None]
            rows = batch_index * width + (positions - offsets[:-1, None])
        return rows, targets

    # -- the step ---------------------------------------------------------------------------

    def _gft_forward_step(self, micro_batch: TensorDict, config: Any):
        micro_batch = micro_batch.to(get_device_id())
        model_inputs, output_args = self.prepare_model_inputs(micro_batch=micro_batch)
        # log p at the rollout temperature (verl's choice) unless the config names one (the
        # published fork's update uses 1); q is at temperature 1 either way.
        temperature = resolve_logprob_temperature(config)
        if temperature is None:
            temperature = _scalar_temperature(micro_batch["temperature"])
        tau = resolve_tau(config)
        fused_head = resolve_fused_head(config)

        fields = ["response_mask", "old_log_probs", "advantages"]
        if "rollout_is_weights" in micro_batch:
            fields.append("rollout_is_weights")
        padded = micro_batch.select(*fields).to_padded_tensor()
        mask = padded["response_mask"].to(torch.bool)
        global_info = {
            "dp_size": micro_batch["dp_size"],
            "batch_num_tokens": micro_batch["batch_num_tokens"],
            "global_batch_size": micro_batch["global_batch_size"],
            "loss_scale_factor": config.loss_scale_factor,
        }
        weights = aggregation_weights(
            mask, config.loss_agg_mode, dtype=torch.float32, **global_info
        )
        token_weights = weights
        if "rollout_is_weights" in padded.keys():
            token_weights = weights * padded["rollout_is_weights"].float()
        # Advantages are data: the aggregation weight folds into them, and the fused op's
        # "sum" then gives verl's aggregate exactly.
        token_advantages = padded["advantages"].float() * token_weights

        module = self.module
        head = output_head(module)
        result: Dict[str, Any] = {}

        def head_forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if "loss" in result:
                raise ValueError(
                    "model: its forward calls the lm_head more than once; the fused GFT "
                    "engine needs exactly one call"
                )
            weight, bias = head_params(head)
            rows, targets = self._response_rows(micro_batch, output_args, hidden.shape)
            if rows.shape != mask.shape:
                raise ValueError(
                    f"response_mask: expected shape {tuple(rows.shape)} (verl's response "
                    f"layout of the micro-batch), got {tuple(mask.shape)}"
                )
            flat = hidden.reshape(-1, hidden.shape[-1])
            h = flat[rows[mask]]
            if h.dtype != weight.dtype:
                h = h.to(weight.dtype)
            if h.shape[0] == 0:
                # No response token: a defined 0 that still reaches every head parameter
                # (FSDP reduces a gradient for each on every rank).
                loss = flat.sum() * 0.0 + weight.sum() * 0.0
                if bias is not None:
                    loss = loss + bias.sum() * 0.0
                result["loss"], result["stats"] = loss.float(), None
                return result["loss"]
            with torch.autocast(device_type=h.device.type, enabled=False):
                loss, stats = fused_linear_gft_loss(
                    h,
                    weight,
                    targets[mask],
                    token_advantages[mask],
                    bias=bias,
                    tau=tau,
                    temperature=temperature,
                    loss_agg_mode="sum",
                    return_stats=True,
                    head=fused_head,
                )
            result["loss"], result["stats"] = loss, stats
            return loss

        autocast_dtype = getattr(self, "_autocast_dtype", torch.bfloat16)
        autocast = (
            torch.autocast(device_type=get_device_name(), dtype=autocast_dtype)
            if autocast_dtype != torch.float32
            else _no_autocast()
        )
        with autocast, forward_replaced(head, head_forward):
            raw_output = module(**model_inputs, use_cache=False)
        if "loss" not in result:
            raise ValueError("model: its forward did not call the lm_head")
        loss = getattr(raw_output, "logits", None)
        if loss is None or loss.shape != result["loss"].shape:
            raise ValueError(
                "model: its forward changes the lm_head output (soft-capped or rescaled "
                "logits?); the fused GFT loss cannot pass through it"
            )
        metrics = self._gft_metrics(result["stats"], mask, padded["old_log_probs"])
        metrics["actor/pg_loss"] = Metric(value=loss.detach(), aggregation=AggregationType.SUM)
        if tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False):
            # verl's ppo_loss reports the entropy (at the rollout temperature) aggregated
            # like the loss, as a summed metric.
            entropy = result["stats"].entropy.float() if result["stats"] is not None else None
            value = (weights[mask] * entropy).sum() if entropy is not None else torch.zeros(())
            metrics["actor/entropy_loss"] = Metric(
                value=value.detach(), aggregation=AggregationType.SUM
            )
        output = {"model_output": {}, "loss": loss.detach().item(), "metrics": metrics}
        return loss, detach_tree(output)

    @staticmethod
    def _gft_metrics(
        stats: Any, mask: torch.Tensor, old_log_probs: torch.Tensor
    ) -> Dict[str, float]:
        """Micro-batch means: the rectified share (``q <= tau``) and verl's ``ppo_kl``
        (``old_log_prob - log_prob`` over the response tokens)."""
        if stats is None:
            return {"actor/gft_rectified_fraction": 0.0, "actor/ppo_kl": 0.0}
        kl = (old_log_probs.float()[mask] - stats.logprobs.float()).mean()
        rect, kl_value = torch.stack(
            [stats.rectified_fraction.float().reshape(()), kl.reshape(())]
        ).tolist()
        return {"actor/gft_rectified_fraction": rect, "actor/ppo_kl": kl_value}


class _no_autocast:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def register_fused_engine(device: Optional[str] = None, vendor: Optional[str] = None) -> type:
    """Makes :class:`GFTFSDPEngine` verl's ``language_model`` engine for FSDP and FSDP2.

    It is registered under the ``(device, vendor)`` key, which verl's ``EngineRegistry``
    prefers to the device-only key of its own FSDP engine. Defaults: the device and vendor
    verl detects in this process (``VERL_ENGINE_DEVICE`` / ``VERL_ENGINE_VENDOR`` when
    set). Idempotent. Returns the engine class.
    """
    import os

    device = device or os.getenv("VERL_ENGINE_DEVICE") or get_device_name()
    vendor = vendor or os.getenv("VERL_ENGINE_VENDOR") or get_vendor()
    registry = EngineRegistry._engines.setdefault("language_model", {})
    for backend in ENGINE_BACKENDS:
        current = registry.get(backend, {}).get((device, vendor))
        if current is GFTFSDPEngine:
            continue
        if current is not None:
            raise ValueError(
                f"EngineRegistry: ({device!r}, {vendor!r}) for backend {backend!r} already "
                f"holds {current.__name__}; the fused GFT engine would replace it"
            )
        EngineRegistry.register(
            model_type="language_model", backend=backend, device=device, vendor=vendor
        )(GFTFSDPEngine)
    return GFTFSDPEngine
