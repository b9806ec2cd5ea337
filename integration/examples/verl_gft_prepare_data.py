"""Turns GFT training data into verl's RL parquet format, with the hybrid-group responses.

Input: JSON lines, one prompt each::

    {"question": "...", "answer": "42",
     "expert": "worked solution ... \\boxed{42}",
     "teachers": ["teacher solution 1", "teacher solution 2", "teacher solution 3"]}

Output: a parquet file verl's ``RLHFDataset`` reads (``prompt`` as chat messages,
``reward_model.ground_truth`` for ``gft_kernels.integration.rewards.compute_score``, the
reward the launch script sets) whose
``extra_info.gft_responses`` holds the expert and teacher responses that
``gft_kernels.integration.verl.hybrid.HybridGroupAgentLoop`` adds to each prompt's group.
``--teachers`` caps the teacher answers per prompt (the published recipe uses 3, with
1 expert: ``rollout.n`` is then 4 + the number of self samples). With ``--split test``
only ``question`` and ``answer`` are needed and the rows carry no responses
(``gft_responses: []``, ``extra_info.split = "test"``): the hybrid agent loop then samples
every validation session from the policy, so validation scores the policy's own samples.

    python integration/examples/verl_gft_prepare_data.py train.jsonl train.parquet
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, Iterable, List

INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
# Also verl's own \\boxed{} verifier, should a run leave out the recipe's reward function.
DATA_SOURCE = "DigitalLearningGmbH/MATH-lighteval"


def to_verl_row(
    example: Dict[str, Any], index: int, *, split: str, teachers: int
) -> Dict[str, Any]:
    """One verl RL row (prompt, verifier, GFT responses) from one input example."""
    required = ("question", "answer") if split == "test" else ("question", "answer", "expert")
    for key in required:
        if not isinstance(example.get(key), str) or not example[key]:
            raise ValueError(f"line {index + 1}: {key!r} expected a non-empty string")
    responses = []
    if split != "test":
        teacher_texts = example.get("teachers", [])
        if not isinstance(teacher_texts, list) or not all(
            isinstance(t, str) for t in teacher_texts
        ):
            raise ValueError(f"line {index + 1}: 'teachers' expected a list of strings")
        responses = [{"text": example["expert"], "source": "expert"}]
        responses += [{"text": t, "source": "teacher"} for t in teacher_texts[:teachers]]
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": f"{example['question']} {INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": example["answer"]},
        "extra_info": {"split": split, "index": index, "gft_responses": responses},
    }


def convert(
    lines: Iterable[str], *, split: str = "train", teachers: int = 3
) -> List[Dict[str, Any]]:
    return [
        to_verl_row(json.loads(line), i, split=split, teachers=teachers)
        for i, line in enumerate(lines)
        if line.strip()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jsonl", help="input: one JSON object per line")
    parser.add_argument("parquet", help="output parquet file for verl's data.train_files")
    parser.add_argument("--split", default="train")
    parser.add_argument("--teachers", type=int, default=3, help="teacher answers per prompt")
    args = parser.parse_args()
    import pandas as pd

    with open(args.jsonl) as f:
        rows = convert(f, split=args.split, teachers=args.teachers)
    pd.DataFrame(rows).to_parquet(args.parquet)
    print(f"{len(rows)} prompts -> {args.parquet}")


if __name__ == "__main__":
    main()
