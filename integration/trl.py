"""GFT on TRL's ``GRPOTrainer``: demonstrations in the groups, the fused GFT loss.

:class:`GFTGRPOTrainer` is a ``trl.GRPOTrainer`` whose groups hold, next to the policy's own
samples, each prompt's expert/teacher completions from dataset columns, and whose loss is
the GFT loss computed with the fused head. Everything else is TRL's: generation
(transformers or vLLM), reward functions, group advantages, logging.

Groups. TRL repeats every prompt ``num_generations`` times and forms a group of those rows
(across processes). In each group the first rows take the prompt's demonstrations, in the
order of ``demonstration_columns`` (a column holds one completion or a list of them); the
remaining rows keep TRL's samples. The reward functions score demonstrations and samples
alike, so GRPO's group advantages compare them. Demonstrations are tokenized without special
tokens, end as the policy's samples would (see :meth:`GFTGRPOTrainer._completion_ending`:
the chat template's end-of-turn token for a conversational prompt, else the eos) and are cut
to ``max_completion_length``.

Loss. Per token of a completion, ``-A * c * log p`` with ``c = stopgrad(q if q <= tau else
1)`` (GFT's dynamic coefficient rectification), aggregated by ``loss_agg_mode`` over the
optimizer step (all micro-batches and processes; TRL's ``num_items_in_batch`` for
``token-mean``), with the logits never materialised. TRL's clipping, KL and importance
sampling terms do not apply (GFT trains on-policy samples and off-policy demonstrations with
the same bounded weight).

Needs ``trl`` (``pip install gft-kernels[trl]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import is_conversational

from . import loss
from .config import TRAINER_LOSS_AGG_MODES, FusedHeadOptions
from .fused_head import FusedHeadMixin
from .heads import head_logit_transform

__all__ = ["GFTGRPOConfig", "GFTGRPOTrainer"]


# GRPOConfig options of GRPO's clipped, importance-weighted objective (its loss types,
# clipping ranges, sequence-level ratios, entropy masking and bonus, off-policy masks and
# vLLM's importance-sampling correction). GFT's loss has none of them; each must keep
# TRL's default (read from GRPOConfig itself, so a TRL release that changes one is
# followed). Names a TRL release lacks are skipped.
GRPO_ONLY_OPTIONS = (
    "loss_type",
    "epsilon",
    "epsilon_high",
    "delta",
    "importance_sampling_level",
    "top_entropy_quantile",
    "entropy_coef",
    "use_adaptive_entropy",
    "off_policy_mask_threshold",
    "vllm_importance_sampling_correction",
)


@dataclass
class GFTGRPOConfig(GRPOConfig, FusedHeadOptions):
    """``trl.GRPOConfig`` plus the GFT options.

    Attributes:
        tau: DCR threshold: token weight ``c = q if q <= tau else 1``.
        loss_agg_mode: ``token-mean`` (default), ``seq-mean-token-sum``,
            ``seq-mean-token-mean``, ``seq-mean-token-sum-norm`` (``Tlen =
            max_completion_length``) or ``sum``, over the optimizer step.
        demonstration_columns: dataset columns whose completions join each prompt's group,
            in this order (a missing or None value: none for that prompt).
        demonstration_reward: a fixed reward for every demonstration instead of what the
            reward functions give it (None, the default: they score demonstrations as they
            score samples).
        gft_backend: ``backend`` of ``fused_linear_gft_loss``.
        gft_chunk_size: ``chunk_size`` of ``fused_linear_gft_loss`` (None: its default).
        gft_head: ``head`` of ``fused_linear_gft_loss``: ``chunked`` (default),
            ``blockwise`` or ``blockwise_exact`` (Triton kernels, on GPU).
        log_token_stats: log ``rectified_fraction`` and ``entropy`` (from the loss pass).
        check_head: on the first batch, compare the model's own logits with what the fused
            head computes (its weight, bias and the logit transform read from the config),
            as ``GFTTrainer`` does; a mismatch raises ``ValueError`` on every rank.

    ``num_generations`` counts the whole group (demonstrations + samples); ``temperature`` is
    both the sampling temperature and that of ``log p``. The options of GRPO's clipped
    objective (:data:`GRPO_ONLY_OPTIONS`) do not apply to ``-A c log p``: set away from
    TRL's defaults they are refused; ``beta`` must stay 0 (no KL term).
    """

    tau: float = field(default=0.1, metadata={"help": "DCR threshold tau >= 0."})
    loss_agg_mode: str = field(
        default="token-mean",
        metadata={"help": "Aggregation: " + ", ".join(TRAINER_LOSS_AGG_MODES)},
    )
    demonstration_columns: List[str] = field(
        default_factory=lambda: ["expert", "teacher"],
        metadata={"help": "Dataset columns whose completions join each prompt's group."},
    )
    demonstration_reward: Optional[float] = field(
        default=None,
        metadata={"help": "A fixed reward for every demonstration (None: the reward functions')."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)):
            raise TypeError(f"tau: expected a real number, got {type(self.tau).__name__}")
        if not (math.isfinite(self.tau) and self.tau >= 0):
            raise ValueError(f"tau: expected a value in [0, inf), got {self.tau}")
        if self.loss_agg_mode not in TRAINER_LOSS_AGG_MODES:
            raise ValueError(
                f"loss_agg_mode: expected one of {', '.join(TRAINER_LOSS_AGG_MODES)}, got "
                f"{self.loss_agg_mode!r}"
            )
        self.check_fused_head_options()
        if isinstance(self.demonstration_columns, str) or not all(
            isinstance(c, str) for c in self.demonstration_columns
        ):
            raise TypeError(
                "demonstration_columns: expected a list of column names, got "
                f"{self.demonstration_columns!r}"
            )
        if "self" in self.demonstration_columns:
            raise ValueError('demonstration_columns: "self" names the policy samples')
        if self.beta != 0.0:
            raise ValueError(f"beta: expected 0 (the GFT loss has no KL term), got {self.beta}")
        reward = self.demonstration_reward
        if reward is not None:
            if isinstance(reward, bool) or not isinstance(reward, (int, float)):
                raise TypeError(
                    "demonstration_reward: expected None or a finite number, got "
                    f"{type(reward).__name__}"
                )
            if not math.isfinite(reward):
                raise ValueError(
                    f"demonstration_reward: expected None or a finite number, got {reward!r}"
                )
        if self.remove_unused_columns and self.demonstration_columns:
            raise ValueError(
                "remove_unused_columns: expected False (TRL's default): True drops the "
                f"demonstration columns {self.demonstration_columns} before the trainer sees "
                "them, which would train plain GRPO"
            )
        defaults = {f.name: f.default for f in fields(GRPOConfig)}
        for name in GRPO_ONLY_OPTIONS:
            if name in defaults and getattr(self, name) != defaults[name]:
                raise ValueError(
                    f"{name}: an option of GRPO's clipped objective that the GFT loss "
                    f"(-A c log p, aggregated by loss_agg_mode) does not use; expected TRL's "
                    f"default {defaults[name]!r}, got {getattr(self, name)!r}"
                )


def _check_columns(where: str, wanted: List[str], columns: List[str]) -> None:
    """A demonstration column the data lacks (misspelled, or dropped on the way) is an
    error: without it the groups would silently hold policy samples only."""
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ValueError(
            f"demonstration_columns: {missing} not in {where} (columns: {sorted(columns)}); "
            "check the spelling, or set demonstration_columns=[] to train without "
            "demonstrations"
        )


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and "content" in value


class GFTGRPOTrainer(FusedHeadMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with demonstrations in the groups and the fused GFT loss.

    Arguments: as ``trl.GRPOTrainer``, with a :class:`GFTGRPOConfig`. Custom rollouts
    (``rollout_func``) and tools are not supported.

    Logged besides TRL's metrics: ``reward/<source>/mean`` (source: a demonstration column
    or ``self``), ``rectified_fraction`` and ``entropy`` (over all processes). Reward
    functions get each row's source as the keyword ``gft_source``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, GFTGRPOConfig):
            raise TypeError(f"args: expected a GFTGRPOConfig, got {type(self.args).__name__}")
        if getattr(self, "tools", None) or getattr(self, "rollout_func", None) is not None:
            raise ValueError(
                "tools/rollout_func: not supported by GFTGRPOTrainer (the demonstrations "
                "replace single-turn samples)"
            )
        self.sources = [*self.args.demonstration_columns, "self"]
        # Checked once here for a datasets.Dataset, and on every batch's rows in any case.
        columns = getattr(self.train_dataset, "column_names", None)
        if isinstance(columns, list):
            _check_columns("train_dataset", self.args.demonstration_columns, columns)
        self.logit_transform = head_logit_transform(self.accelerator.unwrap_model(self.model))
        self._head_checked = not self.args.check_head
        if self.args.demonstration_reward is not None and not bool(self.reward_weights.any()):
            raise ValueError(
                "reward_weights: a fixed demonstration_reward needs a reward function with a "
                "nonzero weight to carry it, got all zero"
            )
        self._skip_old_logps = False
        self._pending_demos: Optional[List[Optional[List[int]]]] = None
        self._pending_sources: Optional[List[int]] = None

    # -- demonstrations ------------------------------------------------------------------

    def _completion_ending(self, prompt: Any) -> List[int]:
        """The tokens a demonstration for ``prompt`` ends with: those a policy sample ends with.

        TRL stops a sample at the first of its eos ids (``eos_token_ids``: the tokenizer's and
        the model's generation config's), which the completion keeps, and appends nothing.
        For a conversational prompt the policy answers in the chat template's assistant turn,
        and the template closes that turn with its end-of-turn token (Qwen's ``<|im_end|>``,
        Llama 3's ``<|eot_id|>``), an eos id of such a model even where the tokenizer's eos
        is another token: the ending is what the template writes after the assistant's
        content, up to and including its first eos id. For a plain prompt, or a template
        whose turn ends without an eos id (a sample then runs on to the eos), the eos.
        """
        eos = self.eos_token_ids[0] if self.eos_token_ids else self._tokenizer.eos_token_id
        plain = [] if eos is None else [eos]
        if not is_conversational({"prompt": prompt}):
            return plain
        marker = "GFTDEMONSTRATIONCONTENT"
        text = self.processing_class.apply_chat_template(
            [*prompt, {"role": "assistant", "content": marker}],
            chat_template=self.chat_template,
            tokenize=False,
            **self.chat_template_kwargs,
        )
        if not isinstance(text, str) or marker not in text:
            return plain
        after = text[text.rindex(marker) + len(marker) :]
        ids = list(self._tokenizer.encode(after, add_special_tokens=False))
        end = next((j for j, t in enumerate(ids) if t in self.eos_token_ids), None)
        return plain if end is None else ids[: end + 1]

    def _demonstration_ids(
        self, where: str, value: Any, ending: Optional[List[int]] = None
    ) -> List[List[int]]:
        """The completions of one column value (a completion or a list of them) as ids, each
        followed by ``ending`` (default: the eos) unless it already ends with an eos id."""
        if value is None:
            return []
        single = (
            isinstance(value, str)
            or _is_message(value)
            or (isinstance(value, (list, tuple)) and value and all(_is_message(v) for v in value))
            or (
                isinstance(value, (list, tuple))
                and value
                and all(isinstance(v, int) for v in value)
            )
        )
        items = [value] if single else list(value)
        tokenizer = self._tokenizer
        if ending is None:
            ending = self._completion_ending(None)
        out = []
        for j, item in enumerate(items):
            if isinstance(item, (list, tuple)) and item and all(isinstance(v, int) for v in item):
                ids = [int(v) for v in item]
            else:
                if _is_message(item):
                    item = item["content"]
                elif isinstance(item, (list, tuple)) and item and all(_is_message(v) for v in item):
                    item = item[-1]["content"]  # the assistant turn of a chat completion
                if not isinstance(item, str) or not item:
                    raise TypeError(
                        f"{where}[{j}]: expected a completion (text, token ids or assistant "
                        f"message), got {item!r}"
                    )
                ids = list(tokenizer.encode(item, add_special_tokens=False))
            # Text and token ids alike end as a policy sample would.
            if not ids or ids[-1] not in self.eos_token_ids:
                ids += ending
            out.append(ids[: self.max_completion_length])
        return out

    def _assign_demonstrations(self, inputs: List[Dict[str, Any]]) -> None:
        """Which local rows take a demonstration: row ``i`` sits at position ``(process
        offset + i) % num_generations`` of its group (TRL's global row order), and the
        group's first positions take the prompt's demonstrations."""
        group = self.num_generations if self.model.training else self.num_generations_eval
        offset = self.accelerator.process_index * len(inputs)
        demos: List[Optional[List[int]]] = []
        sources: List[int] = []
        for i, row in enumerate(inputs):
            _check_columns(f"inputs[{i}]", self.args.demonstration_columns, list(row))
            available = []
            ending = None
            for code, column in enumerate(self.args.demonstration_columns):
                where = f'inputs[{i}]["{column}"]'
                value = row.get(column)
                if value is not None and ending is None:
                    ending = self._completion_ending(row.get("prompt"))
                available += [(code, ids) for ids in self._demonstration_ids(where, value, ending)]
            if len(available) > group:
                raise ValueError(
                    f"num_generations: a group of {group} cannot hold the {len(available)} "
                    f"demonstrations of inputs[{i}]; expected num_generations >= {len(available)}"
                )
            position = (offset + i) % group
            if position < len(available):
                sources.append(available[position][0])
                demos.append(available[position][1])
            else:
                sources.append(len(self.sources) - 1)
                demos.append(None)
        self._pending_demos, self._pending_sources = demos, sources

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs
    ):
        """TRL's generation, with the demonstration rows' completions replaced (and, on the
        plain transformers path, not generated at all)."""
        demos = self._pending_demos
        if demos is None or all(d is None for d in demos):
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs
            )
        if len(demos) != len(prompt_ids):
            raise RuntimeError(
                f"GFTGRPOTrainer: {len(prompt_ids)} prompts to generate for, "
                f"{len(demos)} demonstration slots"
            )
        plain = (
            not self.use_vllm
            and not getattr(self, "use_transformers_continuous_batching", False)
            and images is None
            and not multimodal_fields
        )
        if plain:
            rows = [i for i, d in enumerate(demos) if d is None]
            # A rank whose rows are all demonstrations still generates (one row, discarded):
            # with a sharded model (FSDP, ZeRO-3) generation is collective, and a rank that
            # skipped it would leave the others waiting.
            asked = rows or [0]
            sampled, logprobs = super()._generate_single_turn(
                [prompt_ids[i] for i in asked], None, {}, num_generations, *args, **kwargs
            )
            if not rows:
                sampled, logprobs = [], None
            completion_ids = [list(d) if d is not None else None for d in demos]
            for i, ids in zip(rows, sampled):
                completion_ids[i] = ids
            return completion_ids, logprobs  # None: this path keeps no sampling log-probs
        completion_ids, logprobs = super()._generate_single_turn(
            prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs
        )
        completion_ids = [list(d) if d is not None else c for d, c in zip(demos, completion_ids)]
        if logprobs is not None:
            # No sampling log-probs for a demonstration: NaN makes TRL's importance ratio 1.
            logprobs = [
                [math.nan] * len(d) if d is not None else lp for d, lp in zip(demos, logprobs)
            ]
        return completion_ids, logprobs

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards (all processes), plus their mean per source in the metrics.

        Reward functions receive each row's source as the keyword ``gft_source`` (a list:
        ``"self"`` or the demonstration column the row's completion came from)."""
        if self._pending_sources is not None:
            if "gft_source" in inputs[0]:
                raise ValueError(
                    "train_dataset: a column named 'gft_source' would hide the rows' sources "
                    "GFTGRPOTrainer passes to reward functions; rename it"
                )
            inputs = [
                {**row, "gft_source": self.sources[code]}
                for row, code in zip(inputs, self._pending_sources)
            ]
        rewards_per_func = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )
        if self._pending_sources is not None:
            device = rewards_per_func.device
            local = torch.tensor(self._pending_sources, device=device)
            sources = self.accelerator.gather(local)
            weights = self.reward_weights.to(device)
            fixed = self.args.demonstration_reward
            if fixed is not None:
                # TRL sums weight * reward over the functions, skipping NaN: one function
                # (the first with a nonzero weight) carries fixed / weight, the others NaN.
                demo = sources != len(self.sources) - 1
                k = int(weights.nonzero()[0])
                rewards_per_func = rewards_per_func.clone()
                rewards_per_func[demo] = float("nan")
                rewards_per_func[demo, k] = fixed / weights[k]
            rewards = (rewards_per_func * weights[None]).nansum(dim=1)
            mode = "train" if self.model.training else "eval"
            for code, name in enumerate(self.sources):
                pick = sources == code
                if bool(pick.any()):
                    value = rewards[pick].mean().item()
                    self._metrics[mode][f"reward/{name}/mean"].append(value)
        return rewards_per_func

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any):
        """TRL's log-prob forward, skipped while it would only give the old policy's log-probs
        (``num_iterations > 1``, or generation and optimizer steps out of step): the GFT loss
        never reads them. With vLLM's importance-sampling correction TRL needs them for its
        ratio, so they are computed there."""
        if self._skip_old_logps:
            return None, None, None
        return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        self._assign_demonstrations(inputs)
        # With beta = 0 (enforced) the only log-prob forward TRL runs while scoring is the
        # old policy's.
        self._skip_old_logps = not (self.use_vllm and self.vllm_importance_sampling_correction)
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._skip_old_logps = False
            sources, self._pending_demos, self._pending_sources = self._pending_sources, None, None
        device = output["completion_mask"].device
        output["gft_sources"] = torch.tensor(sources, device=device)
        # The seq-* modes divide by the generation batch's responses (all processes).
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        per_row = mask.sum(1)
        tokens, sequences, longest, _ = loss.reduce_counts(
            float(per_row.sum()), float((per_row > 0).sum()), float(per_row.max()), device
        )
        output["gft_sequences"] = torch.tensor(sequences, dtype=torch.float64, device=device)
        self._log_lengths_per_source(output["gft_sources"], output["completion_mask"].sum(1))
        return output

    def _log_lengths_per_source(self, sources: torch.Tensor, lengths: torch.Tensor) -> None:
        """``completions/<source>/mean_length`` and ``num_tokens/<source>`` (completion tokens
        over all processes): TRL's ``completions/*`` and ``num_tokens`` mix the policy's
        samples with the demonstrations, whose lengths say nothing of the policy."""
        sources = self.accelerator.gather(sources)
        lengths = self.accelerator.gather(lengths.to(torch.float64))
        mode = "train" if self.model.training else "eval"
        for code, name in enumerate(self.sources):
            pick = sources == code
            if bool(pick.any()):
                self._metrics[mode][f"completions/{name}/mean_length"].append(
                    lengths[pick].mean().item()
                )
                self._metrics[mode][f"num_tokens/{name}"].append(lengths[pick].sum().item())

    # -- loss ----------------------------------------------------------------------------

    def _head_compute_dtype(self) -> Optional[torch.dtype]:
        """``cast_lm_head_to_fp32``: the head runs in fp32 (hidden states cast up), as TRL
        runs its own fp32 head; otherwise the mixed-precision dtype."""
        if self.args.cast_lm_head_to_fp32:
            return torch.float32
        return super()._head_compute_dtype()

    def _compute_loss(self, model, inputs):
        """The GFT loss of one micro-batch: its share of the optimizer step's loss (TRL
        scales nothing afterwards: ``loss_is_scaled_for_ga``)."""
        args: GFTGRPOConfig = self.args
        prompt_mask, completion_mask = inputs["prompt_mask"], inputs["completion_mask"]
        mask = completion_mask
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        batch = {
            "input_ids": torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),
            "response_mask": torch.cat([torch.zeros_like(prompt_mask), mask], dim=1),
            "advantages": inputs["advantages"].reshape(-1),
        }
        if not self._head_checked:
            self._check_head(model, batch["input_ids"], batch["attention_mask"])
        positions = loss.response_positions(batch)
        training = self.model.training
        if training:
            # One optimizer step holds GA / steps_per_generation of the generation batch.
            share = self.current_gradient_accumulation_steps / args.steps_per_generation
            tokens = float(inputs["num_items_in_batch"]) * share
            sequences = float(inputs["gft_sequences"]) * share
            normalizer = loss.LossNormalizer(
                tokens,
                sequences,
                float(self.max_completion_length),
                ranks=self.accelerator.num_processes,
                per_step=True,
            )
        else:
            normalizer = loss.step_normalizer([positions], positions.device, across_ranks=False)
        weights = loss.normalized_weights(
            positions, args.loss_agg_mode, normalizer, self.max_completion_length
        )
        value, _, stats = self.head_loss(
            model, batch, weights, router_aux_loss=self.aux_loss_enabled
        )
        mode = "train" if training else "eval"
        if self.aux_loss_enabled:
            # As TRL adds it to its own loss: the coefficient, and the micro-batch's share of
            # the accumulated step (the GFT value above already is a share).
            aux = self.last_router_aux_loss
            steps = self.current_gradient_accumulation_steps if training else 1.0
            value = value + self.router_aux_loss_coef * aux / steps
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux.detach()).mean().item()
            )
        if stats is not None:
            n = positions.sum().to(torch.float64)
            totals = torch.stack(
                [
                    stats.entropy.sum().to(torch.float64),
                    stats.rectified_fraction.to(torch.float64) * n,
                    n,
                ]
            )
            totals = self.accelerator.reduce(totals, reduction="sum")
            count = max(float(totals[2]), 1.0)
            self._metrics[mode]["entropy"].append(float(totals[0]) / count)
            self._metrics[mode]["rectified_fraction"].append(float(totals[1]) / count)
        return value
