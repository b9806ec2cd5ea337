"""``GFTTrainer``: a ``transformers.Trainer`` that trains with the fused GFT loss.

Per optimizer step (all its gradient-accumulation micro-batches are read at once):

1. optionally, ``num_self_samples`` responses per prompt are sampled from the current
   policy (:mod:`.sampling`), scored by the reward functions and appended to the prompt's
   group (the hybrid group);
2. the groups are padded into rows and the advantages computed inside each group;
3. the step's counts (response tokens, responses, longest response; over all micro-batches
   and ranks) fix the loss normalisation (:mod:`.loss`);
4. per micro-batch, the model *body* runs once for the final hidden states; only those that
   predict response tokens go with the lm_head weight (and bias) into
   :func:`gft_kernels.fused_linear_gft_loss`.

A wrapped (DDP, FSDP, DeepSpeed) or sharded (FSDP2) model runs its own forward instead, and
the loss is computed inside the lm_head's forward (:mod:`.heads`), where sharding frameworks
have gathered the full head weight and from where they reduce its gradient.

With one micro-batch per step on one process, the loss equals
:func:`gft_kernels.reference.gft_loss_reference` on the model's full logits
``logits[:, :-1]`` with targets ``input_ids[:, 1:]`` and mask ``response_mask[:, 1:]``, for
every mode (``seq-mean-token-sum-norm``: divided by the number of responses too, as verl's
global-batch form, and with ``Tlen = max_response_length`` or the longest response).
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, Trainer

from . import heads, loss
from .collator import DeferredGroups, GFTDataCollator, PromptGroup, Response
from .config import GFTConfig
from .fused_head import FusedHeadMixin
from .metrics import MetricsAccumulator, record_batch
from .sampling import (
    PairRewardFn,
    RewardFunc,
    RewardScorer,
    SelfSample,
    Stopwatch,
    as_reward_funcs,
    eos_token_ids,
    sample_responses,
    self_sampling_kwargs,
)

# Names other modules (and older code) import from here.
_forward_replaced = heads.forward_replaced
_output_head = heads.output_head
_head_params = heads.head_params
_is_sharded = heads.is_sharded
_is_dtensor = heads.is_dtensor
_max_over_ranks = heads.max_over_ranks

# The batch key of the step's loss counts (see loss.LossNormalizer.to_tensor).
STEP_KEY = "gft_step_counts"


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


def _is_iterable_dataset(dataset: Any) -> bool:
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return True
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(dataset, datasets.IterableDataset)


class GFTTrainer(FusedHeadMixin, Trainer):
    """Trains a causal LM with the GFT loss on hybrid response groups.

    Args:
        model: a causal LM (``PreTrainedModel``), or a name/path or a ``PretrainedConfig``
            to create one with :func:`create_model` (flash-attention 2 when installed and
            usable, SDPA otherwise; a model passed in is used as it is).
        args: a :class:`GFTConfig`.
        data_collator: default: a :class:`GFTDataCollator` built from ``args`` and
            ``processing_class``.
        reward_funcs: reward functions for the self samples, in TRL's convention: one or a
            list of ``f(prompts, completions, completion_ids, **columns) -> list[float |
            None]``, called once per step with all self samples; ``columns`` are the
            dataset's extra fields (e.g. ``solution``), one value per completion, plus
            ``trainer_state``. Weighted by ``args.reward_weights``.
        reward_fn: alternatively, one pair function ``reward_fn(prompt, response) -> float``.
            Prompts and completions are text when the collator has a tokenizer (a chat
            prompt: its messages, and the completion ``[{"role": "assistant", "content":
            text}]``), else token id lists. One of the two is required when
            ``args.num_self_samples > 0``.
        Other arguments: as ``transformers.Trainer``.

    Logged (over the steps since the last log, all ranks; ``eval_`` prefixed in
    evaluation): ``reward/mean``, ``reward/std``, per source ``reward/<source>/mean``,
    ``reward/<source>/std``, ``advantage/<source>/mean``, ``num_responses/<source>`` (per
    step), ``frac_reward_zero_std`` (share of groups whose rewards are all equal),
    ``response_tokens`` (per step), ``rectified_fraction``, ``entropy``; with self-sampling,
    ``completions/mean_length``, ``completions/min_length``, ``completions/max_length``,
    ``completions/clipped_ratio`` (samples without an eos), ``rewards/<function>/mean`` and
    ``/std``; and ``tokens_per_second`` (prompt + response tokens trained, all ranks),
    ``timing/generation``, ``timing/reward``, ``timing/train`` (seconds per step, slowest
    rank).

    The loss is normalised per optimizer step (``args.loss_normalization="step"``): any
    split of a step into batch size x gradient accumulation x ranks gives the same update.
    The logit soft-cap and scale of the model (Gemma 2/3 ``final_logit_softcapping``, ...)
    are read from its config and applied inside the fused loss.

    Wrapped models (DDP, FSDP, DeepSpeed) and models sharded with FSDP2 (e.g.
    ``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=...))``) run
    through their own forward, and the loss is computed inside the lm_head's forward
    (:meth:`loss_in_head_forward`). Tensor-parallel heads are not supported.
    """

    # compute_loss returns its micro-batch's share of the step's loss times the number of
    # accumulation steps, and the Trainer divides by that number (transformers >= 5.19 reads
    # this attribute; older releases divide whenever num_items_in_batch is None, as here).
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: Union[PreTrainedModel, nn.Module, str, os.PathLike, PretrainedConfig, None] = None,
        args: Optional[GFTConfig] = None,
        data_collator: Optional[Callable] = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_fn: Optional[PairRewardFn] = None,
        reward_funcs: Union[RewardFunc, Sequence[RewardFunc], None] = None,
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
        funcs = as_reward_funcs(reward_fn, reward_funcs)
        if args.num_self_samples > 0 and not funcs:
            raise ValueError(
                f"reward_fn: reward_fn or reward_funcs is required to score the self samples "
                f"(num_self_samples={args.num_self_samples}), got None"
            )
        if args.num_self_samples > 0 and _is_iterable_dataset(train_dataset):
            raise TypeError(
                "train_dataset: self-sampling needs a map-style dataset (the prompt groups stay "
                "Python objects until the samples are added, which accelerate cannot dispatch "
                "from an iterable dataset), got an IterableDataset; pass a list or a "
                "datasets.Dataset"
            )
        if data_collator is None:
            data_collator = GFTDataCollator(
                processing_class,
                pad_token_id=None if processing_class is not None else _model_pad_id(model),
                norm_adv_by_std=args.norm_adv_by_std,
                adv_eps=args.adv_eps,
                max_response_length=args.max_response_length,
                max_prompt_length=args.max_prompt_length,
            )
        if isinstance(data_collator, GFTDataCollator):
            for name, expected in (
                ("norm_adv_by_std", args.norm_adv_by_std),
                ("max_response_length", args.max_response_length),
                ("max_prompt_length", args.max_prompt_length),
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
            # self samples are in their groups (see get_batch_samples).
            data_collator = DeferredGroups(self.gft_collator)
        self.generation_kwargs = self_sampling_kwargs(
            args.temperature,
            args.max_response_length,
            args.generation_kwargs,
            args.num_self_samples,
        )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        tokenizer = self.gft_collator.tokenizer if self.gft_collator is not None else None
        self.reward_scorer = RewardScorer(funcs, args.reward_weights, tokenizer) if funcs else None
        self.reward_fn = reward_fn
        self.logit_transform = heads.head_logit_transform(self.accelerator.unwrap_model(model))
        self.gft_metrics = {"train": MetricsAccumulator(), "eval": MetricsAccumulator()}
        self.stopwatch = Stopwatch()
        self.completion_samples: List[Dict[str, Any]] = []
        self._last_log_time: Optional[float] = None
        self._head_checked = not args.check_head

    # -- self samples -------------------------------------------------------------------

    def sample_responses(
        self, model: nn.Module, groups: Sequence[PromptGroup]
    ) -> List[List[SelfSample]]:
        """``num_self_samples`` responses per prompt from the current policy (see
        :func:`.sampling.sample_responses`)."""
        args: GFTConfig = self.args
        unwrapped = self.accelerator.unwrap_model(model)
        collator = self.gft_collator
        eos = eos_token_ids(unwrapped, self.generation_kwargs, collator.tokenizer)
        return sample_responses(
            unwrapped,
            groups,
            args.num_self_samples,
            self.generation_kwargs,
            pad_token_id=collator.pad_token_id,
            eos_ids=eos,
            device=self.args.device,
            max_response_length=args.max_response_length,
        )

    def add_self_samples(
        self, model: nn.Module, groups: Sequence[PromptGroup]
    ) -> List[PromptGroup]:
        """Sample, score with the reward functions and append the samples to each prompt's
        group (source ``"self"``), before the advantages are computed."""
        args: GFTConfig = self.args
        metrics = self.gft_metrics["train"]
        with self.stopwatch.time("generation"):
            samples = self.sample_responses(model, groups)
        with self.stopwatch.time("reward"):
            rewards, per_func = self.reward_scorer.score(groups, samples, trainer_state=self.state)
        flat = [s for per_prompt in samples for s in per_prompt]
        metrics.add(
            "completion_length",
            [len(s.ids) for s in flat],
            {
                "mean": "completions/mean_length",
                "min": "completions/min_length",
                "max": "completions/max_length",
            },
        )
        metrics.add(
            "clipped", [float(s.truncated) for s in flat], {"mean": "completions/clipped_ratio"}
        )
        for name, values in per_func.items():
            metrics.add(
                f"reward_func/{name}",
                values,
                {"mean": f"rewards/{name}/mean", "std": f"rewards/{name}/std"},
            )
        merged = []
        for group, per_prompt, scores in zip(groups, samples, rewards):
            extra = [
                Response(
                    s.ids,
                    r,
                    "self",
                    trainable=not (args.mask_truncated_completions and s.truncated),
                )
                for s, r in zip(per_prompt, scores)
            ]
            merged.append(group.with_responses(extra))
        if args.log_completions:
            self._keep_samples(merged, samples)
        return merged

    def _keep_samples(self, groups: Sequence[PromptGroup], samples: Sequence[Any]) -> None:
        scorer = self.reward_scorer
        rows = []
        for group, per_prompt in zip(groups, samples):
            batch = self.gft_collator.collate([group])
            n_given = len(group.responses) - len(per_prompt)
            for i, sample in enumerate(per_prompt):
                rows.append(
                    {
                        "step": self.state.global_step,
                        "prompt": scorer.prompt_for(group),
                        "completion": scorer.completion_for(group, sample.ids),
                        "reward": float(batch["rewards"][n_given + i]),
                        "advantage": float(batch["advantages"][n_given + i]),
                    }
                )
        self.completion_samples = rows

    # -- batches -------------------------------------------------------------------------

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> Tuple[List[Dict[str, Any]], None]:
        """The micro-batches of one optimizer step, with the self samples in their groups
        and the step's loss counts (over all micro-batches and ranks) in each batch."""
        if self._last_log_time is None:
            self._last_log_time = time.perf_counter()
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = [self._materialize(self.model, b, sample=True) for b in batches]
        if batches and self.args.loss_normalization == "step":
            normalizer = loss.step_normalizer(
                [loss.response_positions(b) for b in batches],
                self.args.device,
                across_ranks=self.accelerator.num_processes > 1,
            )
            for batch in batches:
                batch[STEP_KEY] = normalizer.to_tensor()
        self.gft_metrics["train"].step()
        # None: the loss is normalised by the step counts above, not by the Trainer.
        return batches, None

    def _materialize(
        self, model: nn.Module, inputs: Dict[str, Any], sample: bool = False
    ) -> Dict[str, Any]:
        """Deferred groups -> (self samples, when ``sample``) -> padded batch."""
        if DeferredGroups.KEY not in inputs:
            return inputs
        groups = inputs[DeferredGroups.KEY]
        if sample and self.args.num_self_samples > 0:
            groups = self.add_self_samples(model, groups)
        return self.gft_collator.collate(groups)

    def floating_point_ops(self, inputs: Dict[str, Any]) -> int:
        if DeferredGroups.KEY in inputs and hasattr(self.model, "num_parameters"):
            # Raw groups (evaluation with deferred groups): count the tokens that are there.
            tokens = sum(
                len(g.prompt_ids) + len(r.ids)
                for g in inputs[DeferredGroups.KEY]
                for r in g.responses
            )
            return 6 * tokens * self.model.num_parameters(exclude_embeddings=True)
        return super().floating_point_ops(inputs)

    # -- loss ----------------------------------------------------------------------------

    def training_step(self, model: nn.Module, inputs: Dict[str, Any], *args: Any, **kwargs: Any):
        with self.stopwatch.time("train"):
            return super().training_step(model, inputs, *args, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ):
        """GFT loss of a batch from :class:`GFTDataCollator` (or deferred groups).

        Shapes: ``input_ids``/``attention_mask``/``response_mask`` (R, L),
        ``advantages``/``rewards``/``sources``/``group_ids`` (R,). In training, the batch's
        share of its step's loss (the step counts travel in the batch, see
        :meth:`get_batch_samples`; a batch without them is its own step), times the number of
        accumulation steps the Trainer divides by. ``num_items_in_batch`` is unused.
        """
        args: GFTConfig = self.args
        if DeferredGroups.KEY in inputs:
            inputs = self._prepare_inputs(self._materialize(model, inputs))
        input_ids = inputs["input_ids"]
        attention_mask = inputs["attention_mask"]
        if not self._head_checked:
            self._check_head(model, input_ids, attention_mask)

        mask = loss.response_positions(inputs)
        training = model.training
        normalizer = self._normalizer(inputs, mask, training)
        weights = loss.normalized_weights(
            mask, args.loss_agg_mode, normalizer, args.max_response_length
        )

        value, hidden, stats = self.head_loss(model, inputs, weights)

        self._record_metrics(training, inputs, mask, stats)
        if training and normalizer.per_step:
            # The Trainer divides every micro-batch's loss by the accumulation steps.
            value = value * self.current_gradient_accumulation_steps
        if return_outputs:
            return value, {"hidden_states": hidden}
        return value

    def _normalizer(
        self, inputs: Dict[str, Any], mask: torch.Tensor, training: bool
    ) -> loss.LossNormalizer:
        """The counts of this batch's loss: its step's (training, step normalisation), the
        micro-batch's own (``micro_batch``), or the batch alone (evaluation)."""
        args: GFTConfig = self.args
        across = self.accelerator.num_processes > 1
        if not training:
            return loss.step_normalizer([mask], mask.device, across_ranks=False)
        if args.loss_normalization == "micro_batch":
            return loss.micro_batch_normalizer(mask, args.loss_agg_mode, across_ranks=across)
        counts = inputs.get(STEP_KEY)
        if counts is not None:
            return loss.LossNormalizer.from_tensor(counts)
        # Called outside the Trainer's loop (training_step by hand): the batch is the step.
        return loss.step_normalizer([mask], mask.device, across_ranks=across)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: Optional[List[str]] = None,
    ):
        """Evaluation: the GFT loss of the batch (no self samples, no predictions)."""
        inputs = self._prepare_inputs(self._materialize(model, inputs))
        with torch.no_grad(), self.compute_loss_context_manager():
            value = self.compute_loss(model, inputs)
        self.gft_metrics["eval"].step()
        return value.detach(), None, None

    # -- metrics -------------------------------------------------------------------------

    def _record_metrics(
        self, training: bool, inputs: Dict[str, Any], mask: torch.Tensor, stats: Any
    ) -> None:
        record_batch(
            self.gft_metrics["train" if training else "eval"], inputs, mask, stats, training
        )

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        """Adds the GFT metrics since the last log (all ranks) to the Trainer's logs."""
        mode = (
            "eval"
            if any(k.startswith("eval_") for k in logs)
            else ("train" if "loss" in logs else None)
        )
        if mode is not None:
            values = self.gft_metrics[mode].reduce(self.args.device)
            if mode == "train":
                self._add_throughput(values)
            prefix = "eval_" if mode == "eval" else ""
            logs.update({prefix + k: v for k, v in values.items()})
            if mode == "train" and self.args.log_completions:
                self._print_samples()
        if start_time is None:
            super().log(logs)
        else:
            super().log(logs, start_time)

    def _add_throughput(self, values: Dict[str, float]) -> None:
        """``tokens_per_second`` and per-step timings (slowest rank) from the stopwatch."""
        now = time.perf_counter()
        steps = max(self.state.global_step - getattr(self, "_last_log_step", 0), 1)
        self._last_log_step = self.state.global_step
        seconds = self.stopwatch.pop()
        elapsed = now - self._last_log_time if self._last_log_time is not None else None
        self._last_log_time = now
        timings = torch.tensor(
            [seconds.get(k, 0.0) for k in ("generation", "reward", "train")]
            + [elapsed or seconds.get("train", 0.0)],
            dtype=torch.float64,
            device=self.args.device,
        )
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(timings, op=dist.ReduceOp.MAX)
        generation, reward, train, wall = timings.tolist()
        if self.args.num_self_samples > 0:
            values["timing/generation"] = generation / steps
            values["timing/reward"] = reward / steps
        values["timing/train"] = train / steps
        tokens = values.pop("#tokens", None)
        if tokens is not None and wall > 0:
            values["tokens_per_second"] = tokens / wall

    def _print_samples(self) -> None:
        if not self.is_world_process_zero() or not self.completion_samples:
            return
        rows = self.completion_samples[: self.args.num_completions_to_print]
        print(f"self samples at step {self.state.global_step}:")
        for row in rows:
            print(
                f"  reward {row['reward']:+.3f} advantage {row['advantage']:+.3f} | "
                f"prompt: {row['prompt']!r} | completion: {row['completion']!r}"
            )


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
