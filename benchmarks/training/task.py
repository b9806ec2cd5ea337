"""The toy task: two-number addition with verifiable 0/1 answers and GFT's group structure.

A prompt is ``"<bos>a+b="`` with ``a, b`` in ``[0, MAX_OPERAND]``; the answer is the sum's
digits followed by ``<eos>``. Every prompt has an expert demonstration (the true sum) and a
teacher answer: a rule that adds like a careless student, dropping the carry or slipping a
units digit now and then, so that its mistakes look like a real model's rather than noise.
The policy's own samples are added at training time. Rewards are exact-match 0/1.

Everything is a pure function of a seed, so two runs with the same seeds see the same data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Sequence, Tuple

PAD, BOS, EOS = 0, 1, 2
CHARS = "0123456789+="
VOCAB = ("<pad>", "<bos>", "<eos>") + tuple(CHARS)
VOCAB_SIZE = len(VOCAB)
# Operands up to 39: 1,600 prompts, enough for disjoint pre-training, demonstration and
# held-out pools, and a sum that is 1-2 digits long.
MAX_OPERAND = 39
# The answer: up to two digits and the eos.
MAX_NEW_TOKENS = 3

# The teacher's error rates: a carry is forgotten this often, and the units digit is off by
# one this often; about 30% of its answers end up wrong.
TEACHER_CARRY_DROP = 0.5
TEACHER_UNITS_SLIP = 0.1

_STOI = {c: i + 3 for i, c in enumerate(CHARS)}


def encode_prompt(a: int, b: int) -> Tuple[int, ...]:
    """``<bos>a+b=`` in plain decimal. (Zero-padded or least-significant-first layouts
    were tried: the tiny model sat on a loss plateau with them for far longer.)"""
    return (BOS,) + tuple(_STOI[c] for c in f"{a}+{b}=")


def encode_answer(value: int) -> Tuple[int, ...]:
    return tuple(_STOI[c] for c in str(value)) + (EOS,)


@dataclass(frozen=True)
class Problem:
    """One prompt with its ground truth and the teacher's (possibly wrong) answer."""

    a: int
    b: int
    teacher: int

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def prompt_ids(self) -> Tuple[int, ...]:
        return encode_prompt(self.a, self.b)

    def reward(self, response_ids: Sequence[int]) -> float:
        """1 for exactly the right sum followed by an eos, else 0 (the verifiable reward)."""
        ids = tuple(response_ids)
        return 1.0 if ids == encode_answer(self.answer) else 0.0


def teacher_answer(a: int, b: int, rng: random.Random) -> int:
    """The careless adder: forgets the carry into the tens with ``TEACHER_CARRY_DROP``,
    else slips the units digit by one with ``TEACHER_UNITS_SLIP``."""
    units = a % 10 + b % 10
    if units >= 10 and rng.random() < TEACHER_CARRY_DROP:
        return (a // 10 + b // 10) * 10 + units % 10
    value = a + b
    if rng.random() < TEACHER_UNITS_SLIP:
        value = max(0, value + rng.choice((-1, 1)))
    return value


@dataclass(frozen=True)
class Split:
    """Disjoint prompt pools: ``pretrain`` (the weak initial policy), ``train`` (the
    demonstrations, first ``k`` of them for a k-sized budget) and ``heldout``."""

    pretrain: Tuple[Problem, ...]
    train: Tuple[Problem, ...]
    heldout: Tuple[Problem, ...]


def make_split(seed: int, n_pretrain: int, n_train: int, n_heldout: int) -> Split:
    """All ``(a, b)`` pairs shuffled by ``seed`` and cut into the three pools."""
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    if n_pretrain + n_train + n_heldout > len(pairs):
        raise ValueError(f"split: at most {len(pairs)} prompts in all")
    rng = random.Random(seed)
    rng.shuffle(pairs)
    teacher_rng = random.Random(seed + 10_007)
    problems: List[Problem] = [Problem(a, b, teacher_answer(a, b, teacher_rng)) for a, b in pairs]
    heldout = tuple(problems[:n_heldout])
    pretrain = tuple(problems[n_heldout : n_heldout + n_pretrain])
    train = tuple(problems[n_heldout + n_pretrain : n_heldout + n_pretrain + n_train])
    return Split(pretrain, train, heldout)


def teacher_accuracy(problems: Sequence[Problem]) -> float:
    return sum(p.teacher == p.answer for p in problems) / max(1, len(problems))
