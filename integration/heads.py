"""The output head (lm_head) of a causal LM, for losses computed with the fused head.

What a trainer needs to feed ``hidden`` and the head's ``weight``/``bias`` to
:func:`gft_kernels.fused_linear_gft_loss` instead of calling the head:

- :func:`output_head` / :func:`head_params`: the head module (inside an FSDP1 wrapper if
  any) and its full ``(V, H)`` weight and bias;
- :func:`decoder_body`: the decoder stack without the head, to get the final hidden states
  from one pass;
- :func:`head_logit_transform`: the soft-cap and scale a model applies to ``hidden @ W.T``
  (Gemma 2/3 ``final_logit_softcapping``, Cohere ``logit_scale``, Granite
  ``logits_scaling``, ...), read from its config;
- :func:`call_with_head`: one ``model(...)`` call with the head's forward replaced, for
  wrapped (DDP, FSDP, DeepSpeed) and sharded (FSDP2) models, where the full head weight
  exists only inside the forward and the wrappers' hooks must see the call;
- :func:`is_sharded` / :func:`is_dtensor`: FSDP2 detection.

Torch only: nothing here imports transformers.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn


def output_head(model: nn.Module) -> nn.Module:
    """The output embedding (lm_head) of an unwrapped model, inside its FSDP1 wrapper if it
    has one. Raises ``ValueError`` when the model has none."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    while isinstance(getattr(head, "_fsdp_wrapped_module", None), nn.Module):
        head = head._fsdp_wrapped_module
    if not isinstance(head, nn.Module):
        raise ValueError("model: expected an output embedding (lm_head) with a weight")
    return head


def head_params(head: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight (V, H), bias (V,) or None)`` of a head module, as they are now (inside the
    forward of a sharded model: the gathered tensors). A weight that is a DTensor (sharded
    inside the forward, e.g. tensor parallelism) is refused."""
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError("model: expected an output embedding (lm_head) with a weight")
    if weight.dim() != 2 or is_dtensor(weight):
        raise ValueError(
            f"model: lm_head weight expected a full (V, H) tensor, got "
            f"{type(weight).__name__} of shape {tuple(weight.shape)} (a head sharded inside "
            "its forward, e.g. tensor parallelism, is not supported)"
        )
    bias = getattr(head, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None


def decoder_body(model: nn.Module) -> Optional[nn.Module]:
    """The decoder stack without the head (``LlamaModel`` in ``LlamaForCausalLM``), or None
    when the model has no separable body."""
    body = None
    if callable(getattr(model, "get_decoder", None)):
        body = model.get_decoder()
    if body is None or body is model:
        body = getattr(model, "base_model", None)
    if body is None or body is model or not isinstance(body, nn.Module):
        return None
    return body


def all_positions_kwargs(model: nn.Module) -> Dict[str, Any]:
    """Forward keywords that make a model pass every position to its head."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return {"logits_to_keep": 0}
    return {}


@dataclass(frozen=True)
class LogitTransform:
    """``z' = softcap * tanh(z * scale / softcap)`` (``z * scale`` without a cap): what a
    model applies to ``hidden @ W.T (+ b)`` before its logits are used."""

    scale: float = 1.0
    softcap: Optional[float] = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def loss_kwargs(self) -> Dict[str, Any]:
        """Keywords of ``fused_linear_gft_loss`` for this transform (none for the identity)."""
        kwargs: Dict[str, Any] = {}
        if self.scale != 1.0:
            kwargs["logit_scale"] = self.scale
        if self.softcap is not None:
            kwargs["logit_softcap"] = self.softcap
        return kwargs

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The transform in plain PyTorch (for checks; the loss applies it in its kernels)."""
        z = logits * self.scale if self.scale != 1.0 else logits
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


# (config attribute, how it enters the scale). Each is what the model's forward applies to
# the head's output in transformers: Cohere multiplies by ``logit_scale``, Granite divides by
# ``logits_scaling``, Falcon-H1 multiplies by ``lm_head_multiplier``, MuseSpark by
# ``output_multiplier`` (before a Gemma-style cap).
_SCALE_ATTRIBUTES = (
    ("logit_scale", "multiply"),
    ("logits_scaling", "divide"),
    ("lm_head_multiplier", "multiply"),
    ("output_multiplier", "multiply"),
)
# Model types whose forward multiplies by ``logits_scaling`` where Granite's divides
# (HyperCLOVAX: muP's output multiplier under Granite's attribute name).
_MULTIPLIES_LOGITS_SCALING = frozenset({"hyperclovax"})


def head_logit_transform(model: nn.Module) -> LogitTransform:
    """The logit transform of a model, read from its (text) config.

    ``final_logit_softcapping`` gives the cap (Gemma 2/3 and others); the scale is the product
    of the attributes in ``_SCALE_ATTRIBUTES`` that the config sets. A model without a config
    (or without any of them) gets the identity. Raises ``ValueError`` for a cap or scale that
    is not a finite positive number.
    """
    config = getattr(model, "config", None)
    if config is None:
        return LogitTransform()
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            config = get_text(decoder=True)
        except TypeError:  # older transformers: no decoder keyword
            config = get_text()

    def positive(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"model.config.{name}: expected a number, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"model.config.{name}: expected a finite value > 0, got {value}")
        return float(value)

    scale = 1.0
    for name, how in _SCALE_ATTRIBUTES:
        value = getattr(config, name, None)
        if value is None:
            continue
        value = positive(name, value)
        if name == "logits_scaling" and getattr(config, "model_type", None) in (
            _MULTIPLIES_LOGITS_SCALING
        ):
            how = "multiply"
        scale = scale * value if how == "multiply" else scale / value
    cap = getattr(config, "final_logit_softcapping", None)
    softcap = positive("final_logit_softcapping", cap) if cap is not None else None
    return LogitTransform(scale=scale, softcap=softcap)


def _fsdp2_types() -> Tuple[type, ...]:
    """``(DTensor, FSDPModule)`` where this torch has them (public since torch 2.6)."""
    if not torch.distributed.is_available():
        return ()
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:
        return ()
    return DTensor, FSDPModule


def is_dtensor(tensor: torch.Tensor) -> bool:
    types = _fsdp2_types()
    return bool(types) and isinstance(tensor, types[0])


def is_sharded(model: nn.Module) -> bool:
    """FSDP2 (``fully_shard``) anywhere in the model, or DTensor parameters."""
    types = _fsdp2_types()
    if not types:
        return False
    dtensor, fsdp_module = types
    return any(isinstance(m, fsdp_module) for m in model.modules()) or any(
        isinstance(p, dtensor) for p in model.parameters()
    )


@contextlib.contextmanager
def forward_replaced(module: nn.Module, forward: Callable[..., Any]):
    """``module.forward`` is ``forward`` inside the block (``module(...)`` still runs the
    module's hooks, e.g. FSDP's parameter gathering); the previous forward comes back."""
    missing = object()
    previous = module.__dict__.get("forward", missing)
    module.forward = forward
    try:
        yield
    finally:
        if previous is missing:
            del module.forward
        else:
            module.forward = previous


# head_fn(hidden (B, L, H), weight (V, H), bias (V,) or None) -> what the head returns
HeadFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def call_with_head(
    model: nn.Module,
    unwrapped: nn.Module,
    head_fn: HeadFn,
    **forward_kwargs: Any,
) -> Tuple[Any, torch.Tensor, torch.Tensor]:
    """``model(**forward_kwargs)`` with the lm_head's forward replaced by ``head_fn``.

    ``model`` is what runs (possibly wrapped: DDP, FSDP); ``unwrapped`` the model whose
    ``get_output_embeddings()`` is replaced. ``head_fn`` receives the head's input and its
    weight and bias as they are inside the forward (gathered by FSDP/ZeRO-3's pre-forward
    hooks, whose post-backward hooks then reduce their gradients), and its result is what the
    head returns to the model. The head must be called exactly once.

    Returns ``(model output, head input, head_fn result)``.
    """
    head = output_head(unwrapped)
    seen: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if seen:
            raise ValueError(
                "model: its forward calls the lm_head more than once; a loss computed in the "
                "lm_head needs exactly one call"
            )
        weight, bias = head_params(head)
        result = head_fn(hidden, weight, bias)
        seen.append((hidden, result))
        return result

    with forward_replaced(head, forward):
        out = model(**forward_kwargs)
    if not seen:
        raise ValueError("model: its forward did not call the lm_head (get_output_embeddings())")
    return out, seen[0][0], seen[0][1]


def model_logits(out: Any) -> Optional[torch.Tensor]:
    """The logits of a model output (``ModelOutput`` or tuple)."""
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    return logits if isinstance(logits, torch.Tensor) else None


def max_over_ranks(value: float, device: torch.device) -> float:
    """``value``'s maximum over the ranks of the default process group (itself without one)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())
