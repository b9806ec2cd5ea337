"""The tiny policy: a two-layer Llama over the task's 15-token vocabulary, and sampling.

Small enough that one optimizer step on a group batch takes milliseconds on one CPU thread,
big enough to learn two-digit addition partially in a few hundred steps, which is what
gives a policy that starts weak but is sometimes right (so that its own samples carry
reward). Sampling goes through the integration's ``sample_responses`` (the GFT trainer's
self-sampling path), so the study exercises it end to end.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from gft_kernels.integration import PromptGroup, default_attn_implementation
from gft_kernels.integration.sampling import sample_responses, self_sampling_kwargs

from . import task

HIDDEN = 64
LAYERS = 2


def build_model(seed: int) -> PreTrainedModel:
    """Random weights drawn from ``seed`` (nothing downloaded)."""
    config = LlamaConfig(
        vocab_size=task.VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=16,
        tie_word_embeddings=True,
        pad_token_id=task.PAD,
        bos_token_id=task.BOS,
        eos_token_id=task.EOS,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=default_attn_implementation(torch.float32)
        )
    model.generation_config.pad_token_id = task.PAD
    model.generation_config.eos_token_id = task.EOS
    return model


def clone_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def model_from_state(state: Dict[str, torch.Tensor]) -> PreTrainedModel:
    model = build_model(0)
    model.load_state_dict(state)
    return model


def prompt_groups(problems: Sequence[task.Problem]) -> List[PromptGroup]:
    """Prompt-only groups, the form ``sample_responses`` reads."""
    return [PromptGroup(p.prompt_ids, ()) for p in problems]


def sample(
    model: PreTrainedModel,
    problems: Sequence[task.Problem],
    k: int,
    *,
    greedy: bool = False,
) -> List[List[Tuple[int, ...]]]:
    """``k`` responses per problem (temperature 1, no top-k/top-p; or greedy), each cut
    after its eos. Uses the global torch RNG: callers seed it."""
    if greedy:
        kwargs = {"do_sample": False, "max_new_tokens": task.MAX_NEW_TOKENS}
    else:
        kwargs = self_sampling_kwargs(1.0, task.MAX_NEW_TOKENS, {"do_sample": True}, k)
    out = sample_responses(
        model,
        prompt_groups(problems),
        k,
        kwargs,
        pad_token_id=task.PAD,
        eos_ids=[task.EOS],
        device=torch.device("cpu"),
        max_response_length=task.MAX_NEW_TOKENS,
    )
    return [[s.ids for s in per_prompt] for per_prompt in out]


def pad_rows(
    prompts: Sequence[Tuple[int, ...]], responses: Sequence[Tuple[int, ...]]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, response_mask)`` of prompt + response rows, right
    padded (the collator's layout)."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), width), task.PAD, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attn[i, : len(p) + len(r)] = 1
        resp[i, len(p) : len(p) + len(r)] = 1
    return ids, attn, resp


@torch.no_grad()
def response_log_probs(
    model: PreTrainedModel, ids: torch.Tensor, attn: torch.Tensor
) -> torch.Tensor:
    """``(R, L - 1, V)`` next-token log-probabilities (evaluation only: V is 15 here)."""
    model.eval()
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    return torch.log_softmax(logits, -1)
