"""``GFTConfig``: ``transformers.TrainingArguments`` plus the GFT loss and sampling options."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from transformers import TrainingArguments

from gft_kernels._head import HEAD_STRATEGIES
from gft_kernels._options import REDUCED_MODES, check_choice, check_int
from gft_kernels.backends import check_backend_name

# The reduced aggregation modes of the loss. ``none`` (per-token losses) is left out: a
# trainer needs a scalar to back-propagate.
TRAINER_LOSS_AGG_MODES = REDUCED_MODES
# ``step``: normalised over the optimizer step (all micro-batches and ranks);
# ``micro_batch``: each micro-batch its own mean (the published GFT code).
LOSS_NORMALIZATIONS = ("step", "micro_batch")


@dataclass
class FusedHeadOptions:
    """The fused head's options, shared by ``GFTConfig`` and ``GFTGRPOConfig`` (each
    documents them); their checks are in :meth:`check_fused_head_options`."""

    gft_backend: str = field(default="auto", metadata={"help": "Backend of fused_linear_gft_loss."})
    gft_chunk_size: Optional[int] = field(
        default=None, metadata={"help": "Token chunk of the fused head (None: default)."}
    )
    gft_head: str = field(
        default="chunked",
        metadata={"help": "Head strategy: chunked, blockwise or blockwise_exact."},
    )
    log_token_stats: bool = field(
        default=True, metadata={"help": "Log rectified_fraction and entropy."}
    )
    check_head: bool = field(
        default=True, metadata={"help": "Check the fused head against the model's logits once."}
    )

    def check_fused_head_options(self) -> None:
        check_backend_name("gft_backend", self.gft_backend)
        check_choice("gft_head", self.gft_head, tuple(HEAD_STRATEGIES))
        if self.gft_head != "chunked" and self.gft_chunk_size is not None:
            raise ValueError(
                f"gft_chunk_size: applies to gft_head='chunked' only, got {self.gft_chunk_size} "
                f"with gft_head={self.gft_head!r}"
            )


@dataclass
class GFTConfig(TrainingArguments, FusedHeadOptions):
    """Training arguments for :class:`~gft_kernels.integration.GFTTrainer`.

    All fields of ``transformers.TrainingArguments`` apply; the GFT fields are:

    Attributes:
        tau: DCR threshold: token weight ``c = q if q <= tau else 1`` (``q`` = the target's
            probability at temperature 1).
        temperature: temperature of ``log p``; also the default sampling temperature of
            the self samples (the rollout and the loss should agree on it).
        loss_agg_mode: one of ``token-mean``, ``seq-mean-token-sum``,
            ``seq-mean-token-mean``, ``seq-mean-token-sum-norm``, ``sum``.
        loss_normalization: ``step`` (default): the counts ``loss_agg_mode`` divides by are
            those of the whole optimizer step, over every gradient-accumulation micro-batch
            and every rank (``token-mean``: the step's response tokens; ``seq-*``: its
            responses; ``seq-mean-token-sum-norm``: responses x ``Tlen``), so any split of
            the step into batch size x accumulation steps x ranks gives the same update.
            ``micro_batch``: each micro-batch is its own mean and the Trainer averages them
            (the published GFT code).
        norm_adv_by_std: GRPO advantages ``(r - mean) / (std + eps)`` when True, else
            ``r - mean`` (Dr. GRPO style).
        adv_eps: the ``eps`` of the advantages.
        num_self_samples: responses sampled from the current policy per prompt at every
            training step and merged into the prompt's group (needs reward functions).
        max_response_length: responses are truncated to this many tokens; it is also
            ``Tlen`` of ``seq-mean-token-sum-norm`` (else the longest response of the step)
            and the default ``max_new_tokens`` of the self samples.
        max_prompt_length: prompts keep their last this-many tokens (None: all).
        generation_kwargs: keywords of ``model.generate`` for the self samples, merged over
            the faithful defaults (``do_sample=True``, ``temperature``, ``top_k=0``,
            ``top_p=1``, ``repetition_penalty=1``, ``max_new_tokens=max_response_length``
            or 256); nothing comes from the model's own generation config.
        mask_truncated_completions: self samples that end without an eos (cut at
            ``max_new_tokens`` or ``max_response_length``) keep their place in the group's
            advantages but are left out of the loss.
        reward_weights: one weight per reward function (default: all 1).
        log_completions: print a few self samples (prompt, completion, reward, advantage)
            at every log, and keep them in ``trainer.completion_samples``.
        num_completions_to_print: how many samples ``log_completions`` prints.
        gft_backend: ``backend`` of ``fused_linear_gft_loss`` (``auto``, ``triton``, ``cpu``,
            ``torch``).
        gft_chunk_size: ``chunk_size`` of ``fused_linear_gft_loss`` (None: its default).
        gft_head: ``head`` of ``fused_linear_gft_loss``: ``chunked`` (default),
            ``blockwise`` or ``blockwise_exact`` (Triton kernels, on GPU).
        log_token_stats: log ``rectified_fraction`` and the mean entropy. They come from the
            loss pass itself, but every valid token then reaches the head, including those of
            zero-advantage groups that would otherwise be skipped.
        check_head: on the first batch, compare the head's logits as the fused loss computes
            them (``hidden @ W.T (+ b)``, then the model's soft-cap and scale read from its
            config) with the model's own logits once and raise if they differ: a model that
            transforms its logits in a way its config does not say cannot use the fused head.
        model_init_kwargs: keywords of ``from_pretrained`` / ``from_config`` when the trainer
            is given a model name or a config instead of a model.

    ``remove_unused_columns`` defaults to False here: the collator needs the raw
    ``prompt``/``responses`` fields, which are not arguments of ``model.forward``.
    """

    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep dataset columns: the GFT collator needs prompt/responses."},
    )
    tau: float = field(default=0.1, metadata={"help": "DCR threshold tau >= 0."})
    temperature: float = field(default=1.0, metadata={"help": "Temperature of log p (> 0)."})
    loss_agg_mode: str = field(
        default="token-mean",
        metadata={"help": "Aggregation: " + ", ".join(TRAINER_LOSS_AGG_MODES)},
    )
    norm_adv_by_std: bool = field(
        default=True, metadata={"help": "Divide advantages by the group std (GRPO)."}
    )
    adv_eps: float = field(default=1e-6, metadata={"help": "eps added to the group std."})
    loss_normalization: str = field(
        default="step",
        metadata={"help": "Normalise per optimizer step (step) or per micro-batch (micro_batch)."},
    )
    num_self_samples: int = field(
        default=0, metadata={"help": "Policy samples per prompt added to each group."}
    )
    max_response_length: Optional[int] = field(
        default=None, metadata={"help": "Truncate responses; Tlen of seq-mean-token-sum-norm."}
    )
    max_prompt_length: Optional[int] = field(
        default=None, metadata={"help": "Keep the last tokens of longer prompts."}
    )
    # ``dict | str | None`` (the shape HfArgumentParser reads as a string): a JSON string
    # from the command line becomes a dict; None means the defaults.
    generation_kwargs: Optional[Union[Dict[str, Any], str]] = field(
        default=None,
        metadata={"help": "Keywords of model.generate for the self samples (dict or JSON)."},
    )
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "Leave self samples without an eos out of the loss."}
    )
    reward_weights: Optional[List[float]] = field(
        default=None, metadata={"help": "One weight per reward function (default: all 1)."}
    )
    log_completions: bool = field(
        default=False, metadata={"help": "Print a few self samples at every log."}
    )
    num_completions_to_print: int = field(
        default=4, metadata={"help": "Self samples printed by log_completions."}
    )
    model_init_kwargs: Optional[Union[Dict[str, Any], str]] = field(
        default=None,
        metadata={"help": "Keywords for loading a model from a name or config (dict or JSON)."},
    )

    def __post_init__(self) -> None:
        self._check_gft_fields()
        super().__post_init__()

    def _check_gft_fields(self) -> None:
        def number(name: str, value: object) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name}: expected a finite number, got {value}")
            return float(value)

        if number("tau", self.tau) < 0:
            raise ValueError(f"tau: expected a value in [0, inf), got {self.tau}")
        if number("temperature", self.temperature) <= 0:
            raise ValueError(f"temperature: expected a value > 0, got {self.temperature}")
        if number("adv_eps", self.adv_eps) < 0:
            raise ValueError(f"adv_eps: expected a value >= 0, got {self.adv_eps}")
        check_choice("loss_agg_mode", self.loss_agg_mode, TRAINER_LOSS_AGG_MODES)
        if not isinstance(self.norm_adv_by_std, bool):
            raise TypeError(
                f"norm_adv_by_std: expected a bool, got {type(self.norm_adv_by_std).__name__}"
            )
        check_choice("loss_normalization", self.loss_normalization, LOSS_NORMALIZATIONS)
        for name in ("num_self_samples", "num_completions_to_print"):
            check_int(name, getattr(self, name), minimum=0)
        for name in ("max_response_length", "max_prompt_length", "gft_chunk_size"):
            check_int(name, getattr(self, name), allow_none=True)
        for name in ("generation_kwargs", "model_init_kwargs"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{name}: expected a dict or a JSON object, got {value!r}"
                    ) from err
        if self.generation_kwargs is None:
            self.generation_kwargs = {}
        if not isinstance(self.generation_kwargs, dict):
            raise TypeError(
                f"generation_kwargs: expected a dict, got {type(self.generation_kwargs).__name__}"
            )
        if self.reward_weights is not None:
            if isinstance(self.reward_weights, (str, bytes)) or not isinstance(
                self.reward_weights, (list, tuple)
            ):
                raise TypeError(
                    "reward_weights: expected None or a list of numbers, got "
                    f"{type(self.reward_weights).__name__}"
                )
            self.reward_weights = [
                number(f"reward_weights[{i}]", w) for i, w in enumerate(self.reward_weights)
            ]
        self.check_fused_head_options()
        if self.model_init_kwargs is not None and not isinstance(self.model_init_kwargs, dict):
            raise TypeError(
                "model_init_kwargs: expected None or a dict, got "
                f"{type(self.model_init_kwargs).__name__}"
            )
