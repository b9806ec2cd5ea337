"""gft_loss against the fp64 reference on every backend (triton under the interpreter)."""

import pytest
import torch

from gft_kernels import gft_loss
from tests.helpers import BACKENDS, MODES, check_against_reference, device_for, make_case


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tau", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_matrix(backend, mode, tau, temperature, per_token_adv):
    dev = device_for(backend)
    logits, targets, adv, mask = make_case(per_token_adv=per_token_adv, device=dev)
    # Some targets at the argmax so that q > tau happens as well as q <= tau.
    targets[1, :2] = logits[1, :2].argmax(-1)
    check_against_reference(
        backend, logits, targets, adv, mask, tau=tau, temperature=temperature, loss_agg_mode=mode
    )


# One above the Triton kernel's vocabulary block (4096) exercises the chunk loop's tail.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [1, 2, 37, 4097, 4099])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "none"])
def test_ragged_vocab(backend, vocab, mode):
    logits, targets, adv, mask = make_case(
        batch=2, seq=3, vocab=vocab, per_token_adv=True, device=device_for(backend)
    )
    check_against_reference(
        backend, logits, targets, adv, mask, tau=0.5, temperature=0.7, loss_agg_mode=mode
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "none"])
def test_reduced_precision(backend, dtype, mode):
    logits, targets, adv, mask = make_case(vocab=300, dtype=dtype, device=device_for(backend))
    check_against_reference(
        backend, logits, targets, adv, mask, tau=0.1, temperature=0.7, loss_agg_mode=mode
    )


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_float64(backend):
    logits, targets, adv, mask = make_case(dtype=torch.float64)
    check_against_reference(backend, logits, targets, adv, mask, tau=0.1, loss_agg_mode="sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_dimensional_input_and_no_mask(backend):
    dev = device_for(backend)
    logits = torch.randn(7, 50, device=dev)
    targets = torch.randint(0, 50, (7,), device=dev)
    targets[3] = -100
    adv = torch.randn(7, device=dev)
    check_against_reference(backend, logits, targets, adv, None, tau=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_tokens_and_max_response_length(backend):
    logits, targets, adv, mask = make_case(device=device_for(backend))
    check_against_reference(backend, logits, targets, adv, mask, num_tokens=37.0)
    check_against_reference(
        backend,
        logits,
        targets,
        adv,
        mask,
        loss_agg_mode="seq-mean-token-sum-norm",
        max_response_length=16,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_on_stats(backend):
    from gft_kernels.reference import gft_token_terms_reference

    dev = device_for(backend)
    logits, targets, adv, mask = make_case(vocab=101, device=dev)
    logits[1, :3, 0] += 20.0  # confident tokens: q > tau
    targets[1, :3] = 0
    tau = 0.3
    loss, stats = gft_loss(
        logits, targets, adv, mask, tau=tau, temperature=0.7, return_stats=True, backend=backend
    )
    loss_plain = gft_loss(logits, targets, adv, mask, tau=tau, temperature=0.7, backend=backend)
    torch.testing.assert_close(loss, loss_plain)
    ref = gft_token_terms_reference(logits.double().cpu(), targets.cpu(), tau=tau, temperature=0.7)
    valid = (targets != -100) & mask.bool()
    v = valid.cpu()
    for name in ("logprobs", "probs", "entropy"):
        got = getattr(stats, name)
        assert got.shape == targets.shape and not got.requires_grad
        torch.testing.assert_close(got.cpu().double()[v], ref[name][v], rtol=1e-5, atol=1e-5)
    expected_fraction = ((ref["probs"] <= tau) & v).sum() / v.sum()
    torch.testing.assert_close(
        stats.rectified_fraction.cpu().double(), expected_fraction.double(), rtol=1e-6, atol=1e-7
    )
    assert 0 < float(stats.rectified_fraction) < 1, "case should rectify some tokens, not all"
