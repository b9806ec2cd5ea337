"""Self samples: responses drawn from the policy itself, and their rewards.

Faithful sampling. The loss trains ``log p`` of the policy at ``temperature``, so the self
samples are drawn from exactly that distribution: an explicit generation config with
``do_sample=True``, the trainer's temperature, ``top_k=0``, ``top_p=1``, no repetition
penalty and nothing taken from the model's own ``generation_config`` (which often sets
``top_p``/``top_k``/penalties for chat use). The user's ``generation_kwargs`` are merged on
top. ``max_new_tokens`` defaults to ``max_response_length``, and a sample longer than that is
cut before it is scored, so the reward always scores the tokens that are trained.

Rewards. Reward functions follow TRL's calling convention: batched,
``f(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]``,
where ``columns`` are the dataset's extra fields (e.g. a ground-truth ``solution``), one
value per completion; several functions are summed with weights (``None`` means "does not
apply": the others are summed, as ``nansum``).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .collator import PromptGroup, check_reward

# max_new_tokens when neither generation_kwargs nor max_response_length says.
DEFAULT_MAX_NEW_TOKENS = 256

# The sampling distribution itself: these keys make the samples come from softmax(z / T).
_SAMPLING_DEFAULTS: Dict[str, Any] = {
    "do_sample": True,
    "top_k": 0,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "num_beams": 1,
}
_SAMPLE_ONLY_KEYS = ("temperature", "top_k", "top_p", "typical_p", "min_p")


def self_sampling_kwargs(
    temperature: float,
    max_response_length: Optional[int],
    user_kwargs: Optional[Mapping[str, Any]],
    num_self_samples: int,
) -> Dict[str, Any]:
    """The generation keywords of the self samples: the faithful defaults, then the user's.

    Warns when the user's keywords turn sampling off while ``num_self_samples > 1`` (the
    samples of a prompt are then identical). With sampling off, the sampling-only defaults
    are left out (``generate`` refuses them).
    """
    user = dict(user_kwargs or {})
    merged: Dict[str, Any] = dict(_SAMPLING_DEFAULTS)
    merged["temperature"] = float(temperature)
    merged["max_new_tokens"] = max_response_length or DEFAULT_MAX_NEW_TOKENS
    merged.update(user)
    if not merged.get("do_sample", False):
        if num_self_samples > 1:
            warnings.warn(
                f"generation_kwargs: do_sample=False makes the {num_self_samples} self samples "
                "of a prompt identical (greedy decoding); they are not samples of the policy",
                RuntimeWarning,
                stacklevel=3,
            )
        for key in _SAMPLE_ONLY_KEYS:
            if key not in user:
                merged.pop(key, None)
    return merged


@contextlib.contextmanager
def _blank_generation_config(model: nn.Module):
    """Inside the block, the model's own ``generation_config`` holds only its special token
    ids, so that ``generate`` fills nothing else (top_p, penalties, ...) from it."""
    original = getattr(model, "generation_config", None)
    if original is None:
        yield
        return
    blank = type(original)(
        pad_token_id=original.pad_token_id,
        eos_token_id=original.eos_token_id,
        bos_token_id=original.bos_token_id,
    )
    model.generation_config = blank
    try:
        yield
    finally:
        model.generation_config = original


@dataclass(frozen=True)
class SelfSample:
    """One policy sample: its token ids (cut after the first eos, inclusive, and to
    ``max_response_length``) and whether it ended without an eos."""

    ids: Tuple[int, ...]
    truncated: bool


def eos_token_ids(model: nn.Module, gen_kwargs: Mapping[str, Any], tokenizer: Any) -> List[int]:
    """The eos ids of generation: the keywords', else the tokenizer's, else the model's."""
    eos = gen_kwargs.get("eos_token_id")
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None and getattr(model, "generation_config", None) is not None:
        eos = model.generation_config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    groups: Sequence[PromptGroup],
    num_samples: int,
    gen_kwargs: Mapping[str, Any],
    *,
    pad_token_id: int,
    eos_ids: Sequence[int],
    device: torch.device,
    max_response_length: Optional[int] = None,
) -> List[List[SelfSample]]:
    """``num_samples`` responses per prompt from ``model`` (unwrapped), in eval mode (no
    dropout) and back in its previous mode afterwards.

    Returns, per prompt, the samples (see :class:`SelfSample`); empty generations are
    dropped.
    """
    kwargs = dict(gen_kwargs)
    if eos_ids:
        kwargs.setdefault("eos_token_id", list(eos_ids))
    kwargs.setdefault("pad_token_id", pad_token_id)
    # Decoder-only generation continues from the last column: left padding.
    width = max(len(g.prompt_ids) for g in groups)
    input_ids = torch.full((len(groups), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(groups), width), dtype=torch.long)
    for i, group in enumerate(groups):
        input_ids[i, width - len(group.prompt_ids) :] = torch.tensor(group.prompt_ids)
        attention_mask[i, width - len(group.prompt_ids) :] = 1
    # Rows repeated rather than num_return_sequences, which greedy decoding refuses.
    input_ids = input_ids.repeat_interleave(num_samples, dim=0)
    attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)
    from transformers import GenerationConfig

    config = GenerationConfig(**kwargs)
    was_training = model.training
    model.eval()
    try:
        with _blank_generation_config(model):
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )
    finally:
        model.train(was_training)
    generated = out[:, width:].tolist()
    eos_set = set(eos_ids)
    samples: List[List[SelfSample]] = []
    for i in range(len(groups)):
        per_prompt = []
        for row in generated[i * num_samples : (i + 1) * num_samples]:
            end = next((j + 1 for j, tok in enumerate(row) if tok in eos_set), None)
            # Without an eos the row ran to max_new_tokens (batched generation pads only the
            # rows that have finished).
            ids, truncated = (row, True) if end is None else (row[:end], False)
            if max_response_length is not None and len(ids) > max_response_length:
                ids, truncated = ids[:max_response_length], True
            if ids:
                per_prompt.append(SelfSample(tuple(ids), truncated))
        samples.append(per_prompt)
    return samples


# TRL's reward convention: f(prompts, completions, completion_ids, **columns) -> list
RewardFunc = Callable[..., Sequence[Optional[float]]]
# The pair convention: f(prompt, response) -> float
PairRewardFn = Callable[[Any, Any], float]


class PairReward:
    """A pair reward ``reward_fn(prompt, response) -> float`` in the batched convention."""

    def __init__(self, fn: PairRewardFn) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> List[Any]:
        return [self.fn(p, c) for p, c in zip(prompts, completions)]


def reward_func_name(func: Callable) -> str:
    return getattr(func, "__name__", type(func).__name__)


class RewardScorer:
    """Scores completions with one or several reward functions (TRL's convention), weighted.

    Args:
        funcs: the reward functions, in order.
        weights: one weight per function (default all 1).
        tokenizer: decodes prompts and completions to text; without one the functions get
            token id lists.
    """

    def __init__(
        self,
        funcs: Sequence[RewardFunc],
        weights: Optional[Sequence[float]] = None,
        tokenizer: Any = None,
    ) -> None:
        if not funcs:
            raise ValueError("reward_funcs: expected at least one reward function, got none")
        for i, func in enumerate(funcs):
            if not callable(func):
                raise TypeError(
                    f"reward_funcs[{i}]: expected a callable, got {type(func).__name__}"
                )
        if weights is None:
            weights = [1.0] * len(funcs)
        if len(weights) != len(funcs):
            raise ValueError(
                f"reward_weights: expected {len(funcs)} weights (one per reward function), got "
                f"{len(weights)}"
            )
        self.funcs = list(funcs)
        self.weights = [check_reward(f"reward_weights[{i}]", w) for i, w in enumerate(weights)]
        self.names = [reward_func_name(f) for f in funcs]
        self.tokenizer = tokenizer

    def prompt_for(self, group: PromptGroup) -> Any:
        """The prompt as reward functions see it: the messages of a chat prompt, its text,
        the decoded ids, or (no tokenizer) the id list."""
        if group.prompt_messages is not None:
            return [dict(m) for m in group.prompt_messages]
        if group.prompt_text is not None:
            return group.prompt_text
        if self.tokenizer is None:
            return list(group.prompt_ids)
        return self.tokenizer.decode(list(group.prompt_ids), skip_special_tokens=True)

    def completion_for(self, group: PromptGroup, ids: Sequence[int]) -> Any:
        if self.tokenizer is None:
            return list(ids)
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        if group.prompt_messages is not None:
            return [{"role": "assistant", "content": text}]
        return text

    def score(
        self,
        groups: Sequence[PromptGroup],
        samples: Sequence[Sequence[SelfSample]],
        **extra: Any,
    ) -> Tuple[List[List[float]], Dict[str, List[float]]]:
        """Rewards of ``samples[g][i]`` (completions of ``groups[g]``).

        Every function is called once with all completions of the batch; ``extra`` keywords
        (e.g. ``trainer_state``) are passed on. Returns the weighted rewards, nested like
        ``samples``, and each function's raw rewards (flat; NaN where it returned None).
        """
        prompts, completions, completion_ids, owner = [], [], [], []
        columns: Dict[str, List[Any]] = {}
        keys = sorted({k for g in groups for k in g.columns})
        for g, (group, per_prompt) in enumerate(zip(groups, samples)):
            prompt = self.prompt_for(group)
            for sample in per_prompt:
                prompts.append(prompt)
                completions.append(self.completion_for(group, sample.ids))
                completion_ids.append(list(sample.ids))
                owner.append(g)
                for key in keys:
                    columns.setdefault(key, []).append(group.columns.get(key))
        n = len(prompts)
        per_func: Dict[str, List[float]] = {}
        totals = [0.0] * n
        scored = [False] * n
        if n:
            for func, name, weight in zip(self.funcs, self.names, self.weights):
                out = func(
                    prompts=prompts,
                    completions=completions,
                    completion_ids=completion_ids,
                    **columns,
                    **extra,
                )
                if isinstance(out, torch.Tensor):
                    out = out.tolist()
                if isinstance(out, (str, bytes)) or not isinstance(out, Sequence):
                    raise TypeError(
                        f"reward function {name!r}: expected a list of {n} rewards, got "
                        f"{type(out).__name__}"
                    )
                if len(out) != n:
                    raise ValueError(
                        f"reward function {name!r}: expected {n} rewards (one per completion), "
                        f"got {len(out)}"
                    )
                values = []
                for i, value in enumerate(out):
                    if value is None:
                        values.append(math.nan)
                        continue
                    value = check_reward(f"reward function {name!r}: reward [{i}]", value)
                    values.append(value)
                    totals[i] += weight * value
                    scored[i] = True
                per_func[name] = values
        if not all(scored):
            i = scored.index(False)
            raise ValueError(
                f"reward_funcs: every reward function returned None for completion {i} of prompt "
                f"{owner[i]}; expected at least one reward per completion"
            )
        nested: List[List[float]] = [[] for _ in groups]
        for g, total in zip(owner, totals):
            nested[g].append(total)
        return nested, per_func


def as_reward_funcs(
    reward_fn: Optional[PairRewardFn],
    reward_funcs: Union[RewardFunc, Sequence[RewardFunc], None],
) -> List[RewardFunc]:
    """The reward functions of a trainer: ``reward_funcs`` (one or a list, TRL's convention),
    else ``reward_fn`` (the pair convention) wrapped; both may not be given."""
    if reward_fn is not None and reward_funcs is not None:
        raise ValueError("reward_fn: expected either reward_fn or reward_funcs, got both")
    if reward_fn is not None:
        if not callable(reward_fn):
            raise TypeError(f"reward_fn: expected a callable, got {type(reward_fn).__name__}")
        return [PairReward(reward_fn)]
    if reward_funcs is None:
        return []
    if callable(reward_funcs):
        return [reward_funcs]
    if isinstance(reward_funcs, (str, bytes)) or not isinstance(reward_funcs, Sequence):
        raise TypeError(
            "reward_funcs: expected a callable or a list of callables, got "
            f"{type(reward_funcs).__name__}"
        )
    return list(reward_funcs)


class Stopwatch:
    """Seconds spent in named phases, read and reset by the metrics."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}

    @contextlib.contextmanager
    def time(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> Dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out
