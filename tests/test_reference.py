"""The reference equals a line-by-line transcription of the published formula."""

import math

import pytest
import torch

from gft_kernels._options import LOSS_AGG_MODES
from gft_kernels.reference import gft_loss_reference


def transcription(logits, targets, advantages, mask, tau, temperature, mode, tlen=None):
    """Scalar Python, token by token: l = -A * stopgrad(q if q <= tau else 1) * log p."""
    batch, seq, vocab = logits.shape
    losses = [[0.0] * seq for _ in range(batch)]
    valid = [[0] * seq for _ in range(batch)]
    for b in range(batch):
        for t in range(seq):
            z = [float(v) for v in logits[b, t]]
            y = int(targets[b, t])
            if y == -100 or not mask[b, t]:
                continue
            valid[b][t] = 1
            zt = [v / temperature for v in z]
            mt = max(zt)
            log_p = zt[y] - (mt + math.log(sum(math.exp(v - mt) for v in zt)))
            m1 = max(z)
            q = math.exp(z[y] - m1) / sum(math.exp(v - m1) for v in z)
            c = q if q <= tau else 1.0
            a = float(advantages[b]) if advantages.dim() == 1 else float(advantages[b, t])
            losses[b][t] = -a * c * log_p
    flat = [losses[b][t] for b in range(batch) for t in range(seq)]
    if mode == "token-mean":
        return sum(flat) / sum(map(sum, valid))
    if mode == "seq-mean-token-sum":
        return sum(sum(row) for row in losses) / batch
    if mode == "seq-mean-token-mean":
        return sum(sum(losses[b]) / sum(valid[b]) for b in range(batch)) / batch
    if mode == "seq-mean-token-sum-norm":
        return sum(flat) / (tlen or seq)
    if mode == "sum":
        return sum(flat)
    return losses


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("tau", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("per_token", [False, True])
def test_reference_matches_transcription(mode, tau, temperature, per_token):
    batch, seq, vocab = 3, 4, 6
    logits = torch.randn(batch, seq, vocab, dtype=torch.float64) * 2
    # Make some targets likely so that q crosses tau on both sides.
    targets = logits.argmax(-1)
    targets[1] = torch.randint(0, vocab, (seq,))
    targets[0, 2] = -100
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[2, 0] = False
    adv = (
        torch.randn(batch, seq, dtype=torch.float64)
        if per_token
        else torch.randn(batch, dtype=torch.float64)
    )
    got = gft_loss_reference(
        logits, targets, adv, mask, tau=tau, temperature=temperature, loss_agg_mode=mode
    )
    want = transcription(logits, targets, adv, mask, tau, temperature, mode)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_reference_gradient_flows_only_through_log_p():
    logits = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 3])
    adv = torch.tensor([0.5, -2.0], dtype=torch.float64)
    gft_loss_reference(logits, targets, adv, tau=1.0, loss_agg_mode="sum").backward()
    with torch.no_grad():
        p = torch.softmax(logits, -1)
        c = p.gather(1, targets[:, None])  # tau = 1: c = q
        onehot = torch.nn.functional.one_hot(targets, 5)
        expected = adv[:, None] * c * (p - onehot)
    torch.testing.assert_close(logits.grad, expected)
