"""Heads with a logit transform: soft-capped (Gemma 2) and scaled (Cohere, Granite) logits."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from gft_kernels.integration import GFTTrainer  # noqa: E402
from gft_kernels.integration.heads import (  # noqa: E402
    LogitTransform,
    decoder_body,
    head_logit_transform,
)
from gft_kernels.reference import gft_loss_reference  # noqa: E402
from tests.test_integration_trainer import (  # noqa: E402
    EOS,
    PAD,
    VOCAB,
    RecordingCollator,
    gft_args,
    groups_dataset,
)

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=PAD,
    eos_token_id=EOS,
    bos_token_id=2,
    initializer_range=0.3,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name: str, **config):
    config_cls = getattr(transformers, f"{name}Config")
    model_cls = getattr(transformers, f"{name}ForCausalLM")
    config = config_cls(**{**COMMON, **config})
    config._attn_implementation = "eager" if name == "Gemma2" else "sdpa"
    torch.manual_seed(0)
    model = model_cls(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD, EOS
    return model


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
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = GFTTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=groups_dataset(4),
        optimizers=(optimizer, scheduler),
    )
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
