"""``GFTDataCollator``: groups of responses per prompt in, padded rows with advantages out.

One dataset example is one prompt with its group of responses::

    {"prompt_ids": [int, ...],
     "responses": [{"ids": [int, ...], "reward": float, "source": "expert"}, ...]}

or, with a tokenizer, ``"prompt": str`` (or a chat: a list of ``{"role", "content"}``
messages, rendered with the tokenizer's chat template) and ``{"text": str, ...}`` instead of
the ids. Other fields of an example (e.g. a ground-truth ``solution``) are kept with the
group for the reward functions. Each (prompt, response) pair becomes one row
``prompt + response`` (right padding). The
advantages are computed inside each prompt's group (GAL), which is why the
collator sees whole groups: a group split across batches would get other advantages.

Collation happens in two stages, so that the trainer can add the policy's own samples to
each group between them (the hybrid group): :meth:`GFTDataCollator.normalize` checks and
tokenizes the raw examples into :class:`PromptGroup` objects, :meth:`GFTDataCollator.collate`
pads them and computes the advantages. ``collator(examples)`` does both.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from gft_kernels import group_advantages
from gft_kernels._options import check_int

SOURCES = ("expert", "teacher", "self")
# Per-row source code in the batch (``batch["sources"]``), stable across versions.
SOURCE_CODES = {name: code for code, name in enumerate(SOURCES)}


# Example fields the collator reads itself; every other field is a dataset column.
_OWN_FIELDS = ("prompt", "prompt_ids", "responses")


@dataclass(frozen=True)
class Response:
    """One response of a group: token ids, scalar reward and where it came from.

    ``trainable=False`` keeps the response in its group (its reward counts in the group's
    advantages) but out of the loss (e.g. a self sample cut at ``max_new_tokens``).
    """

    ids: Tuple[int, ...]
    reward: float
    source: str
    text: Optional[str] = None
    trainable: bool = True


@dataclass(frozen=True)
class PromptGroup:
    """A prompt and its group of responses, checked and tokenized.

    ``prompt_messages``: the chat messages of a chat prompt (None for text or ids);
    ``columns``: the example's other fields (dataset columns), for the reward functions.
    """

    prompt_ids: Tuple[int, ...]
    responses: Tuple[Response, ...]
    prompt_text: Optional[str] = None
    prompt_messages: Optional[Tuple[Mapping[str, Any], ...]] = None
    columns: Mapping[str, Any] = field(default_factory=dict)

    def with_responses(self, extra: Sequence[Response]) -> PromptGroup:
        """The same prompt with ``extra`` responses appended to its group."""
        return PromptGroup(
            self.prompt_ids,
            self.responses + tuple(extra),
            self.prompt_text,
            self.prompt_messages,
            self.columns,
        )


def _token_ids(where: str, value: Any) -> Tuple[int, ...]:
    """A non-empty sequence of non-negative token ids (list, tuple or 1-D tensor)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise ValueError(
                f"{where}: expected a 1-D integer tensor, got {value.dtype} of shape "
                f"{tuple(value.shape)}"
            )
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{where}: expected a list of int token ids, got {type(value).__name__}")
    ids = []
    for i, tok in enumerate(value):
        if isinstance(tok, bool):
            raise TypeError(f"{where}[{i}]: expected an int token id, got bool")
        try:
            tok = operator.index(tok)
        except TypeError:
            raise TypeError(
                f"{where}[{i}]: expected an int token id, got {type(tok).__name__}"
            ) from None
        if tok < 0:
            raise ValueError(f"{where}[{i}]: expected a token id >= 0, got {tok}")
        ids.append(tok)
    if not ids:
        raise ValueError(f"{where}: expected at least one token, got an empty sequence")
    return tuple(ids)


def check_reward(where: str, value: Any) -> float:
    """A reward (or weight) as a float: a real number or a one-element tensor, finite."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dim() <= 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value}")
    return value


class GFTDataCollator:
    """Collates prompt groups into GFT training rows.

    Args:
        tokenizer: optional; needed for text fields (``prompt``, response ``text``) and
            used for the pad id. Minimal protocol: ``encode(text, add_special_tokens=...)``
            returning a list of ids, ``decode(ids, skip_special_tokens=True)``,
            ``pad_token_id`` and ``eos_token_id`` (any HF tokenizer fits).
        pad_token_id: pad id of ``input_ids`` (default: the tokenizer's pad, else its eos).
        norm_adv_by_std: GRPO normalisation of the advantages (see ``group_advantages``).
        adv_eps: ``eps`` of the advantages.
        max_response_length: responses longer than this are truncated (right side).
        max_prompt_length: prompts longer than this keep their last ``max_prompt_length``
            tokens (left truncation, so the prompt still ends where the response starts).
        append_eos: append the tokenizer's eos to responses given as text (ids are used
            exactly as given).
        pad_to_multiple_of: round the padded length up to a multiple of this.

    Returns (``collator(examples)``), with R = total number of responses, L = padded length:
        ``input_ids`` (R, L) int64, prompt + response, right padding with the pad id;
        ``attention_mask`` (R, L) int64; ``response_mask`` (R, L) int64, 1 on response
        tokens only (input positions: the token at t is predicted from position t - 1);
        ``group_ids`` (R,) int64, the prompt's index in the batch; ``rewards`` (R,) fp32;
        ``advantages`` (R,) fp32, normalised inside each prompt's group; ``sources`` (R,)
        int64, codes of :data:`SOURCE_CODES`.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        *,
        pad_token_id: Optional[int] = None,
        norm_adv_by_std: bool = True,
        adv_eps: float = 1e-6,
        max_response_length: Optional[int] = None,
        append_eos: bool = True,
        pad_to_multiple_of: Optional[int] = None,
        max_prompt_length: Optional[int] = None,
    ) -> None:
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = getattr(tokenizer, "eos_token_id", None)
        if pad_token_id is None:
            raise ValueError(
                "pad_token_id: expected an int (or a tokenizer with pad_token_id or "
                "eos_token_id), got None"
            )
        check_int("pad_token_id", pad_token_id, minimum=0)
        if not isinstance(norm_adv_by_std, bool):
            raise TypeError(
                f"norm_adv_by_std: expected a bool, got {type(norm_adv_by_std).__name__}"
            )
        for name, value in (
            ("max_response_length", max_response_length),
            ("pad_to_multiple_of", pad_to_multiple_of),
            ("max_prompt_length", max_prompt_length),
        ):
            check_int(name, value, allow_none=True)
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        self.norm_adv_by_std = norm_adv_by_std
        self.adv_eps = float(adv_eps)
        self.max_response_length = max_response_length
        self.append_eos = append_eos
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_prompt_length = max_prompt_length

    # -- stage 1: check and tokenize ------------------------------------------------------

    def _encode(self, where: str, text: Any, *, response: bool) -> Tuple[int, ...]:
        if not isinstance(text, str):
            raise TypeError(f"{where}: expected a str, got {type(text).__name__}")
        if self.tokenizer is None:
            raise ValueError(
                f"{where}: text needs a tokenizer (pass tokenizer= to GFTDataCollator) or "
                "give token ids instead"
            )
        ids = list(self.tokenizer.encode(text, add_special_tokens=not response))
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if response and self.append_eos and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return _token_ids(where, ids)

    def _ids_or_text(
        self, where: str, raw: Mapping, ids_key: str, text_key: str, response: bool
    ) -> List[int]:
        """Token ids from ``raw[ids_key]``, else the tokenized ``raw[text_key]``."""
        if raw.get(ids_key) is not None:
            return _token_ids(f'{where}["{ids_key}"]', raw[ids_key])
        if raw.get(text_key) is not None:
            return self._encode(f'{where}["{text_key}"]', raw[text_key], response=response)
        raise ValueError(f'{where}: expected a "{ids_key}" or "{text_key}" field')

    def _chat_prompt(self, where: str, messages: Sequence[Any]) -> Tuple[int, ...]:
        """The ids of a chat prompt: the tokenizer's chat template with the generation
        prompt (the assistant turn's opening) appended."""
        for i, message in enumerate(messages):
            if (
                not isinstance(message, Mapping)
                or "role" not in message
                or "content" not in message
            ):
                raise TypeError(
                    f'{where}["prompt"][{i}]: expected a chat message {{"role": ..., "content": '
                    f"...}}, got {message!r}"
                )
        template = getattr(self.tokenizer, "apply_chat_template", None)
        if not callable(template):
            raise ValueError(
                f'{where}["prompt"]: a chat prompt (list of messages) needs a tokenizer with '
                "apply_chat_template (pass tokenizer= to GFTDataCollator), got "
                f"{type(self.tokenizer).__name__}"
            )
        ids = template([dict(m) for m in messages], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping):  # transformers >= 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return _token_ids(f'{where}["prompt"]', ids)

    def _prompt(
        self, where: str, example: Mapping
    ) -> Tuple[Tuple[int, ...], Optional[str], Optional[Tuple[Mapping[str, Any], ...]]]:
        """``(ids, text, messages)`` of an example's prompt (ids, text or chat messages),
        left-truncated to ``max_prompt_length``."""
        raw = example.get("prompt")
        text, messages = None, None
        if (
            example.get("prompt_ids") is None
            and isinstance(raw, Sequence)
            and not isinstance(raw, (str, bytes))
        ):
            messages = tuple(raw)
            ids = self._chat_prompt(where, messages)
        else:
            ids = self._ids_or_text(where, example, "prompt_ids", "prompt", response=False)
            text = raw if isinstance(raw, str) else None
        if self.max_prompt_length is not None and len(ids) > self.max_prompt_length:
            ids, text = ids[-self.max_prompt_length :], None  # the text no longer matches
        return ids, text, messages

    def _response(self, where: str, raw: Any) -> Response:
        if isinstance(raw, Response):
            return raw
        if not isinstance(raw, Mapping):
            raise TypeError(f"{where}: expected a dict, got {type(raw).__name__}")
        text = raw.get("text")
        ids = self._ids_or_text(where, raw, "ids", "text", response=True)
        if "reward" not in raw:
            raise ValueError(f'{where}: missing the "reward" field')
        reward = check_reward(f'{where}["reward"]', raw["reward"])
        source = raw.get("source")
        if source not in SOURCE_CODES:
            raise ValueError(
                f'{where}["source"]: expected one of {", ".join(SOURCES)}, got {source!r}'
            )
        return Response(ids, reward, source, text if isinstance(text, str) else None)

    def normalize(self, examples: Sequence[Any]) -> List[PromptGroup]:
        """Check and tokenize raw examples (``PromptGroup`` entries pass through)."""
        if isinstance(examples, Mapping) or not isinstance(examples, Sequence):
            raise TypeError(f"examples: expected a list of examples, got {type(examples).__name__}")
        if len(examples) == 0:
            raise ValueError("examples: expected at least one example, got an empty batch")
        groups = []
        for i, example in enumerate(examples):
            where = f"examples[{i}]"
            if isinstance(example, PromptGroup):
                groups.append(example)
                continue
            if not isinstance(example, Mapping):
                raise TypeError(f"{where}: expected a dict, got {type(example).__name__}")
            if "responses" not in example:
                _refuse_other_formats(where, example)
            prompt_ids, prompt_text, messages = self._prompt(where, example)
            responses = example.get("responses")
            if isinstance(responses, (str, bytes, Mapping)) or not isinstance(responses, Sequence):
                raise TypeError(
                    f'{where}["responses"]: expected a list of responses, got '
                    f"{type(responses).__name__}"
                )
            if len(responses) == 0:
                raise ValueError(f'{where}["responses"]: expected at least one response')
            parsed = tuple(
                self._response(f'{where}["responses"][{j}]', r) for j, r in enumerate(responses)
            )
            columns = {k: v for k, v in example.items() if k not in _OWN_FIELDS}
            groups.append(PromptGroup(prompt_ids, parsed, prompt_text, messages, columns))
        return groups

    # -- stage 2: pad and compute the advantages ------------------------------------------

    def collate(self, groups: Sequence[PromptGroup]) -> Dict[str, torch.Tensor]:
        """Pad ``groups`` into rows and compute the advantages inside each group."""
        if len(groups) == 0:
            raise ValueError("groups: expected at least one prompt group, got none")
        rows: List[Tuple[Tuple[int, ...], Tuple[int, ...]]] = []
        group_ids, rewards, sources, trainable = [], [], [], []
        for g, group in enumerate(groups):
            if len(group.responses) == 0:
                raise ValueError(f"groups[{g}].responses: expected at least one response")
            for response in group.responses:
                ids = response.ids
                if self.max_response_length is not None:
                    ids = ids[: self.max_response_length]
                rows.append((group.prompt_ids, ids))
                group_ids.append(g)
                rewards.append(response.reward)
                sources.append(SOURCE_CODES[response.source])
                trainable.append(response.trainable)

        length = max(len(p) + len(r) for p, r in rows)
        if self.pad_to_multiple_of is not None:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n_rows = len(rows)
        input_ids = torch.full((n_rows, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n_rows, length), dtype=torch.long)
        response_mask = torch.zeros((n_rows, length), dtype=torch.long)
        for i, (prompt, response) in enumerate(rows):
            n_prompt, n_total = len(prompt), len(prompt) + len(response)
            input_ids[i, :n_total] = torch.tensor(prompt + response, dtype=torch.long)
            attention_mask[i, :n_total] = 1
            response_mask[i, n_prompt:n_total] = int(trainable[i])

        group_ids_t = torch.tensor(group_ids, dtype=torch.long)
        rewards_t = torch.tensor(rewards, dtype=torch.float32)
        advantages = group_advantages(
            rewards_t, group_ids_t, norm_by_std=self.norm_adv_by_std, eps=self.adv_eps
        )
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "group_ids": group_ids_t,
            "rewards": rewards_t,
            "advantages": advantages,
            "sources": torch.tensor(sources, dtype=torch.long),
        }

    def __call__(self, examples: Sequence[Any]) -> Dict[str, torch.Tensor]:
        return self.collate(self.normalize(examples))


class DeferredGroups:
    """Collator used while self-sampling: it checks and tokenizes in the data loader and
    leaves padding and advantages to the trainer, which first adds the policy's samples.

    Returns ``{"gft_groups": [PromptGroup, ...]}``; frozen dataclasses pass unchanged
    through the Trainer's and accelerate's device placement.
    """

    KEY = "gft_groups"

    def __init__(self, collator: GFTDataCollator) -> None:
        self.collator = collator

    def __call__(self, examples: Sequence[Any]) -> Dict[str, List[PromptGroup]]:
        return {self.KEY: self.collator.normalize(examples)}


def _refuse_other_formats(where: str, example: Mapping) -> None:
    """A clear error for rows in another trainer's format (no ``responses`` field)."""
    keys = set(example)
    if keys & {"completion", "chosen", "rejected", "messages"}:
        found = ", ".join(sorted(keys & {"completion", "chosen", "rejected", "messages"}))
        raise ValueError(
            f"{where}: a TRL-style row ({found}); GFT expects one prompt with its group of "
            'scored responses: {"prompt": ..., "responses": [{"text" or "ids": ..., '
            '"reward": float, "source": "expert" | "teacher" | "self"}, ...]}. To add '
            "dataset completions to TRL's GRPO groups, use "
            "gft_kernels.integration.trl.GFTGRPOTrainer"
        )
    raise ValueError(
        f'{where}: missing the "responses" field (a list of scored responses), got the fields '
        f"{sorted(keys)}"
    )
