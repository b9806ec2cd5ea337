"""Hybrid GFT groups in verl: dataset responses join each prompt's uid group.

:class:`HybridGroupAgentLoop` runs inside verl's real agent-loop machinery here (built
from verl's own trainer config, Qwen2 continuous-token builder, verl's dataset class); only
the LLM server is a stand-in that returns fixed generations. The sessions of each prompt
(verl's V1 trainer runs ``rollout.n`` of them under the prompt's uid) are scored, and
verl's own GRPO estimator computes the advantages, which must equal the GRPO formula over
each group of self samples *and* injected expert/teacher responses.
"""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from verl.experimental.agent_loop.agent_loop import DictConfigWrap
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.workers.rollout.replica import TokenOutput

from gft_kernels.integration.verl.hybrid import HybridGroupAgentLoop, dataset_responses

N_SELF = 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with Qwen's chat markers (built here, nothing loaded)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(string.printable))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


class FixedServer:
    """Stand-in LLM server: the self samples of a prompt, in session order."""

    def __init__(self, tokenizer, answers):
        self.tokenizer = tokenizer
        self.answers = answers  # prompt text -> list of answers
        self.calls = {}

    async def generate(self, *, prompt_ids, **kwargs):
        text = self.tokenizer.decode(prompt_ids)
        key = next(k for k in self.answers if k in text)
        i = self.calls.get(key, 0)
        self.calls[key] = i + 1
        ids = self.tokenizer.encode(self.answers[key][i], add_special_tokens=False)
        return TokenOutput(token_ids=ids + [self.tokenizer.eos_token_id])


def trainer_config(n, **overrides):
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(
            config_name="ppo_trainer",
            overrides=[
                f"actor_rollout_ref.rollout.n={n}",
                "actor_rollout_ref.rollout.calculate_log_probs=False",
                "actor_rollout_ref.rollout.prompt_length=64",
                "actor_rollout_ref.rollout.response_length=32",
                *[f"{k}={v}" for k, v in overrides.items()],
            ],
        )


def agent_loop(config, tokenizer, server):
    return HybridGroupAgentLoop(
        trainer_config=DictConfigWrap(config=config),
        server_manager=server,
        tokenizer=tokenizer,
        processor=None,
        dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(config.data),
        hf_model_type="qwen2",
    )


PROMPTS = {
    "uid-a": {
        "question": "2+2=?",
        "answer": "4",
        "self": ["4", "5", "4", "3"],
        "gft_responses": [
            {"text": "2+2 is 4", "source": "expert"},
            {"text": "it is 5", "source": "teacher"},
        ],
    },
    "uid-b": {
        "question": "3+3=?",
        "answer": "6",
        "self": ["7", "8", "9", "6"],
        "gft_responses": [
            {"text": "6", "source": "expert"},
            "the sum is 6",  # a bare string: a teacher text
        ],
    },
}


def reward(text, answer):
    return float(answer in text)


def test_injected_responses_join_the_group_and_grpo_advantages_match():
    tokenizer = char_tokenizer()
    n = N_SELF + 2
    config = trainer_config(n)
    server = FixedServer(tokenizer, {p["question"]: p["self"] for p in PROMPTS.values()})
    loop = agent_loop(config, tokenizer, server)

    async def sessions(uid, row):
        kwargs = {
            "raw_prompt": [{"role": "user", "content": row["question"]}],
            "extra_info": {"gft_responses": row["gft_responses"]},
            "uid": uid,
        }
        return [await loop.run({}, session_id=i, **kwargs) for i in range(n)]

    # The agent loop runs its tokenizer work on the event loop it was created with.
    outputs = {
        uid: loop.loop.run_until_complete(sessions(uid, row)) for uid, row in PROMPTS.items()
    }

    rows = []  # interleave the two prompts' rows: GRPO must group by uid, not position
    for i in range(n):
        for uid in PROMPTS:
            rows.append((uid, outputs[uid][i]))
    for uid, row in PROMPTS.items():
        outs = outputs[uid]
        assert [o.extra_fields["gft_source"] for o in outs] == ["self"] * N_SELF + [
            "expert",
            "teacher",
        ]
        # Every session shares the prompt tokens; dataset responses are tokenized as a
        # generation (text, then eos) and have no rollout log-probs.
        assert all(o.prompt_ids == outs[0].prompt_ids for o in outs)
        for o, item in zip(outs[N_SELF:], dataset_responses(row)):
            expected = tokenizer.encode(item["text"], add_special_tokens=False)
            assert o.response_ids == expected + [tokenizer.eos_token_id]
            assert o.response_mask == [1] * len(o.response_ids)
            assert o.response_logprobs is None
        texts = [tokenizer.decode(o.response_ids, skip_special_tokens=True) for o in outs]
        assert texts[:N_SELF] == row["self"]

    width = max(len(o.response_ids) for _, o in rows)
    scores = torch.tensor(
        [reward(tokenizer.decode(o.response_ids), PROMPTS[uid]["answer"]) for uid, o in rows]
    )
    mask = torch.zeros(len(rows), width)
    token_rewards = torch.zeros(len(rows), width)
    for r, (_, o) in enumerate(rows):
        mask[r, : len(o.response_ids)] = 1
        token_rewards[r, len(o.response_ids) - 1] = scores[r]
    index = np.array([uid for uid, _ in rows], dtype=object)
    advantages, _ = compute_grpo_outcome_advantage(token_rewards, mask, index)

    for uid in PROMPTS:
        pick = torch.tensor([u == uid for u, _ in rows])
        group = scores[pick]
        assert len(group) == n and 0 < group.sum() < n  # both rewards present
        expected = (group - group.mean()) / (group.std() + 1e-6)  # GRPO, unbiased std
        got = advantages[pick]
        torch.testing.assert_close(got, expected[:, None] * mask[pick], rtol=1e-5, atol=1e-6)


def test_refusals_and_bad_rows():
    tokenizer = char_tokenizer()
    server = FixedServer(tokenizer, {})
    with pytest.raises(ValueError, match="calculate_log_probs"):
        agent_loop(
            trainer_config(6, **{"actor_rollout_ref.rollout.calculate_log_probs": True}),
            tokenizer,
            server,
        )
    loop = agent_loop(trainer_config(2), tokenizer, server)
    row = {
        "raw_prompt": [{"role": "user", "content": "x"}],
        "extra_info": {"gft_responses": ["a", "b", "c"]},
    }
    with pytest.raises(ValueError, match="rollout.n"):
        loop.loop.run_until_complete(loop.run({}, session_id=0, **row))
    with pytest.raises(ValueError, match="session_id"):
        loop.loop.run_until_complete(loop.run({}, **row))
    with pytest.raises(ValueError, match="source"):
        dataset_responses({"gft_responses": [{"text": "a", "source": "oracle"}]})
    with pytest.raises(ValueError, match="exactly one"):
        dataset_responses({"gft_responses": [{"source": "expert"}]})
    assert dataset_responses({"extra_info": {}}) == []
    assert dataset_responses({"gft_responses": [{"ids": [3, 4], "source": "expert"}]}) == [
        {"source": "expert", "text": None, "ids": [3, 4]}
    ]


def prepared_rows(tmp_path, examples, split):
    """Rows of ``verl_gft_prepare_data.py --split <split>`` as verl's RLHFDataset reads them."""
    import json
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "integration" / "examples"
    src, dst = tmp_path / f"{split}.jsonl", tmp_path / f"{split}.parquet"
    src.write_text("\n".join(json.dumps(e) for e in examples) + "\n")
    subprocess.run(
        [sys.executable, str(script / "verl_gft_prepare_data.py"), str(src), str(dst)]
        + ["--split", split],
        check=True,
        capture_output=True,
    )
    return dst


def test_validation_sessions_sample_the_policy(tmp_path):
    """verl validates with ``val_kwargs.n`` sessions a prompt and does not tell the agent
    loop: rows written with ``--split test`` (no responses) sample every session, however
    many; so does a row marked ``split == "test"`` that still carries responses; a training
    row replays its responses in sessions ``n_self .. rollout.n - 1`` only."""
    tokenizer = char_tokenizer()
    n, val_n = N_SELF + 2, N_SELF + 5
    config = trainer_config(
        n,
        **{
            "actor_rollout_ref.rollout.val_kwargs.n": val_n,
            "actor_rollout_ref.rollout.prompt_length": 256,  # the recipe's instruction
        },
    )
    assert config.actor_rollout_ref.rollout.val_kwargs.n == val_n
    examples = [{"question": "1+1?", "answer": "2", "expert": "2", "teachers": ["3", "2"]}]
    dataset = RLHFDataset(
        data_files=[str(prepared_rows(tmp_path, examples, "test"))],
        tokenizer=tokenizer,
        config=config.data,
    )
    row = dataset[0]
    assert row["extra_info"]["split"] == "test" and dataset_responses(row) == []
    answers = [str(i) for i in range(3 * val_n)]
    server = FixedServer(tokenizer, {"1+1?": answers})
    loop = agent_loop(config, tokenizer, server)

    def sources(kwargs, sessions):
        async def run():
            return [await loop.run({}, session_id=i, uid="u", **kwargs) for i in range(sessions)]

        return [o.extra_fields["gft_source"] for o in loop.loop.run_until_complete(run())]

    assert sources(row, val_n) == ["self"] * val_n
    responses = [{"text": "2", "source": "expert"}, {"text": "3", "source": "teacher"}]
    marked = dict(row, extra_info=dict(row["extra_info"], gft_responses=responses))
    assert sources(marked, val_n) == ["self"] * val_n
    training = dict(marked, extra_info=dict(marked["extra_info"], split="train"))
    assert sources(training, val_n) == (
        ["self"] * N_SELF + ["expert", "teacher"] + ["self"] * (val_n - n)
    )
    assert server.calls["1+1?"] == 3 * val_n - 2
