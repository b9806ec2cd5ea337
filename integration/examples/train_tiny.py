"""Train a tiny Llama-style model on small additions with GFT and with SFT, side by side.

Runs on CPU in well under two minutes per variant, with nothing downloaded: the model is
built from a ``LlamaConfig`` and the tokenizer is a character-level one over digits and
``+``/``=``. Task: ``"3+4="`` -> ``"7"``; the reward is rule based (1 for the right sum, 0
otherwise). Every prompt comes with an expert answer (always right) and a teacher answer
(right half of the time), and GFT adds ``--num-self-samples`` samples of the policy
itself to each group; SFT trains on the expert answers only. Both start from the same
short SFT warm start (GFT is a post-training objective) and are then scored on held-out
prompts with greedy decoding.

    python integration/examples/train_tiny.py              # GFT and SFT, side by side
    python integration/examples/train_tiny.py --loss gft --steps 300
    python integration/examples/train_tiny.py --quick      # a few steps (smoke test)

Attention: SDPA (``default_attn_implementation``; flash-attention 2 needs CUDA and half
precision).
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging

from gft_kernels.integration import (
    GFTConfig,
    GFTDataCollator,
    GFTTrainer,
    default_attn_implementation,
)

# -- tokenizer --------------------------------------------------------------------------


class CharTokenizer:
    """Character-level tokenizer: ``<pad> <bos> <eos>`` then ``0-9 + =``."""

    SPECIALS = ("<pad>", "<bos>", "<eos>")
    CHARS = "0123456789+="

    def __init__(self) -> None:
        self.itos = list(self.SPECIALS) + list(self.CHARS)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        ids = [self.stoi[c] for c in text]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            tok = self.itos[int(i)]
            if tok in self.SPECIALS:
                if skip_special_tokens:
                    continue
            out.append(tok)
        return "".join(out)


# -- task -------------------------------------------------------------------------------


def answer(prompt: str) -> int:
    a, b = prompt.rstrip("=").split("+")
    return int(a) + int(b)


def reward_fn(prompt: str, response: str) -> float:
    """1 for exactly the right sum, else 0."""
    return 1.0 if response.strip() == str(answer(prompt)) else 0.0


def make_prompts(seed: int, n_heldout: int) -> Tuple[List[str], List[str]]:
    prompts = [f"{a}+{b}=" for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(prompts)
    return prompts[n_heldout:], prompts[:n_heldout]


def gft_examples(prompts: Sequence[str], seed: int) -> List[Dict[str, Any]]:
    """One group per prompt: the expert answer and a teacher answer that is right half the
    time (else off by 1 or 2), each with its rule-based reward."""
    rng = random.Random(seed + 1)
    examples = []
    for p in prompts:
        right = answer(p)
        teacher = right if rng.random() < 0.5 else max(0, right + rng.choice((-2, -1, 1, 2)))
        examples.append(
            {
                "prompt": p,
                "responses": [
                    {"text": str(right), "reward": reward_fn(p, str(right)), "source": "expert"},
                    {
                        "text": str(teacher),
                        "reward": reward_fn(p, str(teacher)),
                        "source": "teacher",
                    },
                ],
            }
        )
    return examples


class ListDataset(Dataset):
    def __init__(self, items: Sequence[Any]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


class SFTCollator:
    """Expert answers only, causal-LM labels (-100 on the prompt and the padding)."""

    def __init__(self, tokenizer: CharTokenizer) -> None:
        self.tok = tokenizer

    def __call__(self, examples: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        rows = []
        for ex in examples:
            prompt = self.tok.encode(ex["prompt"])
            expert = next(r for r in ex["responses"] if r["source"] == "expert")
            response = self.tok.encode(expert["text"], add_special_tokens=False)
            rows.append((prompt, response + [self.tok.eos_token_id]))
        width = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), width), self.tok.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, r) in enumerate(rows):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
            mask[i, : len(p) + len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# -- model ------------------------------------------------------------------------------


def random_model(
    config: PretrainedConfig, seed: int, attn_implementation: Optional[str] = None
) -> PreTrainedModel:
    """The causal LM of ``config`` (any architecture) with random weights drawn from
    ``seed``, nothing downloaded; its ``generate()`` pads and stops with the config's pad
    and eos tokens. The tests build their tiny models with it too."""
    set_seed(seed)
    # SDPA on CPU; flash-attention 2 only where it can run (CUDA, half precision).
    model = AutoModelForCausalLM.from_config(
        config,
        attn_implementation=attn_implementation or default_attn_implementation(torch.float32),
    )
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model


def build_model(tokenizer: CharTokenizer, seed: int) -> LlamaForCausalLM:
    """The example's tiny Llama over the tokenizer's vocabulary."""
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return random_model(config, seed)


# -- evaluation -------------------------------------------------------------------------


SAMPLES_PER_PROMPT = 16


@torch.no_grad()
def evaluate(
    model: LlamaForCausalLM, tokenizer: CharTokenizer, prompts: Sequence[str]
) -> Dict[str, float]:
    """On ``prompts``: the mean reward of greedy answers, the mean reward of
    ``SAMPLES_PER_PROMPT`` samples per prompt at temperature 1 (the policy's expected reward,
    what GFT's self samples estimate) and the mean next-token entropy over the expert answer
    tokens (teacher forcing)."""
    model.eval()
    device = next(model.parameters()).device
    encoded = [tokenizer.encode(p) for p in prompts]
    width = max(map(len, encoded))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):  # left padding for generation
        ids[i, width - len(e) :] = torch.tensor(e)
        mask[i, width - len(e) :] = 1
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    def rewards_of(out: torch.Tensor, row_prompts: Sequence[str]) -> List[float]:
        rewards = []
        for p, row in zip(row_prompts, out[:, width:].tolist()):
            eos = tokenizer.eos_token_id
            cut = row.index(eos) if eos in row else len(row)
            rewards.append(reward_fn(p, tokenizer.decode(row[:cut])))
        return rewards

    greedy = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=3,
        do_sample=False,
        **special,
    )
    rewards = rewards_of(greedy, prompts)
    # Samples as the policy draws them (temperature 1, no top-k/top-p), with a fixed seed so
    # that every model is scored on the same random draws; the global RNG is left as it was.
    k = SAMPLES_PER_PROMPT
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        sampled = model.generate(
            input_ids=ids.repeat_interleave(k, 0).to(device),
            attention_mask=mask.repeat_interleave(k, 0).to(device),
            max_new_tokens=3,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            **special,
        )
    sampled_rewards = rewards_of(sampled, [p for p in prompts for _ in range(k)])

    batch = SFTCollator(tokenizer)(
        [
            {"prompt": p, "responses": [{"text": str(answer(p)), "source": "expert"}]}
            for p in prompts
        ]
    )
    logits = (
        model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        )
        .logits[:, :-1]
        .float()
    )
    valid = (batch["labels"][:, 1:] != -100).to(device)
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return {
        "reward": sum(rewards) / len(rewards),
        "expected_reward": sum(sampled_rewards) / len(sampled_rewards),
        "entropy": (entropy * valid).sum().item() / valid.sum().item(),
    }


class PrintMetrics(TrainerCallback):
    """Prints a compact line per log."""

    KEYS = (
        "loss",
        "rectified_fraction",
        "entropy",
        "reward/self/mean",
        "advantage/teacher/mean",
        "num_responses/self",
    )

    def __init__(self, name: str) -> None:
        self.name = name

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        parts = [f"{k}={logs[k]:.4g}" for k in self.KEYS if k in logs]
        print(f"  [{self.name}] step {state.global_step:>4}: " + " ".join(parts), flush=True)


# -- training ---------------------------------------------------------------------------


def _trainer(
    kind: str,
    model: LlamaForCausalLM,
    cli: argparse.Namespace,
    steps: int,
    lr: float,
    tokenizer: CharTokenizer,
    dataset: Dataset,
    verbose: bool,
) -> Trainer:
    common = dict(
        output_dir=cli.output_dir,  # nothing is saved (save_strategy="no")
        max_steps=steps,
        per_device_train_batch_size=cli.batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=max(1, steps // 8),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=cli.seed,
        data_seed=cli.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    callbacks = [PrintMetrics(kind)] if verbose else []
    if kind == "gft":
        args = GFTConfig(
            **common,
            tau=cli.tau,
            loss_agg_mode="token-mean",
            num_self_samples=cli.num_self_samples,
            max_response_length=4,
            generation_kwargs={"max_new_tokens": 3, "do_sample": True},
            gft_backend=cli.backend,
        )
        collator = GFTDataCollator(
            tokenizer,
            norm_adv_by_std=args.norm_adv_by_std,
            max_response_length=args.max_response_length,
        )
        trainer: Trainer = GFTTrainer(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=dataset,
            reward_fn=reward_fn if cli.num_self_samples > 0 else None,
            callbacks=callbacks,
        )
    else:
        args = TrainingArguments(**common, remove_unused_columns=False)
        trainer = Trainer(
            model=model,
            args=args,
            data_collator=SFTCollator(tokenizer),
            train_dataset=dataset,
            callbacks=callbacks,
        )
    trainer.remove_callback(PrinterCallback)  # PrintMetrics prints a compact line instead
    return trainer


def warm_start(
    cli: argparse.Namespace, tokenizer: CharTokenizer, dataset: Dataset
) -> Optional[Dict[str, torch.Tensor]]:
    """A short SFT phase shared by both variants: GFT is a post-training objective (its
    DCR bounds the weight of tokens the model finds unlikely, so from random weights it
    mostly pushes its own wrong samples down), so, as in practice, it starts from a model
    that already knows the format rather than from random weights."""
    if cli.warm_start_steps == 0:
        return None
    model = build_model(tokenizer, cli.seed)
    _trainer(
        "sft", model, cli, cli.warm_start_steps, cli.warm_start_lr, tokenizer, dataset, False
    ).train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def scores(
    model: LlamaForCausalLM,
    tokenizer: CharTokenizer,
    train_prompts: Sequence[str],
    heldout: Sequence[str],
    loss: float,
    seconds: float,
) -> Dict[str, float]:
    heldout_eval = evaluate(model, tokenizer, heldout)
    train_eval = evaluate(model, tokenizer, train_prompts)
    return {
        "final train loss": loss,
        "held-out reward (greedy)": heldout_eval["reward"],
        "train-prompt reward (greedy)": train_eval["reward"],
        "held-out reward (samples)": heldout_eval["expected_reward"],
        "train-prompt reward (samples)": train_eval["expected_reward"],
        "held-out entropy (expert tokens)": heldout_eval["entropy"],
        "train time (s)": seconds,
    }


def train(
    kind: str,
    cli: argparse.Namespace,
    tokenizer: CharTokenizer,
    dataset: Dataset,
    init_state: Optional[Dict[str, torch.Tensor]],
    train_prompts: Sequence[str],
    heldout: Sequence[str],
) -> Dict[str, float]:
    model = build_model(tokenizer, cli.seed)
    if init_state is not None:
        model.load_state_dict(init_state)
    trainer = _trainer(kind, model, cli, cli.steps, cli.lr, tokenizer, dataset, True)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return scores(
        model, tokenizer, train_prompts, heldout, losses[-1] if losses else math.nan, seconds
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", choices=("both", "gft", "sft"), default="both")
    parser.add_argument("--steps", type=int, default=300, help="steps per variant")
    parser.add_argument(
        "--warm-start-steps",
        type=int,
        default=200,
        help="shared SFT steps before either variant (0: from scratch)",
    )
    parser.add_argument("--warm-start-lr", type=float, default=3e-3)
    parser.add_argument("--quick", action="store_true", help="a few steps (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of both variants")
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--num-self-samples", type=int, default=4)
    parser.add_argument("--heldout", type=int, default=20, help="held-out prompts of 100")
    parser.add_argument("--backend", default="auto", choices=("auto", "cpu", "torch", "triton"))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (tiny matrices: one thread avoids OpenMP "
        "overhead and oversubscription on a busy machine)",
    )
    cli = parser.parse_args(argv)
    if cli.quick:
        cli.steps, cli.warm_start_steps, cli.batch_size, cli.num_self_samples = 3, 2, 4, 2
    if cli.steps <= 0 or cli.warm_start_steps < 0 or cli.threads <= 0:
        parser.error("--steps/--threads: expected positive ints; --warm-start-steps: >= 0")
    if not 0 < cli.heldout < 100:
        parser.error("--heldout: expected an int in [1, 99]")
    return cli


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    cli = parse_args(argv)
    torch.set_num_threads(cli.threads)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    tokenizer = CharTokenizer()
    train_prompts, heldout = make_prompts(cli.seed, cli.heldout)
    dataset = ListDataset(gft_examples(train_prompts, cli.seed))
    kinds = ("gft", "sft") if cli.loss == "both" else (cli.loss,)
    print(
        f"tiny Llama ({default_attn_implementation(torch.float32)} attention), "
        f"{len(train_prompts)} training prompts, {len(heldout)} held out; "
        f"{cli.warm_start_steps} shared SFT warm-start steps, then {cli.steps} steps x "
        f"{cli.batch_size} prompts per variant; seed {cli.seed}",
        flush=True,
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="gft_tiny_") as out_dir:
        cli.output_dir = out_dir
        start = time.perf_counter()
        init_state = warm_start(cli, tokenizer, dataset)
        if init_state is not None:
            model = build_model(tokenizer, cli.seed)
            model.load_state_dict(init_state)
            results["start"] = scores(
                model, tokenizer, train_prompts, heldout, math.nan, time.perf_counter() - start
            )
        for kind in kinds:
            print(
                f"training {kind.upper()}"
                + (
                    f" (expert + teacher + {cli.num_self_samples} self samples per prompt)"
                    if kind == "gft"
                    else " (expert answers, causal-LM loss)"
                ),
                flush=True,
            )
            results[kind] = train(kind, cli, tokenizer, dataset, init_state, train_prompts, heldout)

    columns = list(results)
    print("\n" + f"{'':34}" + "".join(f"{k.upper():>10}" for k in columns))
    for name in results[kinds[0]]:
        cells = (results[k][name] for k in columns)
        print(f"{name:34}" + "".join(f"{'-' if math.isnan(v) else f'{v:.4f}':>10}" for v in cells))
    print(
        "START: the shared warm-start model both variants begin from. GFT and SFT minimise "
        "different objectives: compare the rewards and the entropy."
    )
    return results


if __name__ == "__main__":
    main()
