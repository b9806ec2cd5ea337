"""The head's logit transform read from a model's config is what the model's own forward
applies: checked against the real transformers models, one per scaling convention."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gft_kernels.integration.heads import head_logit_transform
from tests.helpers import TINY_DECODER_LAYERS

SMALL = dict(TINY_DECODER_LAYERS, vocab_size=64, eos_token_id=1, pad_token_id=0, bos_token_id=2)


@pytest.mark.parametrize(
    "model_type,scaling",
    [
        ("granite", {"logits_scaling": 4.0}),  # divides
        ("hyperclovax", {"logits_scaling": 4.0}),  # multiplies (muP)
        ("cohere", {"logit_scale": 0.5}),  # multiplies
        ("gemma2", {"final_logit_softcapping": 3.0}),  # caps
    ],
)
def test_transform_matches_the_models_forward(model_type, scaling):
    config = AutoConfig.for_model(model_type, **SMALL, **scaling)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[3, 4, 5, 6]]), output_hidden_states=True)
        raw = model.get_output_embeddings()(out.hidden_states[-1])
    transform = head_logit_transform(model)
    expected = out.logits
    assert not torch.allclose(raw, expected)  # the model does transform its logits
    z = raw * transform.scale
    if transform.softcap is not None:
        z = torch.tanh(z / transform.softcap) * transform.softcap
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-6)
