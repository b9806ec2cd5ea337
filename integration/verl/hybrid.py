"""Hybrid GFT groups in verl 0.9: dataset responses join the policy's rollouts.

GFT trains each prompt on a group that mixes expert demonstrations, teacher answers and
the policy's own samples; the group advantage (GRPO) normalises their rewards together.
verl's default (V1) trainer runs ``rollout.n`` agent-loop sessions per prompt, all under
the prompt's ``uid``, and GRPO groups rows by ``uid``. :class:`HybridGroupAgentLoop` is an
agent loop whose last ``k`` sessions, ``k`` the number of responses the dataset row
carries, return those responses instead of generating:

    rollout.n = n_self + k      session_id <  n_self: the policy samples (verl's single turn)
                                n_self <= session_id < rollout.n: dataset response
                                                                  session_id - n_self

so every group holds its prompt's expert/teacher responses and ``n_self`` self samples
before the reward and the advantage are computed, as the published recipe does
(1 expert + 3 teacher + 4 self per prompt). The dataset responses are tokenized like a
generation (response text, then the tokenizer's eos) and merged into the chat exactly as a
sampled answer is; they are scored by the same reward function.

Dataset rows carry the responses in ``extra_info["gft_responses"]`` (or a top-level
``gft_responses`` column): a list of ``{"text": str, "source": "expert" | "teacher"}``
(``"ids": [int, ...]`` instead of ``"text"`` for pre-tokenized responses; a bare string
is a teacher text). Each output's ``extra_fields["gft_source"]`` says where it came from.

Validation: verl 0.9.1 runs ``val_kwargs.n`` sessions per prompt and does not tell the
agent loop that it validates. Rows without responses (``verl_gft_prepare_data.py --split
test`` writes none) and rows marked ``extra_info["split"] == "test"`` (or ``"val"``,
``"valid"``, ``"validation"``) sample every session from the policy, as do sessions past
``rollout.n``; any other row replays its responses in sessions ``n_self .. rollout.n - 1``,
validation or not.

Dataset responses have no rollout log-probs: ``rollout.calculate_log_probs`` and the
rollout-correction bypass mode (which train on them) must be off; both are refused.
The session index exists in verl's V1 (TransferQueue) trainer only.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput, register
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

AGENT_NAME = "gft_hybrid"
RESPONSES_KEY = "gft_responses"
SOURCES = ("expert", "teacher")
HELD_OUT_SPLITS = ("test", "val", "valid", "validation")


def _get(config: Any, *path: str) -> Any:
    for key in path:
        if config is None:
            return None
        getter = getattr(config, "get", None)
        config = getter(key, None) if callable(getter) else getattr(config, key, None)
    return config


def dataset_responses(row: Mapping[str, Any], key: str = RESPONSES_KEY) -> List[Dict[str, Any]]:
    """The expert/teacher responses of one dataset row, checked and normalised.

    Looked up as ``row["extra_info"][key]``, then ``row[key]``; none gives ``[]``.
    Returns dicts with ``"source"`` and exactly one of ``"text"`` / ``"ids"``.
    """
    extra = row.get("extra_info")
    items = extra.get(key) if isinstance(extra, Mapping) else None
    if items is None:
        items = row.get(key)
    if items is None:
        return []
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        if hasattr(items, "tolist"):  # parquet rows come back as numpy arrays
            items = items.tolist()
        else:
            raise TypeError(f"{key}: expected a list of responses, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"text": item, "source": "teacher"}
        if not isinstance(item, Mapping):
            raise TypeError(f"{key}[{i}]: expected a dict or a string, got {type(item).__name__}")
        source = item.get("source", "teacher")
        if source not in SOURCES:
            raise ValueError(f"{key}[{i}].source: expected one of {SOURCES}, got {source!r}")
        text, ids = item.get("text"), item.get("ids")
        if (text is None) == (ids is None):
            raise ValueError(f"{key}[{i}]: expected exactly one of 'text' and 'ids'")
        if text is not None and not isinstance(text, str):
            raise TypeError(f"{key}[{i}].text: expected a string, got {type(text).__name__}")
        if ids is not None:
            ids = [int(t) for t in (ids.tolist() if hasattr(ids, "tolist") else ids)]
            if not ids:
                raise ValueError(f"{key}[{i}].ids: expected at least one token, got []")
        out.append({"source": source, "text": text, "ids": ids})
    return out


def held_out(row: Mapping[str, Any]) -> bool:
    """Whether a dataset row is marked as validation data: ``extra_info["split"]`` is one
    of :data:`HELD_OUT_SPLITS` (verl's own data scripts write ``"test"``).

    verl 0.9.1 does not tell an agent loop whether it runs for validation (``run`` gets the
    same sampling-parameter keys and row fields either way), so the row itself has to: the
    responses of a held-out row are never replayed, all its sessions sample the policy
    (in a training run too, should such a row be among the training data).
    """
    extra = row.get("extra_info")
    split = extra.get("split") if isinstance(extra, Mapping) else None
    return isinstance(split, str) and split.lower() in HELD_OUT_SPLITS


@register(AGENT_NAME)
class HybridGroupAgentLoop(SingleTurnAgentLoop):
    """verl's single-turn agent loop whose last sessions replay dataset responses.

    Select it with ``actor_rollout_ref.rollout.agent.default_agent_loop=gft_hybrid`` (the
    name is registered when this module is imported; an ``agent_loop_config_path`` file
    naming ``_target_: gft_kernels.integration.verl.hybrid.HybridGroupAgentLoop``
    imports it in verl's rollout workers). Keyword ``responses_key`` (from that file)
    renames the dataset field.
    """

    def __init__(self, *args: Any, responses_key: str = RESPONSES_KEY, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.responses_key = responses_key
        if _get(self.rollout_config, "calculate_log_probs"):
            raise ValueError(
                "actor_rollout_ref.rollout.calculate_log_probs: dataset responses have no "
                "rollout log-probs, expected False with the gft_hybrid agent loop, got True"
            )
        if _get(self.config, "algorithm", "rollout_correction", "bypass_mode"):
            raise ValueError(
                "algorithm.rollout_correction.bypass_mode: trains on rollout log-probs, which "
                "dataset responses do not have; expected False with gft_hybrid, got True"
            )

    async def run(self, sampling_params: Dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        session_id = kwargs.get("session_id")
        if session_id is None:
            raise ValueError(
                "session_id: the gft_hybrid agent loop needs verl's V1 trainer "
                "(trainer.use_v1=True), which numbers each prompt's rollout.n sessions"
            )
        injected = [] if held_out(kwargs) else dataset_responses(kwargs, self.responses_key)
        n = int(self.rollout_config.n)
        if len(injected) > n:
            raise ValueError(
                f"actor_rollout_ref.rollout.n: expected at least {len(injected)} (the dataset "
                f"responses of this prompt) plus the self samples, got {n}"
            )
        n_self = n - len(injected)
        # Sessions past rollout.n exist only in validation (val_kwargs.n > rollout.n).
        if not n_self <= int(session_id) < n:
            output = await super().run(sampling_params, **kwargs)
            output.extra_fields["gft_source"] = "self"
            return output
        return await self.dataset_output(injected[int(session_id) - n_self], kwargs)

    def response_token_ids(self, response: Mapping[str, Any]) -> List[int]:
        """A dataset response as the policy would have generated it: its tokens, then eos."""
        ids = response["ids"]
        if ids is None:
            ids = self.tokenizer.encode(response["text"], add_special_tokens=False)
        ids = list(ids)
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(int(eos))
        return ids

    async def dataset_output(
        self, response: Mapping[str, Any], kwargs: Mapping[str, Any]
    ) -> AgentLoopOutput:
        """The agent-loop output of one dataset response (no generation, no log-probs)."""
        messages = list(kwargs["raw_prompt"])
        multi_modal_data = await self.process_multi_modal_info(messages)
        if multi_modal_data:
            raise ValueError("raw_prompt: multi-modal prompts are not supported by gft_hybrid")
        prompt_ids = await self.ct_build_initial_tokens(messages)
        merged, response_mask, _ = await self.ct_merge_assistant_token(
            prompt_ids, self.response_token_ids(response), [], None
        )
        tokens = merged.token_ids
        response_ids = tokens[len(tokens) - len(response_mask) :] if response_mask else []
        prompt_ids = tokens[: len(tokens) - len(response_mask)]
        return AgentLoopOutput(
            prompt_ids=prompt_ids,
            response_ids=response_ids[: self.response_length],
            response_mask=response_mask[: self.response_length],
            response_logprobs=None,
            num_turns=2,
            metrics=AgentLoopMetrics(),
            extra_fields={"turn_scores": [], "tool_rewards": [], "gft_source": response["source"]},
        )
