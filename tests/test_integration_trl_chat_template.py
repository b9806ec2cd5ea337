"""Demonstrations end where the policy's samples would: the chat template's end-of-turn token.

The setting of many chat models (Qwen 2.5, Llama 3): the tokenizer's eos is the end of text,
the chat template closes every turn with its own end-of-turn token, and the model's
generation config lists both as eos ids. TRL stops a sample at the first of those ids (kept
as the completion's last token, nothing appended): a policy answering in the template's
assistant turn ends its samples with the end-of-turn token, so a demonstration of a
conversational prompt must end with it too, not with the tokenizer's eos. A plain prompt's
demonstrations keep ending with the eos.

The tokenizer is a real fast tokenizer with a chat template set by hand (nothing downloaded),
saved and loaded back as any checkpoint's would be.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from transformers import AutoTokenizer, LlamaConfig  # noqa: E402

from gft_kernels.integration.examples.train_tiny import random_model  # noqa: E402
from gft_kernels.integration.trl import GFTGRPOTrainer  # noqa: E402
from tests.helpers import TINY_DECODER_LAYERS  # noqa: E402
from tests.test_integration_trl import config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECIAL = ["<pad>", "<|end_of_text|>", "<|start|>", "<|end_role|>", "<|end_of_turn|>"]
WORDS = SPECIAL + ["user", "assistant", "\n"] + [str(d) for d in range(10)] + ["+", "="]
# Each message: <|start|> role <|end_role|> content <|end_of_turn|>, then a newline (a token
# of its own, as in Qwen's template: the policy's samples stop before it).
TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m['role'] }}<|end_role|> {{ m['content'] }}"
    "<|end_of_turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant<|end_role|> {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")  # keeps newlines
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|end_of_text|>",
        additional_special_tokens=SPECIAL[2:],
    )
    tok.chat_template = TEMPLATE
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def chat_model(tokenizer, end_of_turn_stops: bool = True, favour=None):
    """A tiny Llama whose generation config stops at the end of text and (``end_of_turn_stops``)
    the end of turn; ``favour``: a token its untied head's bias makes it sample almost surely."""
    ids = tokenizer.convert_tokens_to_ids
    model = random_model(
        LlamaConfig(
            vocab_size=len(WORDS),
            **TINY_DECODER_LAYERS,
            max_position_embeddings=64,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        ),
        seed=0,
    )
    stops = [tokenizer.eos_token_id] + ([ids("<|end_of_turn|>")] if end_of_turn_stops else [])
    model.generation_config.eos_token_id = stops
    if favour is not None:
        head = torch.nn.Linear(model.config.hidden_size, len(WORDS), bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            head.bias[ids(favour)] = 30.0
        model.lm_head = head
    return model


class Recording(GFTGRPOTrainer):
    """Keeps each row's source and completion (its masked ids) as the loss saw them."""

    def _compute_loss(self, model, inputs):
        for code, ids, mask in zip(
            inputs["gft_sources"], inputs["completion_ids"], inputs["completion_mask"]
        ):
            self.rows.append((self.sources[int(code)], ids[mask.bool()].tolist()))
        return super()._compute_loss(model, inputs)


def no_reward(completions, **columns):
    return [0.0] * len(completions)


def train(tmp_path, tokenizer, model, rows):
    trainer = Recording(
        model=model,
        reward_funcs=[no_reward],
        args=config(tmp_path, per_device_train_batch_size=4, demonstration_columns=["expert"]),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.rows = []
    trainer.train()
    return trainer


def template_completion(tokenizer, trainer, prompt, content):
    """The ids a policy answering ``content`` in the template's assistant turn samples: the
    template's tokens after its generation prompt, cut (inclusive) at the first id TRL's
    generation config stops at."""
    rendered = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": content}], tokenize=True, return_dict=True
    )["input_ids"]
    asked = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert rendered[: len(asked)] == asked
    stops = trainer.generation_config.eos_token_id
    completion = rendered[len(asked) :]
    end = next(j for j, t in enumerate(completion) if t in stops)
    return completion[: end + 1]


def test_chat_demonstrations_end_with_the_end_of_turn_token(tmp_path, tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    prompt = [{"role": "user", "content": "3 + 4 ="}]
    # A policy that ends its turn at once: its samples show how TRL ends a completion.
    model = chat_model(tokenizer, favour="<|end_of_turn|>")
    trainer = train(tmp_path, tokenizer, model, [{"prompt": prompt, "expert": "7"}])
    # The tokenizer's eos comes first among TRL's eos ids: what demonstrations ended with.
    assert trainer.eos_token_ids[0] == tokenizer.eos_token_id != ids("<|end_of_turn|>")
    expected = template_completion(tokenizer, trainer, prompt, "7")
    assert expected == [ids("7"), ids("<|end_of_turn|>")]  # the newline after it: cut
    (demo,) = [c for source, c in trainer.rows if source == "expert"]
    assert demo == expected
    samples = [c for source, c in trainer.rows if source == "self"]
    # TRL's samples end with the end-of-turn token, kept, nothing after it.
    assert len(samples) == 3 and all(c == [ids("<|end_of_turn|>")] for c in samples), samples

    # The other forms of a demonstration end the same way: token ids, an assistant message,
    # ids already closed by the end of turn (left as they are).
    ending = trainer._completion_ending(prompt)
    assert ending == expected[1:]
    for value in ([ids("7")], {"role": "assistant", "content": "7"}, expected):
        assert trainer._demonstration_ids("x", value, ending) == [expected], value


def test_plain_demonstrations_end_with_the_eos(tmp_path, tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    trainer = train(
        tmp_path, tokenizer, chat_model(tokenizer), [{"prompt": "3 + 4 =", "expert": "7"}]
    )
    (demo,) = [c for source, c in trainer.rows if source == "expert"]
    assert demo == [ids("7"), tokenizer.eos_token_id]
    assert trainer._demonstration_ids("x", [ids("7")]) == [demo]


def test_an_end_of_turn_that_does_not_stop_generation_is_not_an_ending(tmp_path, tokenizer):
    """A model whose generation config does not stop at the end of turn samples past it, to
    the eos: its chat demonstrations end with the eos."""
    ids = tokenizer.convert_tokens_to_ids
    prompt = [{"role": "user", "content": "3 + 4 ="}]
    model = chat_model(tokenizer, end_of_turn_stops=False)
    trainer = train(tmp_path, tokenizer, model, [{"prompt": prompt, "expert": "7"}])
    assert ids("<|end_of_turn|>") not in trainer.eos_token_ids
    (demo,) = [c for source, c in trainer.rows if source == "expert"]
    assert demo == [ids("7"), tokenizer.eos_token_id]
