"""GFTTrainer: parity with the naive reference, self-sampling, logging, bad input."""

import copy
import importlib.util
import random

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import gft_kernels.integration.loss as loss_module  # noqa: E402
from gft_kernels import group_advantages  # noqa: E402
from gft_kernels.integration import (  # noqa: E402
    GFTConfig,
    GFTDataCollator,
    GFTTrainer,
    default_attn_implementation,
)
from gft_kernels.integration.examples.train_tiny import random_model  # noqa: E402
from gft_kernels.reference import gft_loss_reference  # noqa: E402
from tests.helpers import TINY_DECODER_LAYERS  # noqa: E402

VOCAB = 29
PAD = 0
EOS = 1
# The tiny decoder's configuration, whatever its architecture (test_integration_heads builds
# Gemma 2, Cohere and Granite ones from it too).
TINY_DECODER = dict(
    vocab_size=VOCAB,
    **TINY_DECODER_LAYERS,
    max_position_embeddings=64,
    pad_token_id=PAD,
    eos_token_id=EOS,
    bos_token_id=2,
)
# The training arguments of every trainer test here and in the FSDP and TRL tests: a CPU
# run logged at every step, nothing saved or reported, no gradient clipping (the plain
# reference loops clip nothing either).
TRAINING = dict(
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    use_cpu=True,
    seed=0,
    max_grad_norm=0.0,
    dataloader_pin_memory=False,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(tie: bool = True) -> LlamaConfig:
    return LlamaConfig(
        **TINY_DECODER,
        tie_word_embeddings=tie,
        attention_dropout=0.0,
        initializer_range=0.1,  # spread-out logits: tokens on both sides of tau
    )


def tiny_model(tie: bool = True, bias: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """The tiny Llama of :func:`tiny_config`, random weights from ``seed``; ``bias``: an
    untied head with a bias."""
    model = random_model(tiny_config(tie), seed)
    if bias:
        # A head with a bias (untied): the fused op must add it like nn.Linear does.
        hidden = model.config.hidden_size
        head = nn.Linear(hidden, VOCAB, bias=True)
        with torch.no_grad():
            head.weight.copy_(torch.randn(VOCAB, hidden) * 0.2)
            head.bias.copy_(torch.randn(VOCAB) * 0.5)
        model.lm_head = head
    return model


def groups_dataset(n_prompts: int, seed: int = 0):
    """Random prompt groups with varying prompt/response lengths and rewards."""
    rng = random.Random(seed)
    data = []
    for _ in range(n_prompts):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 4))]
        responses = []
        for source in ("expert", "teacher", "self")[: rng.randint(2, 3)]:
            ids = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 5))]
            responses.append(
                {"ids": ids, "reward": rng.choice([0.0, 0.5, 1.0, 2.0]), "source": source}
            )
        data.append({"prompt_ids": prompt, "responses": responses})
    return data


class RecordingCollator(GFTDataCollator):
    """Keeps every padded batch it produces (the exact batches the trainer trained on)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = []

    def collate(self, groups):
        batch = super().collate(groups)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def gft_args(tmp_path, **overrides) -> GFTConfig:
    """:data:`TRAINING` with 3 steps of batch 2 on the ``torch`` backend, then ``overrides``."""
    return GFTConfig(
        **{
            **TRAINING,
            "output_dir": str(tmp_path),
            "per_device_train_batch_size": 2,
            "max_steps": 3,
            "gft_backend": "torch",
            **overrides,
        }
    )


def sgd_trainer(model, args: GFTConfig, train_dataset, data_collator=None, *, lr) -> GFTTrainer:
    """A GFTTrainer that steps plain SGD at a constant learning rate ``lr``, as the reference
    loops do."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return GFTTrainer(
        model=model,
        args=args,
        data_collator=data_collator,
        train_dataset=train_dataset,
        optimizers=(optimizer, scheduler),
    )


def reference_loss(model, batch, args: GFTConfig) -> torch.Tensor:
    """The naive loss on the model's full logits (prompt and padding included). Normalised
    per step, ``seq-mean-token-sum-norm`` is also divided by the step's responses."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_step_norm = args.loss_agg_mode == "seq-mean-token-sum-norm" and (
        args.loss_normalization == "step"
    )
    divisor = batch["input_ids"].shape[0] if per_step_norm else 1
    return (
        gft_loss_reference(
            logits[:, :-1],
            batch["input_ids"][:, 1:],
            batch["advantages"],
            batch["response_mask"][:, 1:],
            tau=args.tau,
            temperature=args.temperature,
            loss_agg_mode=args.loss_agg_mode,
            ignore_index=-100,
            num_tokens=None,
            max_response_length=args.max_response_length,
        )
        / divisor
    )


CASES = [
    # (tied embeddings, head bias, mode, max_response_length, temperature, tau, normalisation)
    (True, False, "token-mean", None, 1.0, 0.1, "step"),
    (False, True, "seq-mean-token-mean", 3, 1.0, 0.1, "step"),  # responses truncated to 3
    (True, False, "seq-mean-token-sum", None, 0.7, 0.5, "micro_batch"),
    (False, True, "seq-mean-token-sum-norm", 6, 1.0, 0.1, "step"),  # Tlen 6 > longest
    (True, True, "seq-mean-token-sum-norm", 6, 1.0, 0.1, "micro_batch"),
    (True, True, "sum", None, 1.0, 0.0, "step"),
]


BLOCKWISE = {"gft_head": "blockwise", "gft_backend": "triton"}
HEAD_CASES = [(*case, {}) for case in CASES] + [
    (*CASES[1], BLOCKWISE),  # untied head with a bias
    (*CASES[2], BLOCKWISE),  # tied, T != 1
]


@pytest.mark.parametrize("tie, bias, mode, max_len, temperature, tau, norm, head", HEAD_CASES)
def test_three_steps_match_reference_loop(
    tmp_path, monkeypatch, tie, bias, mode, max_len, temperature, tau, norm, head
):
    lr = 0.1
    model = tiny_model(tie=tie, bias=bias)
    ref_model = copy.deepcopy(model)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == (
        tie and not bias
    )
    args = gft_args(
        tmp_path,
        loss_agg_mode=mode,
        max_response_length=max_len,
        temperature=temperature,
        tau=tau,
        loss_normalization=norm,
        **head,
    )
    collator = RecordingCollator(pad_token_id=PAD, max_response_length=max_len)

    # Only response positions may reach the head: count the rows the fused op receives.
    head_rows = []
    real = loss_module.fused_linear_gft_loss

    def spy(hidden, weight, targets, advantages, mask=None, **kw):
        valid = torch.ones(targets.shape, dtype=torch.bool) if mask is None else mask.bool()
        head_rows.append(int(valid.sum()))
        return real(hidden, weight, targets, advantages, mask, **kw)

    monkeypatch.setattr(loss_module, "fused_linear_gft_loss", spy)
    trainer = sgd_trainer(model, args, groups_dataset(6), collator, lr=lr)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and len(collator.batches) == 3

    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=lr)
    ref_model.train()
    for step, batch in enumerate(collator.batches):
        assert head_rows[step] == int(batch["response_mask"][:, 1:].sum())
        loss = reference_loss(ref_model, batch, args)
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert losses[step] == pytest.approx(loss.item(), rel=1e-4, abs=1e-7), f"step {step}"

    moved = 0.0
    init = tiny_model(tie=tie, bias=bias).state_dict()
    for (name, p), (_, p_ref) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(
            p.detach(), p_ref.detach(), rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
        moved = max(moved, (p.detach() - init[name]).abs().max().item())
    assert moved > 1e-3  # the steps really changed the weights


def test_logs_metrics_and_evaluates(tmp_path):
    model = tiny_model()
    data = groups_dataset(4, seed=1)
    args = gft_args(tmp_path, max_steps=2, per_device_eval_batch_size=2)
    trainer = GFTTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    for key in (
        "rectified_fraction",
        "entropy",
        "response_tokens",
        "reward/mean",
        "reward/std",
        "reward/expert/mean",
        "reward/expert/std",
        "advantage/expert/mean",
        "num_responses/expert",
        "num_responses/teacher",
        "frac_reward_zero_std",
        "tokens_per_second",
        "timing/train",
    ):
        assert key in log, key
    assert 0.0 <= log["rectified_fraction"] <= 1.0
    assert log["entropy"] > 0
    assert log["num_responses/self"] <= 2  # the dataset's own 'self' responses only
    assert log["tokens_per_second"] > 0 and log["timing/train"] > 0
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert "eval_entropy" in metrics and "eval_reward/expert/mean" in metrics


def test_self_sampling_adds_policy_samples_to_the_groups(tmp_path):
    model = tiny_model()
    calls = []

    def reward_fn(prompt, response):
        # No tokenizer: token ids in.
        assert isinstance(prompt, list) and isinstance(response, list)
        calls.append((tuple(prompt), tuple(response)))
        return float(len(response) % 3)

    data = groups_dataset(4, seed=2)
    args = gft_args(
        tmp_path,
        max_steps=2,
        num_self_samples=3,
        generation_kwargs={"max_new_tokens": 4, "do_sample": True},
    )
    collator = RecordingCollator(pad_token_id=PAD)
    trainer = GFTTrainer(
        model=model, args=args, data_collator=collator, train_dataset=data, reward_fn=reward_fn
    )
    trainer.train()
    assert model.training  # generation ran in eval mode and the mode came back

    assert len(calls) == 2 * 2 * 3  # steps x prompts per step x samples per prompt
    prompts = {tuple(ex["prompt_ids"]) for ex in data}
    assert all(p in prompts for p, _ in calls)
    assert all(1 <= len(r) <= 4 for _, r in calls)

    for batch in collator.batches:
        groups, sources = batch["group_ids"], batch["sources"]
        for g in groups.unique():
            # 3 self samples per prompt, next to the prompt's own responses ...
            assert int((sources[groups == g] == 2).sum()) >= 3
        # ... and the advantages are those of the hybrid group (GAL over all members).
        expected = group_advantages(batch["rewards"], batch["group_ids"])
        torch.testing.assert_close(batch["advantages"], expected)

    logs = [h for h in trainer.state.log_history if "loss" in h]
    given_self = [sum(r["source"] == "self" for r in ex["responses"]) for ex in data]
    assert all(h["num_responses/self"] >= 6 for h in logs)
    assert sum(h["num_responses/self"] for h in logs) == 12 + sum(given_self)


def test_self_sampling_rewards_reach_the_rows(tmp_path):
    # Deterministic check of add_self_samples: rewards and sources of the appended rows.
    model = tiny_model()
    args = gft_args(
        tmp_path, num_self_samples=2, generation_kwargs={"max_new_tokens": 3, "do_sample": False}
    )
    with pytest.warns(RuntimeWarning, match="identical"):  # greedy: not policy samples
        trainer = GFTTrainer(
            model=model,
            args=args,
            train_dataset=groups_dataset(2),
            reward_fn=lambda p, r: 10.0 + len(r),
        )
    groups = trainer.gft_collator.normalize(groups_dataset(2))
    merged = trainer.add_self_samples(model, groups)
    for before, after in zip(groups, merged):
        extra = after.responses[len(before.responses) :]
        assert len(extra) == 2 and all(r.source == "self" for r in extra)
        assert all(r.reward == 10.0 + len(r.ids) for r in extra)
        # greedy: both samples equal; cut at eos (inclusive) or max_new_tokens
        assert extra[0].ids == extra[1].ids and len(extra[0].ids) <= 3


def test_config_and_trainer_validation(tmp_path):
    with pytest.raises(ValueError, match="loss_agg_mode"):
        gft_args(tmp_path, loss_agg_mode="none")
    with pytest.raises(ValueError, match="tau"):
        gft_args(tmp_path, tau=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        gft_args(tmp_path, temperature=0.0)
    with pytest.raises(ValueError, match="num_self_samples"):
        gft_args(tmp_path, num_self_samples=-1)
    with pytest.raises(ValueError, match="gft_backend"):
        gft_args(tmp_path, gft_backend="cuda")
    with pytest.raises(ValueError, match="gft_head"):
        gft_args(tmp_path, gft_head="tiles")
    with pytest.raises(ValueError, match="gft_chunk_size: applies to gft_head='chunked' only"):
        gft_args(tmp_path, gft_head="blockwise", gft_chunk_size=8)
    assert gft_args(tmp_path).remove_unused_columns is False
    model = tiny_model()
    with pytest.raises(ValueError, match="reward_fn"):
        GFTTrainer(model=model, args=gft_args(tmp_path, num_self_samples=2))
    with pytest.raises(ValueError, match="remove_unused_columns"):
        GFTTrainer(model=model, args=gft_args(tmp_path, remove_unused_columns=True))
    with pytest.raises(ValueError, match="norm_adv_by_std"):
        GFTTrainer(
            model=model,
            args=gft_args(tmp_path),
            data_collator=GFTDataCollator(pad_token_id=0, norm_adv_by_std=False),
        )
    with pytest.raises(TypeError, match="GFTConfig"):
        GFTTrainer(model=model, args=transformers.TrainingArguments(output_dir=str(tmp_path)))


def test_rescaled_logits_are_rejected(tmp_path):
    model = tiny_model()

    class Scaled(LlamaForCausalLM):
        def forward(self, *a, **kw):
            out = super().forward(*a, **kw)
            out.logits = out.logits * 2.0  # e.g. a logit scale the fused head cannot see
            return out

    scaled = Scaled(model.config)
    scaled.load_state_dict(model.state_dict())
    trainer = GFTTrainer(
        model=scaled, args=gft_args(tmp_path, max_steps=1), train_dataset=groups_dataset(2)
    )
    with pytest.raises(ValueError, match="logits differ"):
        trainer.train()


def test_model_from_config_uses_sdpa_on_cpu(tmp_path):
    trainer = GFTTrainer(
        model=tiny_config(), args=gft_args(tmp_path, max_steps=1), train_dataset=groups_dataset(2)
    )
    assert trainer.model.config._attn_implementation == "sdpa"
    trainer.train()


def test_attention_choice(monkeypatch):
    here = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    assert default_attn_implementation(torch.bfloat16) == ("flash_attention_2" if here else "sdpa")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a),
    )
    assert default_attn_implementation(torch.bfloat16) == "flash_attention_2"
    assert default_attn_implementation(torch.float32) == "sdpa"  # flash-attn needs half
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert default_attn_implementation(torch.bfloat16) == "sdpa"


def test_config_from_command_line(tmp_path):
    parser = transformers.HfArgumentParser(GFTConfig)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--tau",
            "0.2",
            "--loss_agg_mode",
            "seq-mean-token-mean",
            "--num_self_samples",
            "3",
            "--max_response_length",
            "16",
            "--generation_kwargs",
            '{"max_new_tokens": 5, "do_sample": true}',
        ]
    )
    assert (args.tau, args.loss_agg_mode, args.num_self_samples) == (0.2, "seq-mean-token-mean", 3)
    assert args.generation_kwargs == {"max_new_tokens": 5, "do_sample": True}
    assert args.max_response_length == 16 and args.remove_unused_columns is False
    (defaults,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    assert defaults.generation_kwargs == {} and defaults.tau == 0.1  # {}: the faithful defaults
    assert defaults.loss_normalization == "step"
    with pytest.raises(ValueError, match="loss_normalization"):
        gft_args(tmp_path, loss_normalization="global")
    with pytest.raises(ValueError, match="generation_kwargs"):
        gft_args(tmp_path, generation_kwargs="{not json")


def test_fallback_hidden_states_match_the_body(tmp_path, monkeypatch):
    # A wrapped model (DDP) runs its own forward: output_hidden_states, and no logits at all.
    model = tiny_model(tie=False, bias=True)
    trainer = GFTTrainer(model=model, args=gft_args(tmp_path), train_dataset=groups_dataset(2))
    batch = GFTDataCollator(pad_token_id=PAD)(groups_dataset(3))
    ids, am = batch["input_ids"], batch["attention_mask"]
    direct = trainer.final_hidden_states(model, ids, am)
    logits_shapes = []
    model.register_forward_hook(lambda mod, args, out: logits_shapes.append(out.logits.shape))
    monkeypatch.setattr(GFTTrainer, "_body", staticmethod(lambda unwrapped: None))
    fallback = trainer.final_hidden_states(model, ids, am)
    torch.testing.assert_close(fallback, direct, rtol=0, atol=0)
    assert logits_shapes == [torch.Size([ids.shape[0], 0, VOCAB])]  # the head computed nothing
    trainer.train()  # and training runs on the fallback path
    assert all("loss" in h for h in trainer.state.log_history[:3])


def test_mixed_precision_runs_the_head_in_bf16(tmp_path, monkeypatch):
    seen = []
    real = loss_module.fused_linear_gft_loss

    def spy(hidden, weight, *a, **kw):
        seen.append((hidden.dtype, weight.dtype))
        return real(hidden, weight, *a, **kw)

    monkeypatch.setattr(loss_module, "fused_linear_gft_loss", spy)
    losses = {}
    for bf16 in (False, True):
        trainer = GFTTrainer(
            model=tiny_model(),
            args=gft_args(tmp_path, bf16=bf16, max_steps=2),
            train_dataset=groups_dataset(4),
        )
        trainer.train()
        losses[bf16] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert trainer.model.get_output_embeddings().weight.dtype == torch.float32
    assert seen[0] == (torch.float32, torch.float32)
    assert seen[-1] == (torch.bfloat16, torch.bfloat16)  # as autocast would run lm_head
    for a, b in zip(losses[False], losses[True]):
        assert b == pytest.approx(a, rel=5e-2, abs=1e-2)


# -- step-level normalisation ------------------------------------------------------------


def one_step_update(tmp_path, per_device: int, accumulation: int, **overrides):
    """The weight update of one SGD step over the same 4 prompt groups."""
    model = tiny_model(tie=False, bias=True)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = gft_args(
        tmp_path,
        max_steps=1,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        **overrides,
    )
    trainer = GFTTrainer(model=model, args=args, train_dataset=groups_dataset(4, seed=6))
    trainer.train()
    logged = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return {k: v.detach() - init[k] for k, v in model.named_parameters()}, logged


def max_relative_difference(a, b):
    """max |a - b| / max |b| over all parameters (b: the reference update)."""
    diff = max((a[k] - b[k]).abs().max().item() for k in b)
    return diff / max(v.abs().max().item() for v in b.values())


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_update_is_invariant_to_gradient_accumulation(tmp_path, mode):
    # Batch size 4 x GA 1, 2 x 2 and 1 x 4: the same 4 groups in one optimizer step.
    reference, logged = one_step_update(tmp_path, 4, 1, loss_agg_mode=mode)
    assert max(v.abs().max().item() for v in reference.values()) > 1e-3  # a real update
    for per_device, accumulation in ((2, 2), (1, 4)):
        update, logged_split = one_step_update(
            tmp_path, per_device, accumulation, loss_agg_mode=mode
        )
        assert max_relative_difference(update, reference) < 1e-4, (per_device, accumulation)
        assert logged_split == pytest.approx(logged, rel=1e-5)  # the step's loss is logged
    # The per-micro-batch mean of the published code differs (so the check above can fail):
    # its micro-batches hold unequal numbers of tokens and responses.
    update, _ = one_step_update(
        tmp_path, 1, 4, loss_agg_mode=mode, loss_normalization="micro_batch"
    )
    assert max_relative_difference(update, reference) > 1e-3
