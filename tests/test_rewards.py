"""The math reward (gft_kernels.integration.rewards): a table of responses and truths
with the verdict the published GFT recipe's scorer gives them, the engines' call forms,
and responses that must not hold a worker."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from gft_kernels.integration.rewards import (
    compute_score,
    extract_answer,
    math_reward,
    trl_math_reward,
)

ROOT = Path(__file__).resolve().parents[1]

RIGHT = [
    ("The sum is 5", "5"),
    (r"So the result is \boxed{42.0}.", "42"),
    ("Adding them up, the answer is 7", "7"),
    ("Therefore, the final answer is 12.", "12"),
    (r"\boxed{50\%}", "0.5"),
    (r"\boxed{50%}", "0.5"),
    (r"\boxed{50}", "0.5"),  # percent either way, as the published scorer allows
    (r"\boxed{0.5}", "50"),
    (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{\dfrac{3}{4}}", r"\frac34"),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt2}{2}"),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}"),
    (r"First \boxed{3}, then on reflection \boxed{4}", "4"),
    (r"\boxed{x = 3}", "3"),
    (r"\boxed{1,000}", "1000"),
    ("The answer is 1,000", "1000"),
    ("I counted 12 apples and then 13", "13"),
    (r"\boxed{-7}", "-7"),
    (r"\boxed{ 2\pi }", r"2\pi"),
    (r"\boxed{\pi \cdot 2}", r"2\pi"),
    (r"\boxed{2^{10}}", "1024"),
    (r"\boxed{\{1, 2\}}", r"\{2, 1\}"),
    (r"\boxed{\left( 1, 2 \right)}", "(1, 2)"),
    (r"\boxed{3.14159}", "3.1416"),  # within the relative tolerance 1e-4
    (r"\boxed{\text{12}}", "12"),
    (r"The final answer is $\frac{2}{3}$.", r"\frac{2}{3}"),
    ("answer: 0.25", "25%"),
    (r"\boxed{x^2 + 2x + 1}", "(x+1)^2"),
    (r"\fbox{9}", "9"),
    # A box cut off by the length limit: the published scorer reads what is there.
    (r"so \boxed{5", "5"),
]
WRONG = [
    ("The answer is 6", "7"),
    (r"\boxed{41}", "42"),
    (r"\boxed{4}, then on reflection \boxed{3}", "4"),
    (r"\boxed{\frac{1}{3}}", "0.5"),
    (r"\boxed{0.3333}", r"\frac{1}{2}"),
    (r"\boxed{3.2}", "3.1416"),
    ("No number here at all.", "5"),
    ("", "5"),
    (r"\boxed{}", "5"),
    (r"\boxed{x = 4}", "3"),
    (r"\boxed{(1, 3)}", "(1, 2)"),
    (r"\boxed{\{1, 3\}}", r"\{1, 2\}"),
    (r"\boxed{x^2 + 1}", "(x+1)^2"),
    (r"\boxed{-5}", "5"),
    ("I counted 13 apples and then 12", "13"),
    (r"\boxed{\sqrt{3}}", r"\sqrt{2}"),
    (r"\boxed{2\pi}", r"3\pi"),
]


@pytest.mark.parametrize("response,truth", RIGHT)
def test_right_answers_score_one(response, truth):
    assert math_reward(response, truth) == 1.0


@pytest.mark.parametrize("response,truth", WRONG)
def test_wrong_answers_score_zero(response, truth):
    assert math_reward(response, truth) == 0.0


def test_the_table_is_large_enough():
    assert len(RIGHT) + len(WRONG) >= 40


@pytest.mark.parametrize(
    "response,answer",
    [
        (r"a \boxed{1} b \boxed{\frac{2}{3}} c", r"\frac{2}{3}"),
        (r"\boxed{\{a\}}", r"\{a\}"),
        ("so the answer is 17. Next, we check.", "17"),
        ("numbers 1, 2 and 3,000", "3000"),
        ("nothing", ""),
    ],
)
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


def test_verl_and_trl_forms():
    assert compute_score("openai/gsm8k", r"\boxed{42.0}", "42") == 1.0
    assert compute_score("openai/gsm8k", r"\boxed{41}", "42", extra_info={"index": 0}) == 0.0
    reward = trl_math_reward("answer")
    plain = reward([r"\boxed{5}", "the answer is 4"], answer=["5", "5"], prompt=["p", "q"])
    assert plain == [1.0, 0.0]
    chat = [[{"role": "assistant", "content": r"\boxed{\frac{1}{2}}"}]]
    assert reward(chat, answer=["0.5"]) == [1.0]


def test_trl_form_names_a_missing_column():
    reward = trl_math_reward("solution")
    with pytest.raises(ValueError, match="column.*'solution'"):
        reward(["x"], answer=["1"])
    with pytest.raises(ValueError, match="solution: expected one ground truth per completion"):
        reward(["x", "y"], solution=["1"])


def test_bad_argument_types_are_named():
    with pytest.raises(TypeError, match="response: expected a str"):
        math_reward(None, "1")
    with pytest.raises(TypeError, match="ground_truth: expected a str or number"):
        math_reward("1", None)
    assert math_reward(r"\boxed{3}", 3) == 1.0


def test_works_off_the_main_thread():
    """math-verify's own time limit uses SIGALRM, which only the main thread may set:
    reward workers running in threads must still get verdicts."""
    results = []
    worker = threading.Thread(
        target=lambda: results.append(math_reward(r"\boxed{\frac{1}{2}}", "0.5"))
    )
    worker.start()
    worker.join(60)
    assert results == [1.0]


def test_pathological_responses_are_answered_quickly():
    """Thousands of nested braces, a huge boxed expression, a megabyte of digits: each is
    answered (0.0) by a subprocess that a hang would time out."""
    script = textwrap.dedent(
        r"""
        from gft_kernels.integration.rewards import math_reward
        cases = [
            "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
            "\\boxed{" + "+".join(["x^{x^{x}}"] * 400) + "}",
            "9" * 1_000_000,
            "\\boxed{" * 3000 + "1",
            "the answer is " + "(" * 4000 + "1" + ")" * 4000,
        ]
        print([math_reward(c, "2") for c in cases])
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[0.0, 0.0, 0.0, 0.0, 0.0]"


def test_verl_loads_and_calls_the_reward_as_the_recipe_configures_it():
    """Through verl's own loader and its reward loop's calling convention (keyword
    arguments, from a thread pool, with the router's extras)."""
    import asyncio

    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    recipe = (ROOT / "integration" / "examples" / "verl_gft_qwen2.5_math_1.5b.sh").read_text()
    path = re.search(r"reward\.custom_reward_function\.path=(\S+)", recipe).group(1)
    name = re.search(r"reward\.custom_reward_function\.name=(\S+)", recipe).group(1)
    config = OmegaConf.create(
        {"reward": {"custom_reward_function": {"path": path, "name": name, "reward_kwargs": {}}}}
    )
    score = get_custom_reward_fn(config)

    async def in_executor(response, truth):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None,
            lambda: score(
                data_source="DigitalLearningGmbH/MATH-lighteval",
                solution_str=response,
                ground_truth=truth,
                extra_info={"num_turns": 2, "rollout_reward_scores": {}},
                reward_router_address=None,
                reward_model_tokenizer=None,
            ),
        )

    verdicts = [asyncio.run(in_executor(r, t)) for r, t in (RIGHT[4], RIGHT[8], WRONG[0])]
    assert verdicts == [1.0, 1.0, 0.0]


def test_prepare_data_test_split_needs_no_demonstrations():
    from gft_kernels.integration.examples.verl_gft_prepare_data import convert

    (row,) = convert(['{"question": "1+1?", "answer": "2"}'], split="test")
    assert row["reward_model"]["ground_truth"] == "2"
    assert row["extra_info"]["gft_responses"] == []
    with pytest.raises(ValueError, match="'expert' expected a non-empty string"):
        convert(['{"question": "1+1?", "answer": "2"}'], split="train")
