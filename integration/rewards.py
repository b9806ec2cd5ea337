"""A 0/1 math reward that accepts what the published GFT recipe's scorer accepts.

The answer is taken from a response the way the published scorer takes it: the last
``\\boxed{...}``, else the text after the last "the answer is" / "final answer is", else
the last number. It is right when it equals the ground truth

* as numbers (commas ignored, ``50\\%`` read as 0.5, relative tolerance 1e-4; a number
  also matches the truth scaled by 100 or 1/100, as the published scorer allows for
  answers given in percent), or
* symbolically, by `math-verify` (the answer-verification library TRL and open-r1 use):
  fractions, radicals, sets, intervals, equations such as ``x = 3``.

Three forms for the engines: :func:`math_reward` (a string and its truth),
:func:`compute_score` (verl's ``custom_reward_function``) and :func:`trl_math_reward`
(a TRL reward function reading a dataset column).

Cost: a typical response takes about a millisecond; answers longer than
:data:`MAX_ANSWER_CHARS` are compared as strings only, so no response, however
pathological (thousands of nested braces, megabytes of digits), holds a worker for long.
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any, Callable, List, Optional

# Longer extracted answers are compared as normalised strings only (no parsing): sympy's
# cost grows quickly with the size of an expression.
MAX_ANSWER_CHARS = 256
# math-verify's own per-call limit (seconds, SIGALRM; main thread only).
VERIFY_TIMEOUT_S = 2
REL_TOL = 1e-4

_ANSWER_PHRASES = ("he answer is", "final answer is")
_NUMBER = re.compile(r"-?\d*\.?\d+")
_PLAIN_NUMBER = re.compile(r"-?(\d+\.?\d*|\.\d+)(e-?\d+)?")


def last_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces,
    or None. Linear in the length of the text, whatever its nesting."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    open_at = text.find("{", start)
    if open_at < 0 or text[start:open_at].strip() not in ("\\boxed", "\\fbox"):
        # ``\boxed 5`` (no braces): the token after the command.
        rest = text[start:].split(None, 1)
        return rest[1].split("$")[0].strip() if len(rest) > 1 else None
    depth = 0
    for i in range(open_at, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None  # unbalanced: no answer


def extract_answer(response: str) -> str:
    """The answer a response gives ("" when it gives none)."""
    boxed = last_boxed(response)
    if boxed is not None:
        answer = boxed
    else:
        answer = ""
        for phrase in _ANSWER_PHRASES:
            if phrase in response:
                answer = response.rsplit(phrase, 1)[1].strip()
                # The statement ends at the line's end or the sentence's full stop.
                answer = answer.split("\n", 1)[0]
                answer = re.split(r"\.(\s|$)", answer, maxsplit=1)[0]
                break
        else:
            numbers = _NUMBER.findall(response.replace(",", ""))
            answer = numbers[-1] if numbers else ""
    answer = answer.strip().strip("$").strip()
    return answer[1:].strip() if answer.startswith(":") else answer


def _as_number(text: str) -> Optional[float]:
    """A plain number, a percentage (``50\\%``, ``50%``) as a fraction, or None."""
    text = text.replace(",", "").replace("\\!", "").replace(" ", "")
    for wrapper in ("\\text{", "\\mathrm{"):
        if text.startswith(wrapper) and text.endswith("}"):
            text = text[len(wrapper) : -1]
    scale = 1.0
    if text.endswith("\\%"):
        text, scale = text[:-2], 0.01
    elif text.endswith("%"):
        text, scale = text[:-1], 0.01
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    try:
        value = float(text) * scale
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _numbers_match(answer: float, truth: float) -> bool:
    return any(
        math.isclose(answer, candidate, rel_tol=REL_TOL)
        for candidate in (truth, truth * 100.0, truth / 100.0)
    )


def _normalised(text: str) -> str:
    return re.sub(r"\s+", "", text).replace("\\left", "").replace("\\right", "").lower()


def _symbolically_equal(answer: str, truth: str) -> bool:
    from math_verify import parse, verify

    # SIGALRM-based limits work only on the main thread; elsewhere the size cap above is
    # the guard.
    limit = VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"${truth}$", parsing_timeout=limit)
        pred = parse(f"${answer}$", parsing_timeout=limit)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=limit))
    except Exception:  # a parser or sympy failure on odd input is a wrong answer
        return False


def math_reward(response: str, ground_truth: str) -> float:
    """1.0 if ``response`` states an answer equal to ``ground_truth``, else 0.0.

    Args:
        response: the model's text (chain of thought and answer).
        ground_truth: the reference answer (a number, a LaTeX expression, ...).
    """
    if not isinstance(response, str):
        raise TypeError(f"response: expected a str, got {type(response).__name__}")
    if not isinstance(ground_truth, (str, int, float)) or isinstance(ground_truth, bool):
        raise TypeError(
            f"ground_truth: expected a str or number, got {type(ground_truth).__name__}"
        )
    truth = str(ground_truth).strip().strip("$").strip()
    answer = extract_answer(response)
    if not answer or not truth:
        return 0.0
    if _normalised(answer) == _normalised(truth):
        return 1.0
    answer_value, truth_value = _as_number(answer), _as_number(truth)
    if answer_value is not None and truth_value is not None:
        return float(_numbers_match(answer_value, truth_value))
    if len(answer) > MAX_ANSWER_CHARS or len(truth) > MAX_ANSWER_CHARS:
        return 0.0
    return float(_symbolically_equal(answer, truth))


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: Optional[dict] = None,
    **engine_kwargs: Any,
) -> float:
    """verl's reward-function form: ``reward.custom_reward_function.path=
    pkg://gft_kernels.integration.rewards`` and ``reward.custom_reward_function.name=
    compute_score``. Every row is scored as math, whatever its ``data_source``; what the
    reward loop adds (``extra_info``, a reward-model router's address and tokenizer) is not
    needed for a rule-based verdict. verl calls it from a thread pool, where
    :func:`math_reward` runs without SIGALRM limits (see :data:`MAX_ANSWER_CHARS`)."""
    return math_reward(solution_str, ground_truth)


def _completion_text(completion: Any) -> str:
    """TRL passes plain completions as strings and conversational ones as message lists."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(
        f"completions: expected strings or lists of chat messages, got {type(completion).__name__}"
    )


def trl_math_reward(column: str = "answer") -> Callable[..., List[float]]:
    """A TRL reward function scoring each completion against the dataset column
    ``column`` (TRL passes every dataset column to reward functions by name)."""

    def math_accuracy(completions: List[Any], **columns: Any) -> List[float]:
        if column not in columns:
            raise ValueError(
                f"column: the dataset has no column {column!r} for the math reward "
                f"(columns passed: {sorted(columns)}); check remove_unused_columns"
            )
        truths = columns[column]
        if len(truths) != len(completions):
            raise ValueError(
                f"{column}: expected one ground truth per completion ({len(completions)}), "
                f"got {len(truths)}"
            )
        return [math_reward(_completion_text(c), t) for c, t in zip(completions, truths)]

    math_accuracy.__name__ = f"math_accuracy_{column}"
    return math_accuracy
