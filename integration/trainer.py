"""``GFTTrainer``: a ``transformers.Trainer`` that trains with the fused GFT loss.

Per batch of prompt groups (see :mod:`.collator`):

1. optionally, ``num_self_samples`` responses per prompt are sampled from the current
   policy, scored by ``reward_fn`` and appended to the prompt's group (the hybrid group);
2. the groups are padded into rows and the advantages computed inside each group;
3. the model *body* runs once for the final hidden states; only the hidden states that
   predict response tokens (position t - 1 predicts the token at t) are kept, and they go
   with the lm_head weight (and bias) into :func:`gft_kernels.fused_linear_gft_loss`, so
   prompt and padding positions never reach the head and the ``tokens x vocab`` logits are
   never materialised.

A wrapped (DDP, FSDP, DeepSpeed) or sharded (FSDP2) model runs its own forward instead, and
the loss is computed inside the lm_head's forward, where sharding frameworks have gathered
the full head weight and from where they reduce its gradient (see
:meth:`GFTTrainer.loss_in_head_forward`).

The loss equals :func:`gft_kernels.reference.gft_loss_reference` on the model's full logits
``logits[:, :-1]`` with targets ``input_ids[:, 1:]`` and mask ``response_mask[:, 1:]``, for
every mode; for ``seq-mean-token-sum-norm`` with ``Tlen = max_response_length`` (when it is
not set, ``Tlen`` is the longest response of the batch, verl's ``response_length``, where
the reference on full rows would use the padded row length).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import warnings
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, Trainer

from gft_kernels import fused_linear_gft_loss
from gft_kernels.distributed import global_num_tokens

from .collator import SOURCE_CODES, DeferredGroups, GFTDataCollator, PromptGroup, Response
from .config import GFTConfig

# reward_fn(prompt, response) -> float; prompt/response are text when the collator has a
# tokenizer, else lists of token ids.
RewardFn = Callable[[Union[str, List[int]], Union[str, List[int]]], float]


def default_attn_implementation(dtype: Optional[torch.dtype] = None) -> str:
    """``flash_attention_2`` where it can run (flash-attn installed, CUDA, fp16/bf16
    compute), else ``sdpa`` (PyTorch's fused attention, on every device)."""
    if (
        torch.cuda.is_available()
        and dtype in (torch.bfloat16, torch.float16)
        and importlib.util.find_spec("flash_attn") is not None
    ):
        return "flash_attention_2"
    return "sdpa"


def create_model(
    model: Union[str, os.PathLike, PretrainedConfig], args: GFTConfig
) -> PreTrainedModel:
    """A causal LM from a name/path (``from_pretrained``) or a config (``from_config``).

    The attention implementation is :func:`default_attn_implementation` unless
    ``args.model_init_kwargs`` names one; the compute dtype it is chosen for is the
    ``dtype`` there, else bf16/fp16 when mixed precision is on.
    """
    kwargs = dict(args.model_init_kwargs or {})
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    kwargs.setdefault("attn_implementation", default_attn_implementation(dtype))
    if isinstance(model, PretrainedConfig):
        return AutoModelForCausalLM.from_config(model, **kwargs)
    return AutoModelForCausalLM.from_pretrained(model, **kwargs)


def _response_layout(
    mask: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions of each row's valid tokens, packed to the left: ``(B, T_resp)`` indices
    into the row and their validity. Sorting puts a row's masked positions first in
    order, so this also holds for non-contiguous masks (e.g. multi-turn)."""
    n_pos = mask.shape[1]
    positions = torch.arange(n_pos, device=mask.device).expand_as(mask)
    key = torch.where(mask, positions, torch.full_like(positions, n_pos))
    width = max(int(mask.sum(1).max()), 1)
    packed = key.sort(dim=1).values[:, :width]
    valid = packed < n_pos
    # Padded slots point at a real position; the mask keeps them away from the head.
    return packed.clamp_max(n_pos - 1), valid


class GFTTrainer(Trainer):
    """Trains a causal LM with the GFT loss on hybrid response groups.

    Args:
        model: a causal LM (``PreTrainedModel``), or a name/path or a ``PretrainedConfig``
            to create one with :func:`create_model` (flash-attention 2 when installed and
            usable, SDPA otherwise; a model passed in is used as it is).
        args: a :class:`GFTConfig`.
        data_collator: default: a :class:`GFTDataCollator` built from ``args`` and
            ``processing_class``.
        reward_fn: ``reward_fn(prompt, response) -> float`` scoring the self samples;
            required when ``args.num_self_samples > 0``. Text in, when the collator has a
            tokenizer (prompt text, response decoded without special tokens), else token ids.
        Other arguments: as ``transformers.Trainer``.

    Logged (averaged over the steps between two logs; ``eval_`` prefixed in evaluation):
    ``rectified_fraction``, ``entropy`` (mean over response tokens), ``response_tokens``,
    ``reward/mean`` and, per source present in the batch, ``reward/<source>``,
    ``advantage/<source>`` and ``num_responses/<source>`` (``num_responses/self`` counts
    the self samples).

    The loss of each micro-batch is its own mean (``token-mean`` divides by the micro-batch's
    response tokens, counted over all data-parallel ranks and divided by their number, so
    that DDP's gradient average equals one rank holding the whole micro-batch); under
    gradient accumulation the Trainer averages the micro-batches.
    Models whose logits are not ``hidden @ W.T (+ b)`` (soft-capped or rescaled logits) are
    rejected by the first-batch check (``args.check_head``).

    Wrapped models (DDP, FSDP, DeepSpeed) and models sharded with FSDP2 (e.g.
    ``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=...))``) run
    through their own forward, and the loss is computed inside the lm_head's forward
    (:meth:`loss_in_head_forward`): the full head weight exists only there under FSDP and
    ZeRO-3, and their hooks reduce its gradient. Tensor-parallel heads are not supported.
    """

    # compute_loss returns a per-micro-batch mean: the Trainer divides it by the number of
    # accumulation steps (transformers >= 5 reads this attribute).
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: Union[PreTrainedModel, nn.Module, str, os.PathLike, PretrainedConfig, None] = None,
        args: Optional[GFTConfig] = None,
        data_collator: Optional[Callable] = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_fn: Optional[RewardFn] = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, GFTConfig):
            raise TypeError(f"args: expected a GFTConfig, got {type(args).__name__}")
        if args.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns: expected False (the collator needs the prompt and "
                "responses fields), got True"
            )
        if isinstance(model, (str, os.PathLike, PretrainedConfig)):
            model = create_model(model, args)
        if reward_fn is not None and not callable(reward_fn):
            raise TypeError(f"reward_fn: expected a callable, got {type(reward_fn).__name__}")
        if args.num_self_samples > 0 and reward_fn is None:
            raise ValueError(
                f"reward_fn: required to score the self samples (num_self_samples="
                f"{args.num_self_samples}), got None"
            )
        if data_collator is None:
            data_collator = GFTDataCollator(
                processing_class,
                pad_token_id=None if processing_class is not None else _model_pad_id(model),
                norm_adv_by_std=args.norm_adv_by_std,
                adv_eps=args.adv_eps,
                max_response_length=args.max_response_length,
            )
        if isinstance(data_collator, GFTDataCollator):
            for name, expected in (
                ("norm_adv_by_std", args.norm_adv_by_std),
                ("max_response_length", args.max_response_length),
                ("adv_eps", float(args.adv_eps)),
            ):
                if getattr(data_collator, name) != expected:
                    raise ValueError(
                        f"data_collator.{name}: expected {expected!r} (as args.{name}), got "
                        f"{getattr(data_collator, name)!r}"
                    )
        self.gft_collator = data_collator if isinstance(data_collator, GFTDataCollator) else None
        if args.num_self_samples > 0:
            if self.gft_collator is None:
                raise TypeError(
                    "data_collator: self-sampling needs a GFTDataCollator (the trainer adds "
                    f"the samples before padding), got {type(data_collator).__name__}"
                )
            # The loader only checks/tokenizes; padding and advantages happen after the
            # self samples are in their groups (see compute_loss).
            data_collator = DeferredGroups(self.gft_collator)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.reward_fn = reward_fn
        self._gft_metrics: Dict[str, Dict[str, List[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._head_checked = not args.check_head

    # -- self samples -------------------------------------------------------------------

    def _eos_ids(self, model: PreTrainedModel, gen_kwargs: Dict[str, Any]) -> List[int]:
        eos = gen_kwargs.get("eos_token_id")
        tokenizer = self.gft_collator.tokenizer if self.gft_collator is not None else None
        if eos is None and tokenizer is not None:
            eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None and getattr(model, "generation_config", None) is not None:
            eos = model.generation_config.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]

    @torch.no_grad()
    def sample_responses(
        self, model: nn.Module, groups: Sequence[PromptGroup]
    ) -> List[List[List[int]]]:
        """``num_self_samples`` responses per prompt from the current policy.

        The model is put in eval mode (no dropout) for generation and back in its previous
        mode afterwards. Returns, per prompt, lists of response token ids cut after the
        first eos (inclusive); empty generations are dropped.
        """
        args: GFTConfig = self.args
        unwrapped = self.accelerator.unwrap_model(model)
        collator = self.gft_collator
        pad = collator.pad_token_id
        gen_kwargs = dict(args.generation_kwargs)
        if gen_kwargs.get("do_sample", False):
            # Sample at the temperature the loss reads log p at, unless told otherwise.
            gen_kwargs.setdefault("temperature", args.temperature)
        eos_ids = self._eos_ids(unwrapped, gen_kwargs)
        if eos_ids:
            gen_kwargs.setdefault("eos_token_id", eos_ids)
        gen_kwargs.setdefault("pad_token_id", pad)

        # Decoder-only generation continues from the last column: left padding.
        width = max(len(g.prompt_ids) for g in groups)
        device = self.args.device
        input_ids = torch.full((len(groups), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(groups), width), dtype=torch.long)
        for i, group in enumerate(groups):
            input_ids[i, width - len(group.prompt_ids) :] = torch.tensor(group.prompt_ids)
            attention_mask[i, width - len(group.prompt_ids) :] = 1
        k = args.num_self_samples
        # Rows repeated rather than num_return_sequences, which greedy decoding refuses.
        input_ids = input_ids.repeat_interleave(k, dim=0)
        attention_mask = attention_mask.repeat_interleave(k, dim=0)
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            out = unwrapped.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                **gen_kwargs,
            )
        finally:
            unwrapped.train(was_training)
        generated = out[:, width:].tolist()
        eos_set = set(eos_ids)
        samples: List[List[List[int]]] = []
        for i in range(len(groups)):
            per_prompt = []
            for row in generated[i * k : (i + 1) * k]:
                cut = next((j + 1 for j, tok in enumerate(row) if tok in eos_set), len(row))
                if cut:
                    per_prompt.append(row[:cut])
            samples.append(per_prompt)
        return samples

    def _reward_inputs(self, group: PromptGroup, ids: List[int]) -> Tuple[Any, Any]:
        tokenizer = self.gft_collator.tokenizer if self.gft_collator is not None else None
        if tokenizer is None:
            return list(group.prompt_ids), list(ids)
        prompt = group.prompt_text
        if prompt is None:
            prompt = tokenizer.decode(list(group.prompt_ids), skip_special_tokens=True)
        return prompt, tokenizer.decode(ids, skip_special_tokens=True)

    def add_self_samples(
        self, model: nn.Module, groups: Sequence[PromptGroup]
    ) -> List[PromptGroup]:
        """Sample, score with ``reward_fn`` and append the samples to each prompt's group
        (source ``"self"``), before the advantages are computed."""
        samples = self.sample_responses(model, groups)
        merged = []
        for g, (group, responses) in enumerate(zip(groups, samples)):
            extra = []
            for ids in responses:
                reward = self.reward_fn(*self._reward_inputs(group, ids))
                try:
                    reward = float(reward)
                except (TypeError, ValueError):
                    raise TypeError(
                        f"reward_fn: expected a float for group {g}, got {type(reward).__name__}"
                    ) from None
                if reward != reward or reward in (float("inf"), float("-inf")):
                    raise ValueError(f"reward_fn: expected a finite reward, got {reward}")
                extra.append(Response(tuple(ids), reward, "self"))
            merged.append(group.with_responses(extra))
        return merged

    # -- batch ---------------------------------------------------------------------------

    def _materialize(self, model: nn.Module, inputs: Dict[str, Any]) -> Dict[str, Any]:
        """Deferred groups -> (self samples when training) -> padded batch on the device."""
        if DeferredGroups.KEY not in inputs:
            return inputs
        groups = inputs[DeferredGroups.KEY]
        if model.training and self.args.num_self_samples > 0:
            groups = self.add_self_samples(model, groups)
        return self._prepare_inputs(self.gft_collator.collate(groups))

    def floating_point_ops(self, inputs: Dict[str, Any]) -> int:
        if DeferredGroups.KEY in inputs and hasattr(self.model, "num_parameters"):
            # Raw groups (self samples not yet added): count the tokens that are there.
            tokens = sum(
                len(g.prompt_ids) + len(r.ids) for g in inputs[DeferredGroups.KEY]
                for r in g.responses
            )
            return 6 * tokens * self.model.num_parameters(exclude_embeddings=True)
        return super().floating_point_ops(inputs)

    # -- hidden states and head ----------------------------------------------------------

    @staticmethod
    def _body(unwrapped: nn.Module) -> Optional[nn.Module]:
        """The decoder stack without the head (``LlamaModel`` in ``LlamaForCausalLM``)."""
        body = None
        if callable(getattr(unwrapped, "get_decoder", None)):
            body = unwrapped.get_decoder()
        if (body is None or body is unwrapped) and isinstance(unwrapped, PreTrainedModel):
            body = unwrapped.base_model
        if body is None or body is unwrapped or not isinstance(body, nn.Module):
            return None
        return body

    def final_hidden_states(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``(B, L, H)`` hidden states the lm_head reads, from one pass of the model body.

        A wrapped model (DDP, ...) must run through its own forward (gradient sync hooks),
        so there, and for models without a separable body, the full model runs with
        ``output_hidden_states`` (and ``logits_to_keep`` = no position, where supported, so
        the head still computes nothing). (Training uses :meth:`loss_in_head_forward` for
        wrapped and sharded models.)
        """
        unwrapped = self.accelerator.unwrap_model(model)
        body = self._body(unwrapped) if model is unwrapped else None
        if body is not None:
            # accelerate applies mixed precision by wrapping model.forward; the body is
            # called directly, so it gets the same autocast here.
            with self.accelerator.autocast():
                out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        kwargs: Dict[str, Any] = {"output_hidden_states": True, "use_cache": False}
        if "logits_to_keep" in inspect.signature(unwrapped.forward).parameters:
            kwargs["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=input_ids.device)
        out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.hidden_states[-1]

    def _head(self, model: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return _head_params(_output_head(self.accelerator.unwrap_model(model)))

    def _computes_loss_in_head(self, model: nn.Module) -> bool:
        """Whether the loss must be computed inside the lm_head's forward: the model is
        wrapped (DDP, FSDP, DeepSpeed: it must run through its own forward) or sharded
        (FSDP2 / DTensor parameters: the full head weight exists only inside the forward).
        A model only wrapped by ``torch.compile`` keeps the fused op outside its graph (the
        full-forward path of :meth:`final_hidden_states`)."""
        unwrapped = self.accelerator.unwrap_model(model)
        if _is_sharded(unwrapped):
            return True
        return model is not unwrapped and type(model).__name__ != "OptimizedModule"

    @staticmethod
    def _all_positions_kwargs(unwrapped: nn.Module) -> Dict[str, Any]:
        """Forward keywords that make the model pass every position to its head."""
        if "logits_to_keep" in inspect.signature(unwrapped.forward).parameters:
            return {"logits_to_keep": 0}
        return {}

    def loss_in_head_forward(
        self, model: nn.Module, inputs: Dict[str, Any]
    ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[Any, ...]]:
        """The GFT loss computed inside the lm_head's forward, during the model's own forward.

        For wrapped and sharded models: for the duration of one ``model(...)`` call, the
        forward of the unwrapped model's output embedding (``get_output_embeddings()``) is
        replaced by one that takes the head's input (the final hidden states, every position)
        and returns the fused GFT loss computed with the head's ``weight`` and ``bias`` as
        they are inside the forward (gathered by FSDP/ZeRO-3's pre-forward hooks; their
        gradients are reduced by the post-backward hooks like those of a plain lm_head).
        The model hands the loss back as its ``logits``; a model that changes its head's
        output (soft-capping, scaling) is refused.

        Returns ``(loss, hidden, (mask, stats_mask, stats))``: the loss as the model returned
        it, the ``(B, L, H)`` hidden states the head received, and what
        :meth:`_record_metrics` needs.
        """
        unwrapped = self.accelerator.unwrap_model(model)
        head = _output_head(unwrapped)
        input_ids = inputs["input_ids"]
        attention_mask = inputs["attention_mask"]
        result: Dict[str, Any] = {}

        def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if "loss" in result:
                raise ValueError(
                    "model: its forward calls the lm_head more than once; the GFT loss "
                    "computed in the lm_head needs exactly one call"
                )
            if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(input_ids.shape):
                raise ValueError(
                    f"model: lm_head input expected (B, L, H) with (B, L) = "
                    f"{tuple(input_ids.shape)} (every position), got {tuple(hidden.shape)}"
                )
            weight, bias = _head_params(head)
            result["hidden"] = hidden
            loss, *rest = self._gft_head_loss(
                hidden, weight, bias, inputs, keep_graph_of=(weight, bias)
            )
            result["loss"], result["rest"] = loss, tuple(rest)
            return loss

        with _forward_replaced(head, forward):
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                **self._all_positions_kwargs(unwrapped),
            )
        if "loss" not in result:
            raise ValueError(
                "model: its forward did not call the lm_head (get_output_embeddings())"
            )
        returned = getattr(out, "logits", None)
        if returned is None and isinstance(out, (tuple, list)) and out:
            returned = out[0]
        loss = result["loss"]
        # The model's own output carries the wrappers' hooks (DDP may return a copy): it is
        # what backward must start from, and it must still be the loss.
        if returned is not loss and not (
            isinstance(returned, torch.Tensor)
            and returned.shape == loss.shape
            and returned.dtype == loss.dtype
            and torch.equal(returned.detach(), loss.detach())
        ):
            raise ValueError(
                "model: its forward changes the lm_head output (soft-capped or rescaled "
                "logits?); the GFT loss computed in the lm_head cannot pass through it"
            )
        return returned, result["hidden"], result["rest"]

    def _mixed_precision_dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype of the Trainer's mixed precision, None without it."""
        mode = getattr(self.accelerator, "mixed_precision", "no")
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(mode))

    @torch.no_grad()
    def _check_head(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> None:
        """Once: the model's own logits must equal ``hidden @ W.T (+ b)`` (one row)."""
        unwrapped = self.accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            ids, am = input_ids[:1], attention_mask[:1]
            n = int(am.sum())
            if self._computes_loss_in_head(model):
                # Wrapped/sharded: the weight is read inside the head's forward, where the
                # loss will be computed; the model must return the head's output unchanged.
                logits, mine = self._head_check_in_forward(model, ids, am)
                logits, mine = logits[0, :n], mine[0, :n]
            else:
                logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits[0, :n]
                hidden = self.final_hidden_states(model, ids, am)[0, :n]
                weight, bias = self._head(model)
                mine = hidden.float() @ weight.float().t()
                if bias is not None:
                    mine = mine + bias.float()
        finally:
            unwrapped.train(was_training)
        err = (mine - logits.float()).abs().max().item()
        scale = logits.float().abs().max().item() + 1.0
        half = self._mixed_precision_dtype() is not None or logits.dtype not in (
            torch.float32, torch.float64
        )
        tol = 5e-2 if half else 1e-3
        relative = err / scale if err == err else float("inf")
        if self.accelerator.num_processes > 1:
            # Every rank takes the same decision (a rank raising alone would leave the
            # others waiting in their next collective).
            relative = _max_over_ranks(relative, logits.device)
        if not relative <= tol:
            raise ValueError(
                f"model: its logits differ from hidden @ lm_head.weight.T (+ bias) by {err:.3g} "
                "(soft-capped or rescaled logits?); the fused GFT head cannot reproduce them. "
                "Set check_head=False only if this is expected."
            )
        self._head_checked = True

    def _head_check_in_forward(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The model's logits and ``head_input @ W.T (+ b)`` (fp32, read inside the head's
        forward), from one forward of the model.

        Warns when the model ties its input embedding to the head but the two hold different
        tensors inside the forward (a tied pair put in two FSDP groups trains two copies).
        """
        unwrapped = self.accelerator.unwrap_model(model)
        head = _output_head(unwrapped)
        original = head.forward
        mine: List[torch.Tensor] = []
        untied: List[bool] = []
        config = getattr(unwrapped, "config", None)
        get_input = getattr(unwrapped, "get_input_embeddings", None)
        embedding = None
        if getattr(config, "tie_word_embeddings", False) and callable(get_input):
            embedding = get_input()
            while isinstance(getattr(embedding, "_fsdp_wrapped_module", None), nn.Module):
                embedding = embedding._fsdp_wrapped_module

        def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = original(hidden, *args, **kwargs)
            weight, bias = _head_params(head)
            if embedding is not None and getattr(embedding, "weight", None) is not weight:
                untied.append(True)
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                z = hidden.float() @ weight.float().t()
                mine.append(z + bias.float() if bias is not None else z)
            return out

        with _forward_replaced(head, forward):
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                **self._all_positions_kwargs(unwrapped),
            )
        if len(mine) != 1:
            raise ValueError(
                f"model: its forward calls the lm_head {len(mine)} times; the GFT loss "
                "computed in the lm_head needs exactly one call"
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
        logits = out.logits
        if logits.shape != mine[0].shape:
            raise ValueError(
                f"model: logits of shape {tuple(logits.shape)} differ from the lm_head "
                f"output {tuple(mine[0].shape)}; the fused GFT head cannot reproduce them"
            )
        return logits, mine[0]

    # -- loss ----------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ):
        """GFT loss of a batch from :class:`GFTDataCollator` (or deferred groups).

        Shapes: ``input_ids``/``attention_mask``/``response_mask`` (R, L),
        ``advantages``/``rewards``/``sources`` (R,). ``num_items_in_batch`` is unused: the
        loss is normalised per micro-batch as ``loss_agg_mode`` says.
        """
        inputs = self._materialize(model, inputs)
        input_ids = inputs["input_ids"]
        attention_mask = inputs["attention_mask"]
        if not self._head_checked:
            self._check_head(model, input_ids, attention_mask)

        if self._computes_loss_in_head(model):
            loss, hidden, (mask, m_in, stats) = self.loss_in_head_forward(model, inputs)
        else:
            hidden = self.final_hidden_states(model, input_ids, attention_mask)
            weight, bias = self._head(model)
            loss, mask, m_in, stats = self._gft_head_loss(hidden, weight, bias, inputs)

        self._record_metrics(model, inputs, mask, m_in, stats)
        if return_outputs:
            return loss, {"hidden_states": hidden}
        return loss

    def _gft_head_loss(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        inputs: Dict[str, Any],
        keep_graph_of: Sequence[Optional[torch.Tensor]] = (),
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Any]:
        """The fused GFT loss of the response positions of ``hidden`` ``(B, L, H)``.

        Returns ``(loss, mask, stats_mask, stats)``. ``keep_graph_of``: tensors that get a
        zero gradient when there is no response token at all (the head's parameters under
        FSDP, whose ranks must all reduce a gradient for them).
        """
        args: GFTConfig = self.args
        input_ids = inputs["input_ids"]
        attention_mask = inputs["attention_mask"]
        # Position t - 1 predicts the token at t.
        h = hidden[:, :-1]
        targets = input_ids[:, 1:]
        mask = inputs["response_mask"][:, 1:].bool() & attention_mask[:, 1:].bool()
        advantages = inputs["advantages"].to(torch.float32)

        if args.loss_agg_mode in ("token-mean", "sum"):
            # Token modes need no row structure: only the (N_resp, H) response rows.
            picked = mask.nonzero(as_tuple=True)
            h_in, t_in = h[picked], targets[picked]
            a_in = advantages[:, None].expand_as(targets)[picked]
            m_in = None
        else:
            # seq-* modes need (B, T_resp): each row's response positions packed left.
            pos, m_in = _response_layout(mask)
            h_in = h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))
            t_in = targets.gather(1, pos)
            a_in = advantages

        # Mixed precision: the head runs in the autocast dtype, as model.lm_head would (the
        # fused op accumulates dW in fp32 and returns fp32 loss); else in the body's dtype.
        compute_dtype = self._mixed_precision_dtype() or h_in.dtype
        h_in = h_in.to(compute_dtype)
        if weight.dtype != compute_dtype:
            weight = weight.to(compute_dtype)
            bias = bias.to(compute_dtype) if bias is not None else None
        # Under data parallelism the ranks' gradients are averaged, so token-mean divides by
        # the global token count over the world size (one all-reduce): N ranks then give
        # the gradient of one rank holding the whole batch.
        num_tokens = None
        if args.loss_agg_mode == "token-mean" and self.accelerator.num_processes > 1:
            num_tokens = global_num_tokens(t_in)
        stats = None
        if h_in.numel() == 0:  # no response token at all: a defined 0 that keeps the graph
            loss = hidden.sum() * 0.0
            for tensor in keep_graph_of:
                if tensor is not None and tensor.requires_grad:
                    loss = loss + tensor.sum() * 0.0
        else:
            # The fused op manages its own precision; autocast must not re-cast its matmuls.
            with torch.autocast(device_type=h_in.device.type, enabled=False):
                result = fused_linear_gft_loss(
                    h_in,
                    weight,
                    t_in,
                    a_in,
                    m_in,
                    bias=bias,
                    tau=args.tau,
                    temperature=args.temperature,
                    loss_agg_mode=args.loss_agg_mode,
                    max_response_length=args.max_response_length,
                    num_tokens=num_tokens,
                    return_stats=args.log_token_stats,
                    backend=args.gft_backend,
                    chunk_size=args.gft_chunk_size,
                )
            loss, stats = result if args.log_token_stats else (result, None)
        return loss, mask, m_in, stats

    def prediction_step(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: Optional[List[str]] = None,
    ):
        """Evaluation: the GFT loss of the batch (no self samples, no predictions)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- metrics -------------------------------------------------------------------------

    def _record_metrics(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        mask: torch.Tensor,
        stats_mask: Optional[torch.Tensor],
        stats: Any,
    ) -> None:
        values: Dict[str, torch.Tensor] = {}
        n_tokens = mask.sum()
        values["response_tokens"] = n_tokens.float()
        if stats is not None:
            valid = stats_mask if stats_mask is not None else torch.ones_like(stats.entropy)
            valid = valid.to(stats.entropy.dtype)
            values["entropy"] = (stats.entropy * valid).sum() / valid.sum().clamp_min(1)
            values["rectified_fraction"] = stats.rectified_fraction.float()
        rewards = inputs["rewards"].float()
        advantages = inputs["advantages"].float()
        sources = inputs["sources"]
        values["reward/mean"] = rewards.mean()
        for name, code in SOURCE_CODES.items():
            pick = sources == code
            count = pick.sum()
            values[f"num_responses/{name}"] = count.float()
            values[f"reward/{name}"] = (rewards * pick).sum() / count.clamp_min(1)
            values[f"advantage/{name}"] = (advantages * pick).sum() / count.clamp_min(1)
        keys = list(values)
        # One device->host transfer for all metrics of the step.
        numbers = torch.stack([values[k].detach().float().reshape(()) for k in keys]).tolist()
        store = self._gft_metrics["train" if model.training else "eval"]
        counts = dict(zip(keys, numbers))
        for key, value in counts.items():
            name = key.split("/", 1)[-1]
            if key.startswith(("reward/", "advantage/")) and name in SOURCE_CODES:
                if counts[f"num_responses/{name}"] == 0:
                    continue  # this source is absent from the batch: no mean to log
            store[key].append(value)

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        """Adds the GFT metrics averaged since the last log to the Trainer's logs."""
        mode = "eval" if "eval_loss" in logs else "train" if "loss" in logs else None
        if mode is not None and self._gft_metrics[mode]:
            prefix = "eval_" if mode == "eval" else ""
            for key, vals in self._gft_metrics[mode].items():
                logs[prefix + key] = sum(vals) / len(vals)
            self._gft_metrics[mode].clear()
        if start_time is None:
            super().log(logs)
        else:
            super().log(logs, start_time)


def _model_pad_id(model: Any) -> Optional[int]:
    """Pad id from a model's config (then its eos), for a collator without tokenizer."""
    config = getattr(model, "config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _output_head(unwrapped: nn.Module) -> nn.Module:
    """The output embedding (lm_head) module, inside an FSDP1 wrapper if it has one."""
    get = getattr(unwrapped, "get_output_embeddings", None)
    head = get() if callable(get) else None
    while isinstance(getattr(head, "_fsdp_wrapped_module", None), nn.Module):
        head = head._fsdp_wrapped_module
    if not isinstance(head, nn.Module):
        raise ValueError("model: expected an output embedding (lm_head) with a weight")
    return head


def _head_params(head: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError("model: expected an output embedding (lm_head) with a weight")
    if weight.dim() != 2 or _is_dtensor(weight):
        raise ValueError(
            f"model: lm_head weight expected a full (V, H) tensor, got "
            f"{type(weight).__name__} of shape {tuple(weight.shape)} (a head sharded inside "
            "its forward, e.g. tensor parallelism, is not supported)"
        )
    bias = getattr(head, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None


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


def _is_dtensor(tensor: torch.Tensor) -> bool:
    types = _fsdp2_types()
    return bool(types) and isinstance(tensor, types[0])


def _is_sharded(module: nn.Module) -> bool:
    """FSDP2 (``fully_shard``) anywhere in the model, or DTensor parameters."""
    types = _fsdp2_types()
    if not types:
        return False
    dtensor, fsdp_module = types
    return any(isinstance(m, fsdp_module) for m in module.modules()) or any(
        isinstance(p, dtensor) for p in module.parameters()
    )


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, forward: Callable[..., Any]):
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


def _max_over_ranks(value: float, device: torch.device) -> float:
    """``value``'s maximum over the ranks of the default process group (itself without one)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())
