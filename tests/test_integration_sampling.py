"""GFTTrainer's self samples and data: faithful sampling, rewards, chat prompts, errors."""

import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from gft_kernels.integration import GFTDataCollator, GFTTrainer  # noqa: E402
from gft_kernels.integration.sampling import self_sampling_kwargs  # noqa: E402
from tests.test_integration_trainer import (  # noqa: E402
    EOS,
    PAD,
    VOCAB,
    RecordingCollator,
    gft_args,
    groups_dataset,
    tiny_model,
)

SELF = 2  # SOURCE_CODES["self"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def chat_tokenizer():
    """A real HF fast tokenizer (word level, built here: nothing downloaded) with a chat
    template: ``<role> : <content> ;`` per message, ``assistant :`` as generation prompt."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>", "<unk>", "user", "assistant", ":", ";"]
    words += [str(d) for d in range(10)] + [
        "+",
        "=",
        "a",
        "b",
        "c",
        "d",
        "e",
        "yes",
        "no",
        "hello",
        "world",
    ]
    assert len(words) == VOCAB
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
    )
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ; {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    assert (tok.pad_token_id, tok.eos_token_id) == (PAD, EOS)
    return tok


def given_groups(n: int, seed: int = 0):
    """Prompt groups of expert/teacher responses only (so every "self" row is a sample)."""
    data = groups_dataset(n, seed)
    for example in data:
        example["responses"] = [r for r in example["responses"] if r["source"] != "self"]
    return data


def sampling_args(tmp_path, samples: int, max_new_tokens: int, **overrides):
    """:func:`gft_args` with ``samples`` self samples per prompt of at most
    ``max_new_tokens`` tokens each."""
    generation = {"max_new_tokens": max_new_tokens}
    return gft_args(tmp_path, num_self_samples=samples, generation_kwargs=generation, **overrides)


def trap_generation_config(model):
    """Settings in the model's own generation config that would make samples greedy or
    biased if generate() read them."""
    config = model.generation_config
    config.do_sample, config.top_k, config.top_p, config.repetition_penalty = False, 1, 0.1, 5.0
    return model


def test_generation_keywords_are_faithful_and_merge_the_users():
    kwargs = self_sampling_kwargs(0.7, 5, {"max_new_tokens": 3}, num_self_samples=4)
    assert kwargs["do_sample"] is True and kwargs["temperature"] == 0.7
    assert (kwargs["top_k"], kwargs["top_p"], kwargs["repetition_penalty"]) == (0, 1.0, 1.0)
    assert kwargs["max_new_tokens"] == 3  # the user's
    assert self_sampling_kwargs(1.0, 5, None, 4)["max_new_tokens"] == 5  # max_response_length
    assert self_sampling_kwargs(1.0, None, None, 4)["max_new_tokens"] == 256
    with pytest.warns(RuntimeWarning, match="identical"):
        greedy = self_sampling_kwargs(1.0, 5, {"do_sample": False}, num_self_samples=2)
    assert "top_k" not in greedy and "temperature" not in greedy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        self_sampling_kwargs(1.0, 5, {"do_sample": False}, num_self_samples=1)  # no warning


def test_self_samples_differ_with_a_max_new_tokens_override(tmp_path):
    model = trap_generation_config(tiny_model())
    args = sampling_args(tmp_path, 4, max_new_tokens=3)
    trainer = GFTTrainer(
        model=model, args=args, train_dataset=groups_dataset(3), reward_fn=lambda p, r: 0.0
    )
    groups = trainer.gft_collator.normalize(groups_dataset(3))
    for per_prompt in trainer.sample_responses(model, groups):
        assert len(per_prompt) == 4
        assert len({s.ids for s in per_prompt}) > 1  # not greedy
        assert all(1 <= len(s.ids) <= 3 for s in per_prompt)
    assert model.generation_config.top_k == 1  # the model's own config is untouched


def test_self_samples_follow_softmax_at_the_temperature(tmp_path):
    # One-token samples of one prompt: their frequencies are softmax(z / T) of the policy.
    model = trap_generation_config(tiny_model())
    temperature, n = 0.7, 6000
    args = sampling_args(tmp_path, n, max_new_tokens=1, temperature=temperature)
    data = [
        {"prompt_ids": [5, 9, 4], "responses": [{"ids": [3], "reward": 0.0, "source": "expert"}]}
    ]
    trainer = GFTTrainer(model=model, args=args, train_dataset=data, reward_fn=lambda p, r: 0.0)
    torch.manual_seed(0)
    (samples,) = trainer.sample_responses(model, trainer.gft_collator.normalize(data))
    counts = torch.bincount(torch.tensor([s.ids[0] for s in samples]), minlength=VOCAB)
    empirical = counts.double() / counts.sum()
    with torch.no_grad():
        model.eval()
        logits = model(input_ids=torch.tensor([[5, 9, 4]])).logits[0, -1].double()
    distance = lambda p: 0.5 * (empirical - p).abs().sum().item()  # total variation
    assert distance(torch.softmax(logits / temperature, -1)) < 0.04
    assert distance(torch.softmax(logits, -1)) > 0.08  # the check can tell temperatures apart


def test_rewards_score_exactly_the_trained_tokens(tmp_path):
    seen = []

    def reward_fn(prompt, response):
        seen.append(tuple(response))
        return float(len(response))

    args = sampling_args(tmp_path, 3, max_new_tokens=6, max_steps=1, max_response_length=2)
    collator = RecordingCollator(pad_token_id=PAD, max_response_length=2)
    trainer = GFTTrainer(
        model=tiny_model(),
        args=args,
        data_collator=collator,
        train_dataset=groups_dataset(2),
        reward_fn=reward_fn,
    )
    trainer.train()
    assert len(seen) == 2 * 3 and all(1 <= len(r) <= 2 for r in seen)
    (batch,) = collator.batches
    # Each group's last 3 rows are its samples (the dataset has "self" responses too).
    rows = [r for g in (0, 1) for r in (batch["group_ids"] == g).nonzero().flatten().tolist()[-3:]]
    trained = [
        tuple(batch["input_ids"][r][batch["response_mask"][r].bool()].tolist()) for r in rows
    ]
    assert sorted(trained) == sorted(seen)  # what was scored is what is trained
    assert [batch["rewards"][r].item() for r in rows] == [float(len(t)) for t in trained]
    default = GFTTrainer(
        model=tiny_model(),
        args=gft_args(tmp_path, num_self_samples=2, max_response_length=7),
        train_dataset=groups_dataset(2),
        reward_fn=reward_fn,
    )
    assert default.generation_kwargs["max_new_tokens"] == 7


def test_mask_truncated_completions(tmp_path):
    model = tiny_model(tie=False, bias=True)
    with torch.no_grad():
        model.lm_head.bias[EOS] += 3.0  # an eos about half of the time
    args = gft_args(
        tmp_path,
        max_steps=2,
        num_self_samples=4,
        max_response_length=2,
        mask_truncated_completions=True,
    )
    collator = RecordingCollator(pad_token_id=PAD, max_response_length=2)
    trainer = GFTTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=given_groups(4),
        reward_fn=lambda p, r: float(len(r)),
    )
    torch.manual_seed(1)
    trainer.train()
    kinds = set()
    for batch in collator.batches:
        for r in (batch["sources"] == SELF).nonzero().flatten().tolist():
            response = batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist()
            ended = response[-1] == EOS
            trained = int(batch["response_mask"][r].sum())
            assert (trained > 0) == ended, response
            kinds.add(ended)
    assert kinds == {True, False}  # both kinds were seen
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert 0 < log["completions/clipped_ratio"] < 1
    assert log["completions/max_length"] <= 2 and "timing/generation" in log


def test_trl_style_reward_functions_get_columns_and_weights(tmp_path):
    calls = []

    def length_reward(prompts, completions, completion_ids, solution, trainer_state, **kw):
        calls.append((list(prompts), list(solution), trainer_state.global_step))
        return [float(len(c)) for c in completion_ids]

    def sometimes(prompts, completions, completion_ids, **kw):
        return [2.0 if i % 2 == 0 else None for i in range(len(prompts))]

    data = given_groups(2, seed=4)
    for i, example in enumerate(data):
        example["solution"] = f"answer {i}"
    args = sampling_args(
        tmp_path,
        2,
        max_new_tokens=3,
        max_steps=1,
        reward_weights=[1.0, 0.5],
        per_device_train_batch_size=2,
    )
    collator = RecordingCollator(pad_token_id=PAD)
    trainer = GFTTrainer(
        model=tiny_model(),
        args=args,
        data_collator=collator,
        train_dataset=data,
        reward_funcs=[length_reward, sometimes],
    )
    trainer.train()
    ((prompts, solutions, step),) = calls
    assert step == 0 and len(prompts) == len(solutions) == 4
    by_prompt = {tuple(ex["prompt_ids"]): ex["solution"] for ex in data}
    assert [by_prompt[tuple(p)] for p in prompts] == solutions  # one column value per sample
    (batch,) = collator.batches
    rows = (batch["sources"] == SELF).nonzero().flatten().tolist()
    # Samples in call order: prompt 0's two, then prompt 1's (rows are grouped alike).
    for i, r in enumerate(rows):
        length = int(batch["response_mask"][r].sum())
        expected = length + (0.5 * 2.0 if i % 2 == 0 else 0.0)
        assert batch["rewards"][r].item() == pytest.approx(expected)
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert log["rewards/sometimes/mean"] == 2.0 and "rewards/length_reward/std" in log


def test_chat_prompts_and_max_prompt_length(tmp_path):
    tok = chat_tokenizer()
    messages = [{"role": "user", "content": "3 + 4 ="}]
    data = [
        {
            "prompt": messages,
            "solution": "7",
            "responses": [
                {"text": "7", "reward": 1.0, "source": "expert"},
                {"text": "8", "reward": 0.0, "source": "teacher"},
            ],
        }
    ]
    (group,) = GFTDataCollator(tok).normalize(data)
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = (
        expected["input_ids"]
        if isinstance(expected, dict) or hasattr(expected, "keys")
        else expected
    )
    assert list(group.prompt_ids) == list(expected)
    assert tok.decode(list(group.prompt_ids)) == "user : 3 + 4 = ; assistant :"
    assert group.responses[0].ids == (tok.convert_tokens_to_ids("7"), EOS)
    assert group.columns == {"solution": "7"}
    (short,) = GFTDataCollator(tok, max_prompt_length=3).normalize(data)
    assert short.prompt_ids == group.prompt_ids[-3:]

    seen = []

    def reward(prompts, completions, solution, **kw):
        seen.extend(zip(prompts, completions, solution))
        return [1.0] * len(prompts)

    args = sampling_args(tmp_path, 2, max_new_tokens=2, max_steps=1, per_device_train_batch_size=1)
    trainer = GFTTrainer(
        model=tiny_model(), args=args, train_dataset=data, processing_class=tok, reward_funcs=reward
    )
    trainer.train()
    assert len(seen) == 2
    for prompt, completion, solution in seen:
        assert prompt == messages and solution == "7"
        assert completion[0]["role"] == "assistant" and isinstance(completion[0]["content"], str)


def test_bad_data_and_reward_functions(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="TRL-style.*GFTGRPOTrainer"):
        GFTDataCollator(pad_token_id=PAD)([{"prompt": "hi", "completion": "there"}])
    with pytest.raises(ValueError, match='missing the "responses" field'):
        GFTDataCollator(pad_token_id=PAD)([{"prompt_ids": [3, 4]}])
    with pytest.raises(ValueError, match="apply_chat_template"):
        GFTDataCollator(pad_token_id=PAD)(
            [
                {
                    "prompt": [{"role": "user", "content": "x"}],
                    "responses": [{"ids": [3], "reward": 1.0, "source": "expert"}],
                }
            ]
        )

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(groups_dataset(2))

    args = gft_args(tmp_path, num_self_samples=2)
    with pytest.raises(TypeError, match="train_dataset.*map-style"):
        GFTTrainer(model=model, args=args, train_dataset=Stream(), reward_fn=lambda p, r: 0.0)
    with pytest.raises(ValueError, match="both"):
        GFTTrainer(
            model=model,
            args=args,
            train_dataset=groups_dataset(2),
            reward_fn=lambda p, r: 0.0,
            reward_funcs=lambda prompts, **kw: [0.0],
        )
    with pytest.raises(ValueError, match="reward_weights"):
        GFTTrainer(
            model=model,
            args=gft_args(tmp_path, num_self_samples=2, reward_weights=[1.0, 2.0]),
            train_dataset=groups_dataset(2),
            reward_funcs=lambda prompts, **kw: [0.0],
        )
    for func, error, match in [
        (lambda prompts, **kw: [0.0], ValueError, "expected 4 rewards"),
        (lambda prompts, **kw: [None] * len(prompts), ValueError, "returned None"),
        (lambda prompts, **kw: [math.nan] * len(prompts), ValueError, "finite"),
        (lambda prompts, **kw: 1.0, TypeError, "list of 4 rewards"),
    ]:
        trainer = GFTTrainer(
            model=model,
            args=sampling_args(tmp_path, 2, max_new_tokens=2, max_steps=1),
            train_dataset=groups_dataset(2),
            reward_funcs=func,
        )
        with pytest.raises(error, match=match):
            trainer.train()


def test_tokens_seen_and_sample_logging_with_self_samples(tmp_path, capsys):
    args = sampling_args(
        tmp_path,
        2,
        max_new_tokens=2,
        max_steps=2,
        include_num_input_tokens_seen=True,
        log_completions=True,
        num_completions_to_print=2,
    )
    trainer = GFTTrainer(
        model=tiny_model(),
        args=args,
        train_dataset=groups_dataset(4),
        reward_fn=lambda p, r: float(len(r)),
    )
    trainer.train()
    assert trainer.state.num_input_tokens_seen > 0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["num_input_tokens_seen"] > 0 and h["tokens_per_second"] > 0 for h in logs)
    assert len(trainer.completion_samples) == 4  # 2 prompts x 2 samples of the last step
    out = capsys.readouterr().out
    assert out.count("self samples at step") == 2 and "advantage" in out
