"""TRL options GFT does not implement are refused, never silently ignored."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from trl import GRPOConfig

from gft_kernels.integration.trl import GRPO_ONLY_OPTIONS, GFTGRPOConfig

# A value away from TRL's default for each option.
OTHER_VALUES = {
    "loss_type": "grpo",
    "epsilon": 0.3,
    "epsilon_high": 0.28,
    "delta": 2.0,
    "importance_sampling_level": "sequence",
    "top_entropy_quantile": 0.2,
    "entropy_coef": 0.01,
    "use_adaptive_entropy": True,
    "off_policy_mask_threshold": 0.5,
    "vllm_importance_sampling_correction": False,
}


def config(tmp_path, **overrides):
    return GFTGRPOConfig(
        output_dir=str(tmp_path),
        num_generations=2,
        per_device_train_batch_size=2,
        use_cpu=True,
        bf16=False,
        **overrides,
    )


def gft_trainer(tmp_path, *, model=None, reward_funcs=None, data=None, **overrides):
    """A GFTGRPOTrainer on the TRL tests' tiny model, tokenizer and dataset (or ``data``),
    with their config plus ``overrides``."""
    from gft_kernels.integration.trl import GFTGRPOTrainer
    from tests.test_integration_trl import chat_tokenizer, dataset, right_answer, tiny_model
    from tests.test_integration_trl import config as trl_config

    return GFTGRPOTrainer(
        model=tiny_model() if model is None else model,
        reward_funcs=reward_funcs or [right_answer],
        args=trl_config(tmp_path, **overrides),
        train_dataset=dataset() if data is None else data,
        processing_class=chat_tokenizer(),
    )


def test_every_listed_option_exists_in_this_trl():
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert set(GRPO_ONLY_OPTIONS) <= names
    assert set(OTHER_VALUES) == set(GRPO_ONLY_OPTIONS)


@pytest.mark.parametrize("name", GRPO_ONLY_OPTIONS)
def test_an_option_away_from_its_default_is_refused(tmp_path, name):
    default = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}[name]
    assert OTHER_VALUES[name] != default
    with pytest.raises(ValueError, match=f"^{name}: an option of GRPO's clipped objective"):
        config(tmp_path, **{name: OTHER_VALUES[name]})


def test_defaults_are_accepted(tmp_path):
    cfg = config(tmp_path)
    assert cfg.loss_type == GRPOConfig.loss_type


def test_remove_unused_columns_would_drop_the_demonstrations(tmp_path):
    with pytest.raises(ValueError, match="remove_unused_columns: expected False"):
        config(tmp_path, remove_unused_columns=True)
    assert config(tmp_path, remove_unused_columns=True, demonstration_columns=[])


def test_a_misspelled_or_missing_demonstration_column_is_refused(tmp_path):
    """A column the data lacks would leave every group with policy samples only: plain
    GRPO, silently. Checked on the dataset when the trainer is built, and on every batch."""
    import datasets

    data = datasets.Dataset.from_list([{"prompt": "1+1=", "expert": "2", "teachr": "3"}])
    with pytest.raises(ValueError, match=r"demonstration_columns: \['teacher'\] not in"):
        gft_trainer(tmp_path, data=data)
    trainer = gft_trainer(tmp_path, data=data, demonstration_columns=["expert"])
    with pytest.raises(ValueError, match=r"demonstration_columns: \['expert'\] not in inputs"):
        trainer._assign_demonstrations([{"prompt": "1+1="}])


def test_reward_functions_get_each_rows_source(tmp_path):
    from tests.test_integration_trl import dataset

    seen = []

    def record(completions, gft_source, **columns):
        seen.extend(zip(completions, gft_source))
        return [0.0] * len(completions)

    data = dataset()
    trainer = gft_trainer(tmp_path, reward_funcs=[record], data=data)
    trainer.train()
    sources = [source for _, source in seen]
    groups = len(seen) // trainer.args.num_generations  # one expert, one teacher in each
    assert groups >= 1 and sources.count("expert") == sources.count("teacher") == groups
    assert sources.count("self") == len(seen) - 2 * groups > 0
    for completion, source in seen:
        if source != "self":
            assert completion.strip() in {row[source] for row in data}, (completion, source)


def test_token_id_demonstrations_end_with_eos_as_text_ones_do(tmp_path):
    trainer = gft_trainer(tmp_path)
    eos = trainer.eos_token_ids[0]
    text = trainer._demonstration_ids("x", "7")
    (seven,) = trainer._tokenizer.encode("7", add_special_tokens=False)
    assert text == [[seven, eos]]
    assert trainer._demonstration_ids("x", [seven]) == text
    assert trainer._demonstration_ids("x", [seven, eos]) == text


@pytest.mark.parametrize("cast", [False, True])
def test_cast_lm_head_to_fp32_runs_the_fused_head_in_fp32(tmp_path, monkeypatch, cast):
    """A bf16 policy: with ``cast_lm_head_to_fp32`` the fused head gets fp32 hidden states and
    weight (TRL's own head runs in fp32 then), without it the model's bf16."""
    from gft_kernels.integration import loss as integration_loss
    from tests.test_integration_trl import tiny_model

    seen = []
    real = integration_loss.fused_linear_gft_loss

    def spy(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return real(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(integration_loss, "fused_linear_gft_loss", spy)
    trainer = gft_trainer(
        tmp_path, model=tiny_model().to(torch.bfloat16), cast_lm_head_to_fp32=cast
    )
    trainer.train()
    expected = torch.float32 if cast else torch.bfloat16
    assert seen and all(pair == (expected, expected) for pair in seen), seen


def test_the_head_is_checked_against_the_models_logits(tmp_path):
    """A config that declares a logit scale the model's forward does not apply: the fused
    head would train other logits than the model's, so the first step refuses."""
    from tests.test_integration_trl import tiny_model

    model = tiny_model()
    model.config.logit_scale = 2.0  # read as Cohere's multiplier; this model ignores it
    trainer = gft_trainer(tmp_path, model=model)
    with pytest.raises(ValueError, match="model: its logits differ from the fused head's"):
        trainer.train()


@pytest.mark.parametrize("more", [{"num_iterations": 2}, {"steps_per_generation": 2}])
def test_no_old_log_prob_forward(tmp_path, monkeypatch, more):
    """TRL runs a no-grad forward for the old policy's log-probs when the batch is reused
    (num_iterations > 1) or generation runs ahead of the optimizer; GFT never reads them."""
    from trl import GRPOTrainer

    calls = []
    real = GRPOTrainer._get_per_token_logps_and_entropies

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", counted)
    trainer = gft_trainer(tmp_path, max_steps=2, **more)
    trainer.train()
    assert calls == []


def test_lengths_are_logged_per_source(tmp_path):

    trainer = gft_trainer(tmp_path)
    trainer.train()
    (logged,) = [h for h in trainer.state.log_history if "completions/self/mean_length" in h]
    # The demonstrations are one digit and the eos each (dataset()).
    expert, teacher = logged["completions/expert/mean_length"], logged["num_tokens/teacher"]
    assert expert == teacher == 2
    assert logged["num_tokens/expert"] == 2
    assert 0 < logged["completions/self/mean_length"] <= trainer.args.max_completion_length


def test_a_rank_with_only_demonstrations_still_generates(tmp_path, monkeypatch):
    """Generation is collective under FSDP/ZeRO-3: a process whose rows all take
    demonstrations must still call it (one row, whose sample is discarded)."""
    from trl import GRPOTrainer

    trainer = gft_trainer(tmp_path)
    calls = []

    def fake_generate(self, prompt_ids, *args, **kwargs):
        calls.append(len(prompt_ids))
        return [[5] for _ in prompt_ids], None

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", fake_generate)
    trainer._pending_demos = [[7, 8], [9, 8]]
    completions, logprobs = trainer._generate_single_turn([[1, 2], [1, 2]], None, {}, 2)
    assert calls == [1]
    assert completions == [[7, 8], [9, 8]] and logprobs is None
    trainer._pending_demos = [[7, 8], None]
    completions, _ = trainer._generate_single_turn([[1, 2], [1, 3]], None, {}, 2)
    assert calls == [1, 1] and completions == [[7, 8], [5]]


def test_demonstrations_can_take_a_fixed_reward(tmp_path):
    def nothing_is_right(completions, **columns):
        return [0.0] * len(completions)

    trainer = gft_trainer(tmp_path, reward_funcs=[nothing_is_right], demonstration_reward=1.0)
    trainer.train()
    (logged,) = [h for h in trainer.state.log_history if "reward/expert/mean" in h]
    assert logged["reward/expert/mean"] == logged["reward/teacher/mean"] == 1.0
    assert logged["reward/self/mean"] == 0.0
    with pytest.raises(ValueError, match="demonstration_reward: expected None or a finite"):
        config(tmp_path, demonstration_reward=float("nan"))


@pytest.mark.slow
def test_torch_compile_compiles_the_decoder_of_the_loss_pass(tmp_path):
    """With ``torch_compile`` the loss pass runs the compiled model: its decoder is reached
    while dynamo traces (not called eagerly beside the compiled wrapper), and the run
    trains what the eager run trains."""
    losses = {}
    for compiled in (False, True):
        # check_head=False: its own full forward would be traced whatever the loss pass does.
        trainer = gft_trainer(tmp_path / str(compiled), torch_compile=compiled, check_head=False)
        tracing = []
        decoder = trainer.model.get_decoder()
        real = type(trainer)._compute_loss

        def in_loss(self, model, inputs, real=real, decoder=decoder, tracing=tracing):
            hook = decoder.register_forward_pre_hook(
                lambda module, args: tracing.append(torch.compiler.is_compiling())
            )
            try:
                return real(self, model, inputs)
            finally:
                hook.remove()

        trainer._compute_loss = in_loss.__get__(trainer)
        trainer.train()
        losses[compiled] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert tracing and any(tracing) == compiled, tracing
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-6)
