"""The compared methods, each one configuration of the library's GFT loss.

Every method builds its groups with the integration's ``GFTDataCollator`` and computes its
loss with the integration's fused-head path (``gft_kernels.integration.loss``, which calls
``gft_kernels.fused_linear_gft_loss``), so no method has a private copy of a loss:

| method | group rows | advantage ``A`` | ``tau`` | per-token loss |
| --- | --- | --- | --- | --- |
| SFT | expert only | 1 (a group of one, centred only: ``r = 1``) | 0 | ``-log p`` |
| DFT | expert only | 1 | 1 (``q <= 1``: ``c = q``) | ``-sg(p) log p`` |
| GRPO | 6 self samples | ``(r - mean) / std`` in the group | 0 | ``-A log p`` |
| GFT | expert, teacher, 4 self | ``(r - mean) / std`` in the group | 0.1, 0.5 | ``-A c log p`` |
| GFT w/o DCR | expert, teacher, 4 self | as GFT | 0 | ``-A log p`` |

``tau = 0`` is how the library spells "no DCR": ``c = q`` only where ``q <= 0``, i.e. where
``q = 0`` exactly and the token contributes 0 instead of an infinite loss, and ``c = 1``
everywhere else. GRPO here is on-policy with one update per batch, so the importance ratio
is exactly 1 and PPO's clipping never acts: its loss is the plain policy gradient above.
All methods use ``token-mean`` over the step's response tokens (one micro-batch per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from transformers import PreTrainedModel

from gft_kernels import GFTStats
from gft_kernels.integration import GFTDataCollator, PromptGroup, Response, heads
from gft_kernels.integration import loss as integration_loss

from . import policy, task

GROUP_SIZE = 6  # responses per prompt for every group method (equal rows per step)


@dataclass(frozen=True)
class Method:
    """One training recipe: which rows its groups hold and the loss options."""

    name: str
    label: str
    expert: bool
    teacher: bool
    self_samples: int
    tau: float
    norm_by_std: bool

    @property
    def needs_samples(self) -> bool:
        return self.self_samples > 0


SFT = Method("sft", "SFT", True, False, 0, 0.0, False)
DFT = Method("dft", "DFT", True, False, 0, 1.0, False)
GRPO = Method("grpo", "GRPO (self only)", False, False, GROUP_SIZE, 0.0, True)
GFT = Method("gft", "GFT tau=0.1", True, True, GROUP_SIZE - 2, 0.1, True)
GFT_TAU05 = Method("gft_tau05", "GFT tau=0.5", True, True, GROUP_SIZE - 2, 0.5, True)
GFT_NODCR = Method("gft_nodcr", "GFT w/o DCR", True, True, GROUP_SIZE - 2, 0.0, True)

METHODS: Tuple[Method, ...] = (SFT, DFT, GRPO, GFT, GFT_TAU05, GFT_NODCR)
BY_NAME: Dict[str, Method] = {m.name: m for m in METHODS}


def build_groups(
    method: Method, problems: Sequence[task.Problem], model: Optional[PreTrainedModel]
) -> List[PromptGroup]:
    """Each problem's group: the method's demonstration rows, then its self samples
    (scored with the 0/1 reward); drawn with the global torch RNG."""
    samples: List[List[Tuple[int, ...]]] = [[] for _ in problems]
    if method.needs_samples:
        if model is None:
            raise ValueError(f"{method.name}: self samples need the policy")
        samples = policy.sample(model, problems, method.self_samples)
    groups = []
    for problem, own in zip(problems, samples):
        rows: List[Response] = []
        if method.expert:
            ids = task.encode_answer(problem.answer)
            rows.append(Response(ids, problem.reward(ids), "expert"))
        if method.teacher:
            ids = task.encode_answer(problem.teacher)
            rows.append(Response(ids, problem.reward(ids), "teacher"))
        rows.extend(Response(ids, problem.reward(ids), "self") for ids in own)
        groups.append(PromptGroup(problem.prompt_ids, tuple(rows)))
    return groups


def collate(method: Method, groups: Sequence[PromptGroup]) -> Dict[str, torch.Tensor]:
    """Padded rows and group advantages (``GFTDataCollator``)."""
    collator = GFTDataCollator(pad_token_id=task.PAD, norm_adv_by_std=method.norm_by_std)
    return collator.collate(groups)


def batch_loss(
    method: Method, model: PreTrainedModel, batch: Dict[str, torch.Tensor], backend: str
) -> Tuple[torch.Tensor, Optional[GFTStats]]:
    """The method's ``token-mean`` loss of one batch, with the fused head: the decoder body
    gives the hidden states and the lm_head weight goes to ``fused_linear_gft_loss``
    through the integration (the logits are never formed)."""
    mask = integration_loss.response_positions(batch)
    counts = integration_loss.step_normalizer([mask], mask.device, across_ranks=False)
    weights = integration_loss.normalized_weights(mask, "token-mean", counts)
    body = heads.decoder_body(model)
    if body is None:
        raise ValueError("model: expected a decoder body")
    hidden = body(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    weight, bias = heads.head_params(heads.output_head(model))
    return integration_loss.fused_head_loss(
        hidden,
        weight,
        bias,
        batch,
        weights,
        tau=method.tau,
        temperature=1.0,
        return_stats=True,
        backend=backend,
    )
