"""One training run, and the jobs of the study (pre-training, a method with its cold-start
GRPO stage), each a pure function of its seed so reruns give the same numbers.

The optimizer is AdamW (no weight decay) with a constant learning rate and no gradient
clipping: the gradient norm is recorded before the update, and clipping would hide exactly
the spikes the paper's "gradient explosion" claim is about.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from transformers import PreTrainedModel

from . import measure, methods, policy, task


@dataclass(frozen=True)
class Config:
    """The study's sizes; ``quick()`` is the smoke-test version."""

    seeds: Tuple[int, ...] = tuple(range(10))
    n_pretrain: int = 400
    n_train: int = 1000
    n_heldout: int = 200
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    steps: int = 200
    batch_prompts: int = 16
    lr: float = 1e-3
    cold_start_steps: int = 60
    cold_start_lr: float = 5e-4
    eval_every: int = 25
    curve_prompts: int = 100
    eval_samples: int = 8
    small_fraction: float = 0.1
    small_methods: Tuple[str, ...] = ("sft", "dft", "gft")
    backend: str = "auto"

    @classmethod
    def quick(cls) -> Config:
        return cls(
            seeds=(0, 1),
            n_pretrain=200,
            n_train=200,
            n_heldout=40,
            pretrain_steps=20,
            steps=6,
            batch_prompts=8,
            cold_start_steps=3,
            eval_every=3,
            curve_prompts=20,
            eval_samples=2,
            small_fraction=0.25,
            small_methods=("sft", "gft"),
        )

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class History:
    """Per-step records of one run and its probe points."""

    grad_norm: List[float] = field(default_factory=list)
    loss: List[float] = field(default_factory=list)
    train_reward_self: List[float] = field(default_factory=list)
    rectified: List[float] = field(default_factory=list)
    curve_steps: List[int] = field(default_factory=list)
    curve_acc: List[float] = field(default_factory=list)
    curve_entropy: List[float] = field(default_factory=list)


def step_batches(problems: Sequence[task.Problem], steps: int, size: int, seed: int):
    """The prompts of each step: epochs over ``problems`` in an order drawn from ``seed``
    (the same for every method of a seed, so all see the same data)."""
    order: List[task.Problem] = []
    epoch = 0
    for _ in range(steps):
        if len(order) < size:
            pool = list(problems)
            random.Random(seed * 1_000_003 + epoch).shuffle(pool)
            order.extend(pool)
            epoch += 1
        yield order[:size]
        del order[:size]


def train(
    method: methods.Method,
    model: PreTrainedModel,
    problems: Sequence[task.Problem],
    *,
    steps: int,
    lr: float,
    batch_prompts: int,
    seed: int,
    backend: str,
    probe: Optional[Sequence[task.Problem]] = None,
    eval_every: int = 0,
) -> History:
    """``steps`` updates of ``model`` in place with ``method``'s loss."""
    history = History()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed * 7_919 + 17)  # the self samples' draws
    if probe is not None and eval_every:
        _probe(model, probe, 0, history)
    for step, batch_problems in enumerate(step_batches(problems, steps, batch_prompts, seed), 1):
        groups = methods.build_groups(method, batch_problems, model)
        batch = methods.collate(method, groups)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss, stats = methods.batch_loss(method, model, batch, backend)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
        optimizer.step()
        history.grad_norm.append(float(norm))
        history.loss.append(float(loss.detach()))
        own = batch["sources"] == 2
        history.train_reward_self.append(
            float(batch["rewards"][own].mean()) if bool(own.any()) else float("nan")
        )
        history.rectified.append(float(stats.rectified_fraction) if stats is not None else 0.0)
        if probe is not None and eval_every and (step % eval_every == 0 or step == steps):
            _probe(model, probe, step, history)
    return history


def _probe(model: PreTrainedModel, problems: Sequence[task.Problem], step: int, h: History):
    point = measure.curve_point(model, problems)
    h.curve_steps.append(step)
    h.curve_acc.append(point["greedy_acc"])
    h.curve_entropy.append(point["entropy"])


def pretrain(seed: int, cfg: Config) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
    """The weak initial policy of ``seed``: a short SFT run (the library's loss with
    ``tau = 0``) on the pre-training pool, disjoint from the demonstrations."""
    split = task.make_split(seed, cfg.n_pretrain, cfg.n_train, cfg.n_heldout)
    model = policy.build_model(seed)
    train(
        methods.SFT,
        model,
        split.pretrain,
        steps=cfg.pretrain_steps,
        lr=cfg.pretrain_lr,
        batch_prompts=32,
        seed=seed + 99,
        backend=cfg.backend,
    )
    state = policy.clone_state(model)
    return state, measure.evaluate(model, model, split.heldout, cfg.eval_samples)


def method_job(
    seed: int, method_name: str, fraction: float, init_state: Dict[str, torch.Tensor], cfg: Config
) -> Dict[str, Any]:
    """One method on one seed with a share ``fraction`` of the demonstrations; with the
    full share also the cold-start stage: a short GRPO run from the method's result."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    split = task.make_split(seed, cfg.n_pretrain, cfg.n_train, cfg.n_heldout)
    problems = split.train[: max(1, round(fraction * len(split.train)))]
    method = methods.BY_NAME[method_name]
    initial = policy.model_from_state(init_state)
    model = policy.model_from_state(init_state)
    history = train(
        method,
        model,
        problems,
        steps=cfg.steps,
        lr=cfg.lr,
        batch_prompts=cfg.batch_prompts,
        seed=seed,
        backend=cfg.backend,
        probe=split.heldout[: cfg.curve_prompts],
        eval_every=cfg.eval_every,
    )
    result: Dict[str, Any] = {
        "seed": seed,
        "method": method_name,
        "fraction": fraction,
        "n_demos": len(problems),
        "history": asdict(history),
        "final": measure.evaluate(model, initial, split.heldout, cfg.eval_samples),
    }
    if fraction == 1.0 and cfg.cold_start_steps > 0:
        rl = train(
            methods.GRPO,
            model,
            problems,
            steps=cfg.cold_start_steps,
            lr=cfg.cold_start_lr,
            batch_prompts=cfg.batch_prompts,
            seed=seed + 500,
            backend=cfg.backend,
        )
        result["cold_start"] = measure.evaluate(model, initial, split.heldout, cfg.eval_samples)
        result["cold_start_grad_norm_max"] = max(rl.grad_norm)
    result["seconds"] = time.perf_counter() - start
    return result


def initial_cold_start(seed: int, init_state: Dict[str, torch.Tensor], cfg: Config) -> Dict:
    """The cold-start baseline: the same GRPO stage from the initial policy itself."""
    torch.set_num_threads(1)
    split = task.make_split(seed, cfg.n_pretrain, cfg.n_train, cfg.n_heldout)
    initial = policy.model_from_state(init_state)
    model = policy.model_from_state(init_state)
    train(
        methods.GRPO,
        model,
        split.train,
        steps=cfg.cold_start_steps,
        lr=cfg.cold_start_lr,
        batch_prompts=cfg.batch_prompts,
        seed=seed + 500,
        backend=cfg.backend,
    )
    return measure.evaluate(model, initial, split.heldout, cfg.eval_samples)
