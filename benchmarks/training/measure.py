"""What is measured on held-out prompts: accuracy, drift from the initial policy, entropy.

- greedy accuracy: exact-match reward of the greedy answer;
- sampled accuracy: mean reward of ``k`` samples per prompt at temperature 1 (the policy's
  expected reward, what GRPO/GFT optimise), drawn with a fixed seed so every model is
  scored on the same random numbers;
- KL(pi || pi_0): the sequence-level KL from the initial policy, estimated on the policy's
  own samples with the exact per-position KL over the vocabulary (``sum_t KL_t``), which
  has far less variance than the log-ratio of the sampled tokens;
- entropy: mean per-token entropy of the policy along its own samples.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from transformers import PreTrainedModel

from . import policy, task

EVAL_SEED = 4242


def _rows(
    problems: Sequence[task.Problem], samples: Sequence[Sequence[Tuple[int, ...]]]
) -> Tuple[List[task.Problem], List[Tuple[int, ...]]]:
    owners, responses = [], []
    for problem, own in zip(problems, samples):
        for ids in own:
            owners.append(problem)
            responses.append(ids)
    return owners, responses


def greedy_accuracy(model: PreTrainedModel, problems: Sequence[task.Problem]) -> float:
    answers = policy.sample(model, problems, 1, greedy=True)
    return sum(p.reward(a[0]) if a else 0.0 for p, a in zip(problems, answers)) / len(problems)


@torch.no_grad()
def evaluate(
    model: PreTrainedModel,
    initial: PreTrainedModel,
    problems: Sequence[task.Problem],
    samples_per_prompt: int,
) -> Dict[str, float]:
    """Held-out metrics of ``model`` against the ``initial`` policy (see the module doc)."""
    result = {"greedy_acc": greedy_accuracy(model, problems)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EVAL_SEED)
        samples = policy.sample(model, problems, samples_per_prompt)
    owners, responses = _rows(problems, samples)
    result["sampled_acc"] = sum(p.reward(r) for p, r in zip(owners, responses)) / max(
        1, len(problems) * samples_per_prompt
    )
    ids, attn, resp = policy.pad_rows([p.prompt_ids for p in owners], responses)
    logp = policy.response_log_probs(model, ids, attn)
    logp0 = policy.response_log_probs(initial, ids, attn)
    on = resp[:, 1:].bool()  # positions that predict a response token
    probs = logp.exp()
    kl_t = (probs * (logp - logp0)).sum(-1)
    entropy_t = -(probs * logp).sum(-1)
    result["kl"] = float((kl_t * on).sum(1).mean())
    result["entropy"] = float(entropy_t[on].mean())
    return result


@torch.no_grad()
def curve_point(model: PreTrainedModel, problems: Sequence[task.Problem]) -> Dict[str, float]:
    """The cheap in-training probe: greedy accuracy and the entropy along the greedy
    answers (one forward, no sampling, so probing does not move the RNG)."""
    answers = policy.sample(model, problems, 1, greedy=True)
    responses = [a[0] if a else (task.EOS,) for a in answers]
    acc = sum(p.reward(r) for p, r in zip(problems, responses)) / len(problems)
    ids, attn, resp = policy.pad_rows([p.prompt_ids for p in problems], responses)
    logp = policy.response_log_probs(model, ids, attn)
    on = resp[:, 1:].bool()
    entropy = float((-(logp.exp() * logp).sum(-1))[on].mean())
    return {"greedy_acc": acc, "entropy": entropy}
