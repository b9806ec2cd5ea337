"""Heads with a logit transform: soft-capped (Gemma 2) and scaled (Cohere, Granite) logits."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from gft_kernels.integration import GFTTrainer  # noqa: E402
from gft_kernels.integration.examples.train_tiny import random_model  # noqa: E402
from gft_kernels.integration.heads import (  # noqa: E402
    LogitTransform,
    decoder_body,
    head_logit_transform,
)
from gft_kernels.reference import gft_loss_reference  # noqa: E402
from tests.test_integration_trainer import (  # noqa: E402
    PAD,
    TINY_DECODER,
    RecordingCollator,
    gft_args,
    groups_dataset,
    sgd_trainer,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(name: str, **config):
    """The tiny decoder of architecture ``name`` (``Llama``, ``Gemma2``, ...): ``config`` on
    top of :data:`TINY_DECODER` with an initializer range of 0.3."""
    config = getattr(transformers, f"{name}Config")(
        **{**TINY_DECODER, "initializer_range": 0.3, **config}
    )
    return random_model(config, seed=0, attn_implementation="eager" if name == "Gemma2" else None)


MODELS = [
    ("Llama", {}, LogitTransform()),
    (
        "Gemma2",
        {"final_logit_softcapping": 2.0, "head_dim": 8, "query_pre_attn_scalar": 8},
        LogitTransform(softcap=2.0),
    ),
    ("Cohere", {"logit_scale": 0.5}, LogitTransform(scale=0.5)),
    ("Granite", {"logits_scaling": 4.0}, LogitTransform(scale=0.25)),
]


@pytest.mark.parametrize("name, config, expected", MODELS)
def test_transform_read_from_the_config_reproduces_the_logits(name, config, expected):
    model = build(name, **config).eval()
    transform = head_logit_transform(model)
    assert transform == expected
    ids = torch.tensor([[3, 9, 4, 7, 12, 5]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hidden = decoder_body(model)(input_ids=ids).last_hidden_state
        raw = model.get_output_embeddings()(hidden)
        torch.testing.assert_close(transform.apply(raw), logits, rtol=1e-5, atol=1e-5)
    if not transform.is_identity:
        assert (raw - logits).abs().max() > 1e-2  # the transform matters for this model


def test_bad_transform_values_are_refused():
    model = build("Cohere", logit_scale=0.5)
    model.config.logit_scale = float("nan")
    with pytest.raises(ValueError, match="logit_scale"):
        head_logit_transform(model)


@pytest.mark.parametrize("name, config", [MODELS[1][:2], MODELS[2][:2]])
@pytest.mark.parametrize("in_head", [False, True])
def test_transformed_heads_train_like_the_reference(tmp_path, monkeypatch, name, config, in_head):
    # Gemma 2 soft-caps its logits (cap 2: most logits are bent), Cohere scales them: the
    # fused head applies the transform itself, and the loss equals the reference on the
    # model's own logits, on the body + head path and on the path wrapped models take (the
    # loss inside the lm_head, which the model then transforms as if it were logits).
    monkeypatch.setattr(GFTTrainer, "_computes_loss_in_head", lambda self, m: in_head)
    model = build(name, **config)
    ref_model = copy.deepcopy(model)
    args = gft_args(tmp_path, max_steps=2, loss_agg_mode="token-mean")
    collator = RecordingCollator(pad_token_id=PAD)
    trainer = sgd_trainer(model, args, groups_dataset(4), collator, lr=0.1)
    trainer.train()  # the first-batch head check passes: the cap comes from the config
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    ref_model.train()
    for step, batch in enumerate(collator.batches):
        logits = ref_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        ref = gft_loss_reference(
            logits[:, :-1],
            batch["input_ids"][:, 1:],
            batch["advantages"],
            batch["response_mask"][:, 1:],
            tau=args.tau,
        )
        ref.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert losses[step] == pytest.approx(ref.item(), rel=1e-4, abs=1e-6), step
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
