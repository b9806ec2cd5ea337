"""GFTGRPOTrainer against the installed TRL: demonstrations in the groups, the loss, GA."""

import copy

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from gft_kernels.integration.trl import GFTGRPOConfig, GFTGRPOTrainer  # noqa: E402
from tests.test_integration_sampling import chat_tokenizer  # noqa: E402
from tests.test_integration_trainer import EOS, TRAINING, tiny_model  # noqa: E402

PROMPTS = ["3 + 4 =", "1 + 1 =", "2 + 5 =", "4 + 4 ="]
# The training of every test here: one SGD step (lr 0.1) of batch 4, in fp32 (GRPOConfig's
# default is bf16 mixed precision; fp32 for exact checks).
ONE_SGD_STEP = dict(
    TRAINING,
    per_device_train_batch_size=4,
    max_steps=1,
    learning_rate=0.1,
    optim="sgd",
    lr_scheduler_type="constant",
    bf16=False,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dataset(n: int = 2):
    rows = []
    for prompt in PROMPTS[:n]:
        a, b = int(prompt[0]), int(prompt[4])
        rows.append({"prompt": prompt, "expert": str(a + b), "teacher": str(a + b + 1)})
    return datasets.Dataset.from_list(rows)


def right_answer(prompts, completions, **kwargs):
    return [float(c.strip() == str(int(p[0]) + int(p[4]))) for p, c in zip(prompts, completions)]


def length_penalty(completions, **kwargs):
    return [-0.1 * len(c.split()) for c in completions]


def config(tmp_path, **overrides):
    """:data:`ONE_SGD_STEP` with groups of 4 completions of at most 3 tokens, tau 0.3 on the
    ``torch`` backend, then ``overrides``."""
    return GFTGRPOConfig(
        **{
            **ONE_SGD_STEP,
            "output_dir": str(tmp_path),
            "num_generations": 4,
            "max_completion_length": 3,
            "gft_backend": "torch",
            "tau": 0.3,
            **overrides,
        }
    )


class Recording(GFTGRPOTrainer):
    """Keeps every micro-batch the loss saw, with the loss."""

    def _compute_loss(self, model, inputs):
        value = super()._compute_loss(model, inputs)
        self.seen.append(
            (
                {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()},
                value.detach().clone(),
            )
        )
        return value


def trainer_for(tmp_path, model, data, **overrides):
    trainer = Recording(
        model=model,
        reward_funcs=[right_answer, length_penalty],
        args=config(tmp_path, **overrides),
        train_dataset=data,
        processing_class=chat_tokenizer(),
    )
    trainer.seen = []
    return trainer


def independent_loss(model, inputs, tau, temperature):
    """-A c log p on the model's full logits, token mean over the micro-batch."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    n_prompt = inputs["prompt_ids"].shape[1]
    z = logits[:, n_prompt - 1 : -1]
    targets = inputs["completion_ids"]
    logp = torch.log_softmax(z / temperature, -1).gather(-1, targets[..., None])[..., 0]
    q = torch.softmax(z, -1).gather(-1, targets[..., None])[..., 0]
    c = torch.where(q <= tau, q, torch.ones_like(q))
    m = inputs["completion_mask"].double()
    per_token = -inputs["advantages"].double()[:, None] * c * logp
    return (per_token * m).sum() / m.sum()


BLOCKWISE = {"gft_head": "blockwise", "gft_backend": "triton"}


@pytest.mark.parametrize("head", [{}, BLOCKWISE], ids=["chunked", "blockwise"])
def test_demonstrations_are_in_the_groups_and_the_loss_is_gft(tmp_path, head):
    model = tiny_model()
    before = copy.deepcopy(model)
    tok = chat_tokenizer()
    trainer = trainer_for(tmp_path, model, dataset(1), temperature=0.8, **head)
    trainer.train()
    ((inputs, value),) = trainer.seen
    sources = [trainer.sources[int(c)] for c in inputs["gft_sources"]]
    assert sorted(sources) == ["expert", "self", "self", "teacher"]  # one group of 4
    for source, ids, m in zip(sources, inputs["completion_ids"], inputs["completion_mask"]):
        completion = ids[m.bool()].tolist()
        if source == "expert":
            assert completion == [tok.convert_tokens_to_ids("7"), EOS]
        elif source == "teacher":
            assert completion == [tok.convert_tokens_to_ids("8"), EOS]
    # The reward functions scored the demonstrations: the expert's answer is right.
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert log["reward/expert/mean"] == pytest.approx(1.0 - 0.1 * 1)
    assert log["reward/teacher/mean"] == pytest.approx(0.0 - 0.1 * 1)
    assert "reward/self/mean" in log and 0 <= log["rectified_fraction"] <= 1
    # The loss of the step is the GFT loss on the model's own logits (before the update).
    expected = independent_loss(before, inputs, tau=0.3, temperature=0.8)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert inputs["advantages"].abs().sum() > 0


def one_step_update(tmp_path, per_device, accumulation, mode, **options):
    model = tiny_model(tie=False, bias=True)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = trainer_for(
        tmp_path,
        model,
        dataset(2),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        num_generations=4,
        loss_agg_mode=mode,
        **options,
    )
    torch.manual_seed(0)
    trainer.train()
    assert len(trainer.seen) == accumulation
    return {k: v.detach() - init[k] for k, v in model.named_parameters()}


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_update_is_invariant_to_gradient_accumulation(tmp_path, mode):
    # 2 prompts x 4 completions = 8 rows per step, as 8 x 1, 4 x 2 and 2 x 4.
    reference = one_step_update(tmp_path, 8, 1, mode)
    scale = max(v.abs().max().item() for v in reference.values())
    assert scale > 1e-3
    for per_device, accumulation in ((4, 2), (2, 4)):
        update = one_step_update(tmp_path, per_device, accumulation, mode)
        diff = max((update[k] - reference[k]).abs().max().item() for k in reference)
        assert diff / scale < 1e-4, (per_device, accumulation)


def test_blockwise_head_gives_the_chunked_update(tmp_path):
    """One optimizer step over 2 accumulated micro-batches: the blockwise head's update is
    the chunked head's."""
    reference = one_step_update(tmp_path, 4, 2, "token-mean")
    update = one_step_update(tmp_path, 4, 2, "token-mean", **BLOCKWISE)
    scale = max(v.abs().max().item() for v in reference.values())
    assert scale > 1e-3
    diff = max((update[k] - reference[k]).abs().max().item() for k in reference)
    assert diff / scale < 1e-4


def test_config_checks(tmp_path):
    with pytest.raises(ValueError, match="loss_agg_mode"):
        config(tmp_path, loss_agg_mode="none")
    with pytest.raises(ValueError, match="beta"):
        config(tmp_path, beta=0.1)
    with pytest.raises(ValueError, match="tau"):
        config(tmp_path, tau=-1.0)
    # Three demonstrations (a list in one column) cannot share a group of two.
    data = datasets.Dataset.from_list(
        [{"prompt": PROMPTS[0], "expert": ["7", "7 7"], "teacher": "8"}]
    )
    trainer = trainer_for(
        tmp_path, tiny_model(), data, num_generations=2, per_device_train_batch_size=2
    )
    with pytest.raises(ValueError, match="num_generations"):
        trainer.train()


# -- SFT recipe: GFT with A = 1 (tau = 0: SFT; tau = 1: DFT) --------------------------------


@pytest.mark.parametrize("loss_type, tau", [("nll", 0.0), ("dft", 1.0)])
def test_gft_with_unit_advantages_is_trl_sft(tmp_path, loss_type, tau):
    from trl import SFTConfig, SFTTrainer

    from gft_kernels.integration import GFTConfig, GFTTrainer

    tok = chat_tokenizer()
    pairs = [("3 + 4 =", "7"), ("1 + 1 =", "2"), ("2 + 5 = 7 ;", "yes"), ("4 + 4 =", "8 8")]
    updates, losses = {}, {}
    for kind in ("sft", "gft"):
        model = tiny_model(tie=False, bias=False)
        init = {k: v.detach().clone() for k, v in model.named_parameters()}
        if kind == "sft":
            data = datasets.Dataset.from_list(
                [{"prompt": p, "completion": " " + c} for p, c in pairs]
            )
            trainer = SFTTrainer(
                model=model,
                train_dataset=data,
                processing_class=tok,
                args=SFTConfig(
                    output_dir=str(tmp_path / kind), loss_type=loss_type, **ONE_SGD_STEP
                ),
            )
            rows = trainer.train_dataset
            sft_tokens = [row["input_ids"] for row in rows]
        else:
            # One response per group, reward 1: its advantage is 1 (a group of one keeps its
            # raw reward), so the GFT loss is -c * log p, token-mean over the step.
            data = [
                {"prompt": p, "responses": [{"text": c, "reward": 1.0, "source": "expert"}]}
                for p, c in pairs
            ]
            trainer = GFTTrainer(
                model=model,
                train_dataset=data,
                processing_class=tok,
                args=GFTConfig(
                    output_dir=str(tmp_path / kind), tau=tau, gft_backend="torch", **ONE_SGD_STEP
                ),
            )
            gft_tokens = [
                list(g.prompt_ids) + list(g.responses[0].ids)
                for g in trainer.gft_collator.normalize(data)
            ]
        trainer.train()
        losses[kind] = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
        updates[kind] = {k: v.detach() - init[k] for k, v in model.named_parameters()}
    assert sorted(map(list, sft_tokens)) == sorted(gft_tokens)  # the same token sequences
    assert losses["gft"] == pytest.approx(losses["sft"], rel=1e-5)
    scale = max(v.abs().max().item() for v in updates["sft"].values())
    diff = max((updates["gft"][k] - updates["sft"][k]).abs().max().item() for k in updates["sft"])
    assert scale > 1e-3 and diff / scale < 1e-4
