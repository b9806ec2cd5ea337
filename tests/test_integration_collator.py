"""GFTDataCollator: rows, masks, group ids and advantages on hand-made groups."""

import math

import pytest
import torch

from gft_kernels.integration import GFTDataCollator, PromptGroup, Response

EPS = 1e-6


def hand_made():
    return [
        {
            "prompt_ids": [5, 6],
            "responses": [
                {"ids": [7], "reward": 1.0, "source": "expert"},
                {"ids": [8, 9], "reward": 0.0, "source": "teacher"},
                {"ids": [10], "reward": 0.5, "source": "self"},
            ],
        },
        {"prompt_ids": [11], "responses": [{"ids": [12, 13, 14], "reward": 2, "source": "expert"}]},
    ]


def test_rows_masks_groups_and_advantages():
    batch = GFTDataCollator(pad_token_id=0)(hand_made())
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 0],
        [5, 6, 8, 9],
        [5, 6, 10, 0],
        [11, 12, 13, 14],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1] * 4]
    assert batch["response_mask"].tolist() == [
        [0, 0, 1, 0],
        [0, 0, 1, 1],
        [0, 0, 1, 0],
        [0, 1, 1, 1],
    ]
    assert batch["group_ids"].tolist() == [0, 0, 0, 1]
    assert batch["sources"].tolist() == [0, 1, 2, 0]  # expert, teacher, self, expert
    assert batch["rewards"].tolist() == [1.0, 0.0, 0.5, 2.0]
    for key in ("input_ids", "attention_mask", "response_mask", "group_ids", "sources"):
        assert batch[key].dtype == torch.long, key
    assert batch["advantages"].dtype == torch.float32
    # Group 0: rewards (1, 0, 0.5): mean 0.5, unbiased std sqrt((0.25 + 0.25 + 0) / 2) = 0.5.
    # Group 1 has one response: it keeps its raw reward (mean 0, std 1), as in GRPO.
    expected = [0.5 / (0.5 + EPS), -0.5 / (0.5 + EPS), 0.0, 2.0 / (1.0 + EPS)]
    torch.testing.assert_close(batch["advantages"], torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_advantages_without_std_and_equal_rewards():
    examples = hand_made()
    examples.append(
        {
            "prompt_ids": [3],
            "responses": [{"ids": [4], "reward": 0.7, "source": "self"}] * 3,
        }
    )
    batch = GFTDataCollator(pad_token_id=0, norm_adv_by_std=False)(examples)
    # Dr. GRPO style: only centred. Equal rewards in a group: exactly 0.
    expected = [0.5, -0.5, 0.0, 2.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(batch["advantages"], torch.tensor(expected), rtol=1e-6, atol=1e-7)
    assert batch["group_ids"].tolist() == [0, 0, 0, 1, 2, 2, 2]


def test_truncation_and_pad_multiple():
    batch = GFTDataCollator(pad_token_id=99, max_response_length=2, pad_to_multiple_of=8)(
        hand_made()
    )
    assert batch["input_ids"].shape == (4, 8)
    assert batch["input_ids"][3].tolist() == [11, 12, 13] + [99] * 5  # response cut to 2
    assert batch["input_ids"][1].tolist() == [5, 6, 8, 9] + [99] * 4
    assert batch["response_mask"].sum(1).tolist() == [1, 2, 1, 2]
    assert batch["attention_mask"].sum(1).tolist() == [3, 4, 3, 3]


class ToyTokenizer:
    pad_token_id = None  # the collator then pads with eos
    eos_token_id = 1
    bos_token_id = 2

    def encode(self, text, add_special_tokens=True):
        ids = [10 + int(c) for c in text]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens=True):
        return "".join(str(i - 10) for i in ids if i >= 10)


def test_text_fields_with_tokenizer():
    collator = GFTDataCollator(ToyTokenizer())
    assert collator.pad_token_id == 1
    groups = collator.normalize(
        [
            {
                "prompt": "34",
                "responses": [
                    {"text": "7", "reward": 1.0, "source": "expert"},
                    {"ids": [15], "reward": 0.0, "source": "teacher"},
                ],
            }
        ]
    )
    assert groups[0].prompt_ids == (2, 13, 14)  # bos added to the prompt
    assert groups[0].prompt_text == "34"
    assert groups[0].responses[0].ids == (17, 1)  # eos appended to text responses
    assert groups[0].responses[1].ids == (15,)  # ids used exactly as given
    batch = collator.collate(groups)
    assert batch["input_ids"].tolist() == [[2, 13, 14, 17, 1], [2, 13, 14, 15, 1]]
    assert batch["response_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]]


def test_collate_appended_group_members():
    collator = GFTDataCollator(pad_token_id=0)
    (group,) = collator.normalize(hand_made()[1:])
    merged = group.with_responses([Response((4, 4), 0.0, "self")])
    assert isinstance(merged, PromptGroup) and len(merged.responses) == 2
    batch = collator.collate([merged])
    # rewards (2, 0): mean 1, std sqrt(2).
    a = 1.0 / (math.sqrt(2.0) + EPS)
    torch.testing.assert_close(batch["advantages"], torch.tensor([a, -a]), rtol=1e-6, atol=1e-7)
    assert batch["sources"].tolist() == [0, 2]


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda e: e[0]["responses"][0].pop("reward"), ValueError, r'\["reward"\]|"reward"'),
        (lambda e: e[0]["responses"][0].update(reward=float("nan")), ValueError, "reward"),
        (lambda e: e[0]["responses"][0].update(reward=True), TypeError, "reward"),
        (lambda e: e[0]["responses"][0].update(reward="1"), TypeError, "reward"),
        (lambda e: e[0]["responses"][1].update(source="oracle"), ValueError, "source"),
        (lambda e: e[0]["responses"][1].pop("source"), ValueError, "source"),
        (lambda e: e[1].update(responses=[]), ValueError, r"examples\[1\]\[\"responses\"\]"),
        (lambda e: e[1].update(responses="abc"), TypeError, "responses"),
        (lambda e: e[0].update(prompt_ids=[]), ValueError, "prompt_ids"),
        (lambda e: e[0].pop("prompt_ids"), ValueError, "prompt_ids"),
        (lambda e: e[0].update(prompt_ids=[1, -2]), ValueError, r"prompt_ids\"\]\[1\]"),
        (lambda e: e[0].update(prompt_ids=[1, 2.0]), TypeError, "prompt_ids"),
        (lambda e: e[0]["responses"][0].update(ids=[]), ValueError, "ids"),
        (lambda e: e[0]["responses"][0].pop("ids"), ValueError, "ids"),
        (lambda e: e[0]["responses"][2].update(ids=None, text="7"), ValueError, "tokenizer"),
        (lambda e: e.append(3), TypeError, r"examples\[2\]"),
    ],
)
def test_bad_input_names_the_field(mutate, error, match):
    examples = hand_made()
    mutate(examples)
    with pytest.raises(error, match=match):
        GFTDataCollator(pad_token_id=0)(examples)


def test_bad_batch_and_options():
    with pytest.raises(ValueError, match="examples"):
        GFTDataCollator(pad_token_id=0)([])
    with pytest.raises(ValueError, match="pad_token_id"):
        GFTDataCollator()
    with pytest.raises(ValueError, match="max_response_length"):
        GFTDataCollator(pad_token_id=0, max_response_length=0)
    with pytest.raises(TypeError, match="norm_adv_by_std"):
        GFTDataCollator(pad_token_id=0, norm_adv_by_std=1)
