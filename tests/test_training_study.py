"""The training-dynamics study's pieces (benchmarks/training): each method's loss is the
objective it is named after, the groups hold the rows they claim, a run is reproducible,
and the claim verdicts follow their stated rule."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks.training import methods, policy, report, run, task  # noqa: E402

PROBLEMS = task.make_split(0, 10, 20, 10).train[:6]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = policy.build_model(3)
    with torch.no_grad():  # a less uniform policy, so that c = q and c = 1 both occur
        for p in m.parameters():
            p.mul_(4.0)
    return m


def _token_terms(model, batch):
    """Per response token: ``(log p, row index)`` from the model's own logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    targets = batch["input_ids"][:, 1:]
    on = (batch["response_mask"][:, 1:] == 1) & (batch["attention_mask"][:, 1:] == 1)
    token_logp = logp.gather(-1, targets[..., None])[..., 0]
    rows = torch.arange(targets.shape[0])[:, None].expand_as(targets)
    return token_logp[on], rows[on]


def _loss_and_grad(method, model, batch):
    model.zero_grad(set_to_none=True)
    loss, _ = methods.batch_loss(method, model, batch, "torch")
    loss.backward()
    grad = model.lm_head.weight.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return loss.detach().double(), grad


def _expected_grad(model, objective):
    model.zero_grad(set_to_none=True)
    objective.backward()
    grad = model.lm_head.weight.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return grad.float()


def _assert_grad_close(actual, expected):
    """Equal up to fp32 rounding through the model (relative to the gradient's scale)."""
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3 * scale)


def test_sft_is_mean_negative_log_likelihood_of_expert_tokens(model):
    groups = methods.build_groups(methods.SFT, PROBLEMS, None)
    assert all([r.source for r in g.responses] == ["expert"] for g in groups)
    batch = methods.collate(methods.SFT, groups)
    assert torch.equal(batch["advantages"], torch.ones(len(PROBLEMS)))
    loss, grad = _loss_and_grad(methods.SFT, model, batch)
    logp, _ = _token_terms(model, batch)
    expected = -logp.mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    _assert_grad_close(grad, _expected_grad(model, expected))


def test_dft_weights_each_token_by_its_detached_probability(model):
    batch = methods.collate(methods.DFT, methods.build_groups(methods.DFT, PROBLEMS, None))
    loss, grad = _loss_and_grad(methods.DFT, model, batch)
    logp, _ = _token_terms(model, batch)
    expected = -(logp.exp().detach() * logp).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    _assert_grad_close(grad, _expected_grad(model, expected))
    # and it is not SFT: the two differ on this policy
    sft_loss, _ = _loss_and_grad(methods.SFT, model, batch)
    assert abs(sft_loss.item() - loss.item()) > 1e-3


@pytest.mark.parametrize("method", [methods.GFT, methods.GFT_TAU05, methods.GFT_NODCR])
def test_gft_variants_are_advantage_times_dcr_times_log_p(model, method):
    torch.manual_seed(1)
    groups = methods.build_groups(method, PROBLEMS, model)
    for g in groups:
        sources = [r.source for r in g.responses]
        assert sources[:2] == ["expert", "teacher"] and set(sources[2:]) <= {"self"}
    batch = methods.collate(method, groups)
    loss, grad = _loss_and_grad(method, model, batch)
    logp, rows = _token_terms(model, batch)
    p = logp.exp().detach()
    c = torch.where(p <= method.tau, p, torch.ones_like(p))
    if method.tau == 0.0:
        assert bool((c == 1).all())  # "without DCR": c = 1 on every token
    else:
        assert bool((c < 1).any()) and bool((c == 1).any())
    adv = batch["advantages"].double()[rows]
    expected = -(adv * c * logp).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)
    _assert_grad_close(grad, _expected_grad(model, expected))


def test_grpo_groups_hold_self_samples_only_with_group_advantages(model):
    torch.manual_seed(2)
    groups = methods.build_groups(methods.GRPO, PROBLEMS, model)
    assert all(
        len(g.responses) == methods.GROUP_SIZE and {r.source for r in g.responses} == {"self"}
        for g in groups
    )
    batch = methods.collate(methods.GRPO, groups)
    for g in range(len(PROBLEMS)):
        a = batch["advantages"][batch["group_ids"] == g]
        assert abs(float(a.sum())) < 1e-4  # centred inside each group


def test_teacher_makes_mistakes_and_rewards_are_exact_match():
    split = task.make_split(0, 100, 1000, 100)
    acc = task.teacher_accuracy(split.train)
    assert 0.5 < acc < 0.9
    p = split.train[0]
    assert p.reward(task.encode_answer(p.answer)) == 1.0
    assert p.reward(task.encode_answer(p.answer + 1)) == 0.0
    assert p.reward(task.encode_answer(p.answer)[:-1]) == 0.0  # no eos: wrong
    pools = [set((q.a, q.b) for q in pool) for pool in (split.pretrain, split.train, split.heldout)]
    assert not (pools[0] & pools[1] or pools[0] & pools[2] or pools[1] & pools[2])


TINY = dataclasses.replace(
    run.Config.quick(),
    seeds=(0,),
    n_pretrain=40,
    n_train=40,
    n_heldout=8,
    pretrain_steps=2,
    steps=2,
    batch_prompts=4,
    cold_start_steps=1,
    eval_every=1,
    curve_prompts=4,
    backend="torch",
)


def test_same_seed_gives_identical_runs():
    torch.set_num_threads(1)
    state, _ = run.pretrain(0, TINY)
    first = run.method_job(0, "gft", 1.0, state, TINY)
    second = run.method_job(0, "gft", 1.0, run.pretrain(0, TINY)[0], TINY)
    first.pop("seconds"), second.pop("seconds")
    assert first == second
    assert len(first["history"]["grad_norm"]) == TINY.steps and "cold_start" in first
    other = run.method_job(1, "gft", 1.0, state, TINY)
    other.pop("seconds")
    assert other["history"] != first["history"]  # the seed does matter


def test_verdict_rule():
    assert report.verdict([0.10, 0.12, 0.11, 0.09, 0.13], +1)[0] == "supported"
    assert report.verdict([0.10, 0.12, 0.11, 0.09, 0.13], -1)[0] == "contradicted"
    assert report.verdict([0.10, -0.12, 0.11, -0.09, 0.02], +1)[0] == "inconclusive"
    assert report.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert math.isclose(report.percentile([0.0, 10.0], 99), 9.9)
