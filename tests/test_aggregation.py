"""The one aggregation-weight function behind the losses and every trainer integration."""

import pytest
import torch

from gft_kernels._options import REDUCED_MODES
from gft_kernels.aggregation import aggregation_weights


def _valid():
    valid = torch.rand(4, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    valid[2] = False  # a fully masked sequence
    return valid


def _naive(valid, mode, tokens, sequences, tlen, ranks, norm_by_sequences):
    """The published definitions, written out per token in fp64."""
    m = valid.double()
    n_b = m.sum(-1, keepdim=True)
    if mode == "sum":
        return m * ranks
    if mode == "token-mean":
        return m * ranks / tokens
    if mode == "seq-mean-token-sum":
        return m * ranks / sequences
    if mode == "seq-mean-token-mean":
        return torch.where(n_b > 0, m * ranks / (sequences * n_b.clamp_min(1)), 0.0)
    divisor = tlen * sequences if norm_by_sequences else tlen
    return m * ranks / divisor


@pytest.mark.parametrize("mode", REDUCED_MODES)
@pytest.mark.parametrize("norm_by_sequences", [False, True])
def test_weights_match_the_definitions(mode, norm_by_sequences):
    valid = _valid()
    counts = dict(tokens=37.0, sequences=9.0, response_length=11.0, ranks=2.0)
    got = aggregation_weights(
        valid, mode, torch.float64, norm_by_sequences=norm_by_sequences, **counts
    )
    want = _naive(valid, mode, 37.0, 9.0, 11.0, 2.0, norm_by_sequences)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0.0)
    defaults = aggregation_weights(valid, mode, torch.float64)
    want = _naive(valid, mode, valid.sum().item(), 4.0, 6.0, 1.0, False)
    torch.testing.assert_close(defaults, want, rtol=1e-15, atol=0.0)


def test_a_tensor_count_keeps_the_weights_dtype():
    """An fp32 count must not round fp64 weights to fp32 (gradcheck runs in fp64)."""
    valid = _valid()
    got = aggregation_weights(valid, "token-mean", torch.float64, tokens=torch.tensor(3.0))
    assert got.dtype == torch.float64
    assert got[valid].unique().tolist() == [1.0 / 3.0]


def test_zero_counts_give_zero_where_nothing_carries_loss():
    empty = torch.zeros(3, 4, dtype=torch.bool)
    for mode in REDUCED_MODES:
        got = aggregation_weights(empty, mode, torch.float32, tokens=0.0, sequences=0.0)
        assert torch.equal(got, torch.zeros(3, 4)), mode
    valid = _valid()
    got = aggregation_weights(valid, "token-mean", torch.float32, tokens=torch.tensor(0.0))
    assert torch.isinf(got[valid]).all() and (got[~valid] == 0).all()


def test_verls_token_sum_is_sum():
    valid = _valid()
    torch.testing.assert_close(
        aggregation_weights(valid, "token-sum", torch.float32, ranks=3.0),
        aggregation_weights(valid, "sum", torch.float32, ranks=3.0),
    )
