"""The seam for a loss variant (``gft_kernels.objective``): a custom per-token objective runs
through row statistics -> the torch objective -> the row gradient on every backend.

With the built-in ``GFT`` objective the seam gives ``gft_loss``'s loss and gradient; a
PPO-style clipped GFT matches torch autograd of its naive fp64 formula; bad input raises
an error naming the argument.
"""

from __future__ import annotations

import pytest
import torch

from gft_kernels import gft_loss
from gft_kernels.objective import GFT, Objective, ObjectiveInputs, dcr_coefficient, objective_loss
from tests.helpers import BACKENDS, TOLERANCES, assert_close, backend_variant, make_case

# The Triton pass over column segments (few rows on a large GPU) takes the same seam.
VARIANTS = BACKENDS + ("triton-split",)


class ClippedGFT(Objective):
    """PPO-style clipped GFT for several updates per rollout: with ``r = p / p_old``,
    ``loss = -c min(A r, A clip(r, 1 - eps, 1 + eps))`` (the pessimistic bound; for
    ``A >= 0`` that is ``-A c min(r, clip(r))``), ``c`` the detached DCR coefficient."""

    extra_inputs = ("old_logprobs",)

    def __init__(self, eps: float = 0.2) -> None:
        self.eps = eps

    def carries_loss(self, valid, advantages):
        return valid & (advantages != 0)

    def __call__(self, inputs: ObjectiveInputs):
        adv = inputs.advantages
        c = dcr_coefficient(inputs.probs, inputs.params.tau)
        ratio = torch.exp(inputs.logprobs - inputs.extra["old_logprobs"])
        clipped = ratio.clamp(1.0 - self.eps, 1.0 + self.eps)
        surrogate = torch.minimum(adv * ratio, adv * clipped)
        # d surrogate / d log p = A r where the unclipped term is the minimum, else 0.
        unclipped = adv * ratio <= adv * clipped
        zero = torch.zeros_like(ratio)
        scale = torch.where(inputs.valid & unclipped, c * adv * ratio, zero)
        loss = torch.where(inputs.valid, -c * surrogate, zero)
        return loss, scale


class NegLogLikelihood(Objective):
    """``loss = -log p`` on every valid token, whatever its advantage (SFT)."""

    def __call__(self, inputs: ObjectiveInputs):
        zero = torch.zeros_like(inputs.logprobs)
        loss = torch.where(inputs.valid, -inputs.logprobs, zero)
        return loss, torch.where(inputs.valid, torch.ones_like(zero), zero)


def run(loss_fn, backend, logits, targets, adv, mask, upstream=None, **kw):
    """``(loss, logits grad, stats or None)`` of ``loss_fn`` on ``backend``'s device (CUDA
    for Triton when present), back on the CPU; ``upstream`` weighs a per-token loss."""
    dev = torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
    x = logits.detach().to(dev).requires_grad_(True)
    targets, adv, mask = (t.to(dev) for t in (targets, adv, mask))
    kw = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    if "extra" in kw:
        kw["extra"] = {k: v.to(dev) for k, v in kw["extra"].items()}
    out = loss_fn(x, targets, adv, mask, backend=backend, **kw)
    loss, stats = out if isinstance(out, tuple) else (out, None)
    weight = 1.0 if upstream is None else upstream.to(dev)
    (loss * weight).sum().backward()
    return loss.detach().cpu(), x.grad.cpu(), stats


CASES = {
    "token-mean": dict(),
    "per-token-none-T0.7": dict(loss_agg_mode="none", temperature=0.7, per_token=True),
    "softcap-seq-mean": dict(loss_agg_mode="seq-mean-token-mean", logit_softcap=5.0, tau=0.3),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_gft_through_the_seam_matches_gft_loss(variant, case):
    kw = dict(CASES[case])
    per_token = kw.pop("per_token", False)
    torch.manual_seed(0)
    logits, targets, adv, mask = make_case(3, 4, 37, per_token_adv=per_token)
    adv[1] = 0.0  # a sequence (or token row) that carries no loss
    upstream = torch.randn(3, 4) if kw.get("loss_agg_mode") == "none" else None
    opts = dict(kw, upstream=upstream, return_stats=True)
    with backend_variant(variant) as backend:
        want, want_grad, want_stats = run(gft_loss, backend, logits, targets, adv, mask, **opts)
        got, got_grad, got_stats = run(
            objective_loss, backend, logits, targets, adv, mask, objective=GFT(), **opts
        )
    assert_close(got, want, rtol=1e-5, atol=1e-6, what="loss")
    scale = want_grad.abs().max().item()
    assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6 * scale, what="grad")
    for name in ("logprobs", "probs", "entropy", "rectified_fraction"):
        got_s, want_s = getattr(got_stats, name), getattr(want_stats, name)
        torch.testing.assert_close(got_s.cpu(), want_s.cpu(), rtol=1e-5, atol=1e-5)


def clipped_gft_fp64(logits, targets, adv, mask, old_logprobs, *, eps, tau, temperature):
    """The clipped objective written naively in fp64 (token-mean over valid tokens)."""
    valid = (targets != -100) & mask.bool()
    safe = torch.where(valid, targets, torch.zeros_like(targets)).unsqueeze(-1)
    x = logits.double()
    logp = torch.log_softmax(x / temperature, -1).gather(-1, safe).squeeze(-1)
    q = torch.softmax(x.detach(), -1).gather(-1, safe).squeeze(-1)
    c = torch.where(q <= tau, q, torch.ones_like(q)).detach()
    a = adv.double()
    if a.dim() == 1:
        a = a[:, None].expand_as(logp)
    ratio = torch.exp(logp - old_logprobs.double())
    clipped = ratio.clamp(1 - eps, 1 + eps)
    per_token = -c * torch.minimum(a * ratio, a * clipped)
    return torch.where(valid, per_token, torch.zeros_like(per_token)).sum() / valid.sum()


@pytest.mark.parametrize("per_token", [False, True], ids=["per-sequence-adv", "per-token-adv"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_clipped_gft_matches_naive_autograd(variant, per_token):
    gen = torch.Generator().manual_seed(1)
    B, T, V = 3, 4, 33
    logits = torch.randn(B, T, V, generator=gen) * 2
    targets = torch.randint(0, V, (B, T), generator=gen)
    targets[0, 1] = -100
    mask = torch.ones(B, T)
    mask[2, 3] = 0
    adv = torch.randn(B, T, generator=gen) if per_token else torch.tensor([1.3, -0.8, 0.6])
    # The rollout's log-probs, from logits one update away: some ratios leave the interval.
    old = torch.log_softmax((logits + 0.3 * torch.randn(B, T, V, generator=gen)) / 0.9, -1)
    old_logprobs = old.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    eps, tau, temperature = 0.2, 0.2, 0.9
    x_ref = logits.double().requires_grad_(True)
    ref = clipped_gft_fp64(
        x_ref, targets, adv, mask, old_logprobs, eps=eps, tau=tau, temperature=temperature
    )
    ref.backward()
    with torch.no_grad():
        logp = torch.log_softmax(logits.double() / temperature, -1)
        ratio = (logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0] - old_logprobs).exp()
    a = adv[:, None].expand(B, T) if adv.dim() == 1 else adv
    clip_binds = a * ratio > a * ratio.clamp(1 - eps, 1 + eps)
    assert clip_binds.any() and (~clip_binds).any(), "the case must exercise both branches"

    with backend_variant(variant) as backend:
        got, grad, _ = run(
            objective_loss,
            backend,
            logits,
            targets,
            adv,
            mask,
            objective=ClippedGFT(eps),
            extra={"old_logprobs": old_logprobs},
            tau=tau,
            temperature=temperature,
        )
    (loss_rtol, loss_atol), (grad_rtol, grad_atol) = TOLERANCES[torch.float32]
    assert_close(got, ref, rtol=loss_rtol, atol=loss_atol, what="loss")
    scale = x_ref.grad.abs().max().item()
    assert_close(grad, x_ref.grad, rtol=grad_rtol, atol=grad_atol * scale, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_objective_reads_rows_with_zero_advantage_unless_it_says_otherwise(backend):
    """Objective.carries_loss defaults to every valid token: an objective that does not
    vanish at A = 0 (plain SFT) sees those rows, where GFT skips them."""
    torch.manual_seed(2)
    logits, targets, _, mask = make_case(2, 3, 11, masked_sequence=False)
    zero_adv = torch.zeros(2)
    got, grad, _ = run(
        objective_loss, backend, logits, targets, zero_adv, mask, objective=NegLogLikelihood()
    )
    x_ref = logits.double().requires_grad_(True)
    valid = (targets != -100) & mask.bool()
    ref = torch.nn.functional.cross_entropy(x_ref[valid], targets[valid])
    ref.backward()
    assert_close(got, ref, rtol=2e-5, atol=1e-6, what="loss")
    assert_close(grad, x_ref.grad, rtol=1e-4, atol=1e-6, what="grad")
    gft = objective_loss(logits, targets, zero_adv, mask, objective=GFT(), backend="torch")
    assert gft.item() == 0.0


class WrongShape(Objective):
    def __call__(self, inputs: ObjectiveInputs):
        return inputs.logprobs[:1], inputs.logprobs


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(objective="gft"), TypeError, r"objective: expected a gft_kernels\.objective"),
        (dict(objective=ClippedGFT()), ValueError, r"extra: ClippedGFT reads \['old_logprobs'\]"),
        (
            dict(objective=ClippedGFT(), extra={"old_logprobs": torch.zeros(2, 3)}),
            ValueError,
            r"extra\['old_logprobs'\]: expected shape \(2, 4\)",
        ),
        (
            dict(objective=GFT(), extra={"old_logprobs": torch.zeros(2, 4)}),
            ValueError,
            r"extra: GFT reads \[\], got \['old_logprobs'\]",
        ),
        (dict(objective=GFT(), tau=-1.0), ValueError, r"tau: "),
        (dict(objective=GFT(), inplace_backward=True), ValueError, r"inplace_backward: not impl"),
        (dict(objective=GFT(), process_group=object()), ValueError, r"process_group: not impl"),
        (dict(objective=GFT(), taus=0.1), TypeError, r"unexpected keyword argument 'taus'"),
        (dict(objective=WrongShape()), ValueError, r"objective: WrongShape must return"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_bad_input_names_the_argument(kwargs, error, match):
    logits, targets, adv, mask = make_case(2, 4, 9)
    with pytest.raises(error, match=match):
        objective_loss(logits, targets, adv, mask, backend="torch", **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_values_raise_through_the_seam(backend):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("a bad value is a device-side assert on CUDA")
    logits, targets, adv, mask = make_case(2, 4, 9)
    targets[1, 2] = 9
    with pytest.raises(ValueError, match=r"targets: expected values in \[0, 9\)"):
        objective_loss(logits, targets, adv, mask, objective=GFT(), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compacted_statistics_read_only_the_rows_that_carry_loss(backend):
    """token_pass_from_statistics with ``compact`` over a backend's own partial_stats:
    the rows that carry no loss are not read, and the pass is the uncompacted one."""
    from gft_kernels.backends import RowParams, load_backend
    from gft_kernels.backends.base import TokenInputs, TokenPassCall
    from gft_kernels.backends.token_terms import token_pass_from_statistics

    rows = load_backend(backend)
    logits, targets, adv, mask = make_case(3, 4, 19, per_token_adv=True)
    adv[1] = 0.0
    logits = logits.reshape(12, 19)
    targets, adv, mask = (t.reshape(12) for t in (targets, adv, mask))
    logits[4:8] = float("nan")  # zero advantage: never read, so no NaN can reach the pass
    call = TokenPassCall(logits, TokenInputs(targets, adv, mask, 1), RowParams(0.1, 0.8), False)
    read = []

    class Spy:
        def partial_stats(self, z, local, params, *, with_entropy):
            read.append(z.shape[0])
            return rows.partial_stats(z, local, params, with_entropy=with_entropy)

    got, _ = token_pass_from_statistics(Spy(), call, compact=True)
    carries = (targets != -100) & (mask != 0) & (adv != 0)
    assert read == [int(carries.sum())]
    want = rows.token_pass(
        logits, targets, adv, mask, call.params, tokens_per_advantage=1, with_stats=False
    )
    for name in ("loss", "logprobs", "probs", "scale"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-6, atol=1e-6)
