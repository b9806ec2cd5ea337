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

The loss equals :func:`gft_kernels.reference.gft_loss_reference` on the model's full logits
``logits[:, :-1]`` with targets ``input_ids[:, 1:]`` and mask ``response_mask[:, 1:]``, for
every mode; for ``seq-mean-token-sum-norm`` with ``Tlen = max_response_length`` (when it is
not set, ``Tlen`` is the longest response of the batch, verl's ``response_length``, where
the reference on full rows would use the padded row length).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
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
    rejected by the first-batch check (``args.check_head``). FSDP and DeepSpeed ZeRO-3 shard
    the head weight outside the forward and are not supported.
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
        the head still computes nothing).
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
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise ValueError("model: expected an output embedding (lm_head) with a weight")
        weight = head.weight
        if weight.dim() != 2:
            raise ValueError(
                f"model: lm_head weight expected (V, H), got shape {tuple(weight.shape)} "
                "(a sharded head, e.g. FSDP/ZeRO-3, is not supported)"
            )
        bias = getattr(head, "bias", None)
        return weight, bias if isinstance(bias, torch.Tensor) else None

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
        if not err <= tol * scale:
            raise ValueError(
                f"model: its logits differ from hidden @ lm_head.weight.T (+ bias) by {err:.3g} "
                "(soft-capped or rescaled logits?); the fused GFT head cannot reproduce them. "
                "Set check_head=False only if this is expected."
            )
        self._head_checked = True

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
        args: GFTConfig = self.args
        inputs = self._materialize(model, inputs)
        input_ids = inputs["input_ids"]
        attention_mask = inputs["attention_mask"]
        if not self._head_checked:
            self._check_head(model, input_ids, attention_mask)

        hidden = self.final_hidden_states(model, input_ids, attention_mask)
        weight, bias = self._head(model)
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

        self._record_metrics(model, inputs, mask, m_in, stats)
        if return_outputs:
            return loss, {"hidden_states": hidden}
        return loss

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
