"""Property tests: random shapes, modes, dtypes and paddings agree with the reference."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import BACKENDS, MODES, check_against_reference, device_for

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 4))
    seq = draw(st.integers(1, 6))
    vocab = draw(st.sampled_from([1, 2, 3, 17, 64, 129, 700]))
    dtype = draw(st.sampled_from(DTYPES))
    mode = draw(st.sampled_from(MODES))
    per_token = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    logits = (
        torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64)
        * draw(st.sampled_from([0.5, 3.0, 10.0]))
    ).to(dtype)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    ignored = torch.rand(batch, seq, generator=gen) < draw(st.sampled_from([0.0, 0.3]))
    targets[ignored] = -100
    mask = (torch.rand(batch, seq, generator=gen) > draw(st.sampled_from([0.0, 0.3, 1.0]))).float()
    adv_shape = (batch, seq) if per_token else (batch,)
    adv = torch.randn(adv_shape, generator=gen)
    adv[torch.rand(adv_shape, generator=gen) < 0.2] = 0.0
    kw = dict(
        tau=draw(st.sampled_from([0.0, 0.05, 0.3, 1.0, 5.0])),
        temperature=draw(st.sampled_from([1.0, 0.6, 1.5])),
        loss_agg_mode=mode,
    )
    return logits, targets, adv, mask, kw


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_random_cases_match_reference(backend, case):
    logits, targets, adv, mask, kw = case
    dev = device_for(backend)
    check_against_reference(
        backend, logits.to(dev), targets.to(dev), adv.to(dev), mask.to(dev), **kw
    )
