"""``python -m benchmarks.reward_speed``: seconds the math reward takes for 1000 typical
responses (one core, seeded mix of "the answer is", boxed numbers, fractions against
decimals, radicals and percentages, right and wrong)."""

from __future__ import annotations

import random
import time

from gft_kernels.integration.rewards import math_reward

STEPS = "Let us compute step by step. First, 3 + 4 = 7, and 12 * 5 = 60. " * 8


def typical_responses(count: int = 1000, seed: int = 0):
    """``(response, ground_truth)`` pairs; one in ten states a wrong answer."""
    rng = random.Random(seed)
    pairs = []
    for i in range(count):
        a, b = rng.randint(1, 500), rng.randint(2, 9)
        kind = i % 5
        if kind == 0:
            pairs.append((STEPS + f"The answer is {a}", str(a + i % 2)))
        elif kind == 1:
            pairs.append((STEPS + f"Therefore \\boxed{{{a}.0}}.", str(a)))
        elif kind == 2:
            pairs.append((STEPS + f"Thus \\boxed{{\\frac{{{a}}}{{{b}}}}}", repr(round(a / b, 6))))
        elif kind == 3:
            pairs.append((STEPS + f"Thus \\boxed{{\\sqrt{{{b}}} + {a}}}", f"{a}+\\sqrt{{{b}}}"))
        else:
            pairs.append((STEPS + f"So we get {a}\\% in total.", str(a / 100)))
    return pairs


def main() -> None:
    pairs = typical_responses()
    math_reward(*pairs[2])  # imports math-verify and sympy outside the timing
    start = time.perf_counter()
    right = sum(math_reward(response, truth) for response, truth in pairs)
    seconds = time.perf_counter() - start
    print(f"{len(pairs)} responses in {seconds:.2f} s ({right:.0f} right)")


if __name__ == "__main__":
    main()
