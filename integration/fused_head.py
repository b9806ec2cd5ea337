"""The fused GFT head inside a ``transformers.Trainer``: hidden states, head, loss.

:class:`FusedHeadMixin` gives a Trainer subclass (``GFTTrainer``, ``GFTGRPOTrainer``) the
loss of a padded batch computed with :func:`gft_kernels.fused_linear_gft_loss` from the
final hidden states and the lm_head's weight, never materialising the logits:

- a plain model: its decoder body runs once and only the response positions reach the head;
- a wrapped (DDP, FSDP, DeepSpeed) or sharded (FSDP2) model: it runs its own forward and the
  loss is computed inside the lm_head's forward (:func:`.heads.call_with_head`), where the
  full head weight exists and from where the wrappers reduce its gradient.

The host class provides ``self.accelerator``, ``self.args`` with ``tau``, ``temperature``,
``log_token_stats``, ``gft_backend``, ``gft_chunk_size``, ``gft_head`` (and ``check_head`` for
:meth:`FusedHeadMixin._check_head`), and sets ``self.logit_transform``.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import heads, loss


def _is_compiled(model: nn.Module) -> bool:
    """A ``torch.compile`` wrapper (accelerate's ``unwrap_model`` keeps it by default)."""
    return type(model).__name__ == "OptimizedModule"


class FusedHeadMixin:
    """The GFT loss of a batch with the fused head (see the module docstring)."""

    logit_transform: heads.LogitTransform = heads.LogitTransform()

    def head_loss(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        weights: torch.Tensor,
        *,
        router_aux_loss: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, Any]:
        """``(loss, hidden (B, L, H), stats or None)`` of a padded batch: ``inputs`` holds
        ``input_ids``, ``attention_mask``, ``response_mask`` ``(B, L)`` and ``advantages``
        ``(B,)``; ``weights`` ``(B, L - 1)`` are :func:`.loss.normalized_weights`.

        With ``router_aux_loss`` (a Mixture-of-Experts model) the model's forward runs with
        ``output_router_logits`` and its load-balancing loss of this batch is left in
        ``self.last_router_aux_loss`` (a 0-dim tensor with its graph) for the caller to
        weight and add, as TRL does for its own loss."""
        self.last_router_aux_loss = None
        extra = {"output_router_logits": True} if router_aux_loss else {}
        if self._computes_loss_in_head(model):
            return self.loss_in_head_forward(model, inputs, weights, **extra)
        hidden = self.final_hidden_states(
            model, inputs["input_ids"], inputs["attention_mask"], **extra
        )
        weight, bias = self._head(model)
        value, stats = self._gft_head_loss(hidden, weight, bias, inputs, weights)
        return value, hidden, stats

    def _keep_router_aux_loss(self, out: Any, asked: bool) -> None:
        if not asked:
            return
        aux = getattr(out, "aux_loss", None)
        if aux is None:
            raise ValueError(
                "model: asked for its router load-balancing loss (output_router_logits) but "
                "its output has no aux_loss; is it a Mixture-of-Experts model?"
            )
        self.last_router_aux_loss = aux

    # -- hidden states and head ----------------------------------------------------------

    @staticmethod
    def _body(unwrapped: nn.Module) -> Optional[nn.Module]:
        """The decoder stack without the head (``LlamaModel`` in ``LlamaForCausalLM``)."""
        return heads.decoder_body(unwrapped)

    def final_hidden_states(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        **forward_kwargs: Any,
    ) -> torch.Tensor:
        """``(B, L, H)`` hidden states the lm_head reads, from one pass of the model body.

        A wrapped model (DDP, ...) must run through its own forward (gradient sync hooks),
        so there, and for models without a separable body, the full model runs with
        ``output_hidden_states`` (and ``logits_to_keep`` = no position, where supported, so
        the head still computes nothing). (Training uses :meth:`loss_in_head_forward` for
        wrapped and sharded models.)
        """
        unwrapped = self.accelerator.unwrap_model(model)
        # The router loss comes from the full model's forward (its own aux-loss formula); a
        # compiled model (torch_compile) runs its compiled forward, which calling the body
        # of the module inside it would bypass.
        plain = model is unwrapped and not _is_compiled(unwrapped) and not forward_kwargs
        body = self._body(unwrapped) if plain else None
        if body is not None:
            # accelerate applies mixed precision by wrapping model.forward; the body is
            # called directly, so it gets the same autocast here.
            with self.accelerator.autocast():
                out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        kwargs: Dict[str, Any] = {"output_hidden_states": True, "use_cache": False}
        if "logits_to_keep" in inspect.signature(unwrapped.forward).parameters:
            kwargs["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=input_ids.device)
        out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs, **forward_kwargs)
        self._keep_router_aux_loss(out, bool(forward_kwargs.get("output_router_logits")))
        return out.hidden_states[-1]

    def _head(self, model: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return heads.head_params(heads.output_head(self.accelerator.unwrap_model(model)))

    def _computes_loss_in_head(self, model: nn.Module) -> bool:
        """Whether the loss must be computed inside the lm_head's forward: the model is
        wrapped (DDP, FSDP, DeepSpeed: it must run through its own forward) or sharded
        (FSDP2 / DTensor parameters: the full head weight exists only inside the forward).
        A model only wrapped by ``torch.compile`` keeps the fused op outside its graph (the
        full-forward path of :meth:`final_hidden_states`)."""
        unwrapped = self.accelerator.unwrap_model(model)
        if heads.is_sharded(unwrapped):
            return True
        return model is not unwrapped and not _is_compiled(model)

    def loss_in_head_forward(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        weights: torch.Tensor,
        **forward_kwargs: Any,
    ) -> Tuple[torch.Tensor, torch.Tensor, Any]:
        """The GFT loss computed inside the lm_head's forward, during the model's own forward.

        For wrapped and sharded models: for one ``model(...)`` call, the forward of the
        unwrapped model's output embedding returns the fused GFT loss, computed with the
        head's ``weight`` and ``bias`` as they are inside the forward (gathered by
        FSDP/ZeRO-3's pre-forward hooks; their post-backward hooks reduce the gradients).
        The model hands the loss back as its ``logits``, after its own soft-cap/scale: what
        it returns must be exactly that transform of the loss (else the model changes its
        head's output in a way its config does not say, and is refused).

        Returns ``(loss, hidden, stats)``: the loss to back-propagate (through the model's
        output, which carries the wrappers' hooks), the ``(B, L, H)`` hidden states the head
        received, and the loss statistics (or None).
        """
        unwrapped = self.accelerator.unwrap_model(model)
        input_ids = inputs["input_ids"]
        found: Dict[str, Any] = {}

        def head_fn(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
            if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(input_ids.shape):
                raise ValueError(
                    f"model: lm_head input expected (B, L, H) with (B, L) = "
                    f"{tuple(input_ids.shape)} (every position), got {tuple(hidden.shape)}"
                )
            value, found["stats"] = self._gft_head_loss(
                hidden, weight, bias, inputs, weights, keep_graph_of=(weight, bias)
            )
            return value

        out, hidden, value = heads.call_with_head(
            model,
            unwrapped,
            head_fn,
            input_ids=input_ids,
            attention_mask=inputs["attention_mask"],
            use_cache=False,
            **heads.all_positions_kwargs(unwrapped),
            **forward_kwargs,
        )
        self._keep_router_aux_loss(out, bool(forward_kwargs.get("output_router_logits")))
        returned = heads.model_logits(out)
        expected = self.logit_transform.apply(value.detach())
        if returned is not value and not (
            isinstance(returned, torch.Tensor)
            and returned.shape == value.shape
            and returned.dtype == value.dtype
            and torch.allclose(returned.detach(), expected, rtol=1e-5, atol=1e-6)
        ):
            raise ValueError(
                "model: its forward changes the lm_head output (soft-capped or rescaled "
                "logits?) in a way its config does not say; the GFT loss computed in the "
                "lm_head cannot pass through it"
            )
        if returned is value or self.logit_transform.is_identity:
            # The model's own output carries the wrappers' hooks (DDP may return a copy).
            return returned, hidden, found["stats"]
        # The model transformed the loss as if it were logits: back-propagate the loss itself,
        # through the model's output (a zero-valued term) so that the wrappers' hooks run.
        return value + (returned - returned.detach()).sum() * 0.0, hidden, found["stats"]

    def _head_compute_dtype(self) -> Optional[torch.dtype]:
        """The dtype the fused head runs in: the mixed-precision dtype, as ``lm_head`` would
        (None: the hidden states' own dtype)."""
        return self._mixed_precision_dtype()

    def _mixed_precision_dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype of the Trainer's mixed precision, None without it."""
        mode = getattr(self.accelerator, "mixed_precision", "no")
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(mode))

    @torch.no_grad()
    def _check_head(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> None:
        """Once: the model's own logits must equal what the fused loss computes, the
        transform of ``hidden @ W.T (+ b)`` (one row)."""
        unwrapped = self.accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            ids, am = input_ids[:1], attention_mask[:1]
            n = int(am.sum())
            if self._computes_loss_in_head(model):
                # Wrapped/sharded: the weight is read inside the head's forward, where the
                # loss will be computed.
                logits, mine = self._head_check_in_forward(model, ids, am)
                logits, mine = logits[0, :n], mine[0, :n]
            else:
                logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits[0, :n]
                hidden = self.final_hidden_states(model, ids, am)[0, :n]
                weight, bias = self._head(model)
                mine = hidden.float() @ weight.float().t()
                if bias is not None:
                    mine = mine + bias.float()
                mine = self.logit_transform.apply(mine)
        finally:
            unwrapped.train(was_training)
        err = (mine - logits.float()).abs().max().item()
        scale = logits.float().abs().max().item() + 1.0
        half = self._mixed_precision_dtype() is not None or logits.dtype not in (
            torch.float32,
            torch.float64,
        )
        tol = 5e-2 if half else 1e-3
        relative = err / scale if err == err else float("inf")
        if self.accelerator.num_processes > 1:
            # Every rank takes the same decision (a rank raising alone would leave the
            # others waiting in their next collective).
            relative = heads.max_over_ranks(relative, logits.device)
            err = heads.max_over_ranks(err, logits.device)  # the figure the message gives
        if not relative <= tol:
            raise ValueError(
                f"model: its logits differ from the fused head's (hidden @ lm_head.weight.T "
                f"(+ bias), then {self.logit_transform}) by {err:.3g}: the model transforms its "
                "logits in a way its config does not say, and the fused GFT head cannot "
                "reproduce them. Set check_head=False only if this is expected."
            )
        self._head_checked = True

    def _head_check_in_forward(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The model's logits and the fused head's (fp32, read inside the head's forward),
        from one forward of the model.

        Warns when the model ties its input embedding to the head but the two hold different
        tensors inside the forward (a tied pair put in two FSDP groups trains two copies).
        """
        unwrapped = self.accelerator.unwrap_model(model)
        untied: List[bool] = []
        config = getattr(unwrapped, "config", None)
        get_input = getattr(unwrapped, "get_input_embeddings", None)
        embedding = None
        if getattr(config, "tie_word_embeddings", False) and callable(get_input):
            embedding = get_input()
            while isinstance(getattr(embedding, "_fsdp_wrapped_module", None), nn.Module):
                embedding = embedding._fsdp_wrapped_module
        mine: List[torch.Tensor] = []

        def head_fn(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
            if embedding is not None and getattr(embedding, "weight", None) is not weight:
                untied.append(True)
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                z = hidden.float() @ weight.float().t()
                mine.append(self.logit_transform.apply(z + bias.float() if bias is not None else z))
            # What the real head returns, so the model's forward runs as usual.
            return torch.nn.functional.linear(hidden, weight, bias)

        out, _, _ = heads.call_with_head(
            model,
            unwrapped,
            head_fn,
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            **heads.all_positions_kwargs(unwrapped),
        )
        if untied:
            warnings.warn(
                "model: tie_word_embeddings is set but, inside the forward, the lm_head weight "
                "is not the input embedding's weight (are they sharded in two different FSDP "
                "groups?); they will train as two diverging copies. Shard them in one group, "
                "e.g. fully_shard([embed_tokens, lm_head, ...]) or on the root module.",
                RuntimeWarning,
                stacklevel=2,
            )
        logits = heads.model_logits(out)
        if logits is None or logits.shape != mine[0].shape:
            raise ValueError(
                f"model: logits of shape {None if logits is None else tuple(logits.shape)} "
                f"differ from the lm_head output {tuple(mine[0].shape)}; the fused GFT head "
                "cannot reproduce them"
            )
        return logits, mine[0]

    def _gft_head_loss(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        inputs: Dict[str, Any],
        weights: torch.Tensor,
        keep_graph_of: Sequence[Optional[torch.Tensor]] = (),
    ) -> Tuple[torch.Tensor, Any]:
        args = self.args
        return loss.fused_head_loss(
            hidden,
            weight,
            bias,
            inputs,
            weights,
            tau=args.tau,
            temperature=args.temperature,
            transform=self.logit_transform,
            return_stats=args.log_token_stats,
            backend=args.gft_backend,
            chunk_size=args.gft_chunk_size,
            head=args.gft_head,
            compute_dtype=self._head_compute_dtype(),
            keep_graph_of=keep_graph_of,
        )
