"""The fused GFT engine inside verl's real actor update (FSDP2 on gloo, CPU, no Ray).

Each run spawns the ranks of ``verl_workers.actor_update``: verl's own engine machinery
(``EngineRegistry``, FSDP2, micro-batching, ``ppo_loss`` handed in as by verl's actor
worker) trains one mini-batch of 4 responses of a tiny Qwen2, with the fused engine
selected the way users select it (``external_lib=gft_kernels.integration.verl.use_fused_engine``).

The reference is computed here in fp64 from the same checkpoint: each sequence through the
plain Hugging Face model, the published per-token GFT terms on its response logits
(``q`` at temperature 1, ``log p`` at the rollout temperature), aggregated over the whole
mini-batch by verl's own ``agg_loss``. The engine's summed micro-batch losses and its
gradients (after FSDP's reduction, before the optimizer step) must equal it, for one and
two data-parallel ranks, tied and untied heads, packed and padded inputs.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

from gft_kernels.reference import gft_token_terms_reference
from tests import verl_cpu, verl_workers

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15, 16]]
RESPONSE_LENGTHS = [4, 2, 5, 3]
ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.7])
TAU = 0.3


def sample_responses(model_path: str, seed: int = 0):
    """Responses sampled from the model itself (temperature 1): targets whose q fall on
    both sides of tau, as a policy's own samples do."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    responses = []
    with torch.no_grad():
        for prompt, length in zip(PROMPTS, RESPONSE_LENGTHS):
            ids = list(prompt)
            for _ in range(length):
                probs = model(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)
                ids.append(int(torch.multinomial(probs, 1, generator=g)))
            responses.append(ids[len(prompt) :])
    return responses


@functools.lru_cache(maxsize=4)
def reference_model(model_path):
    return AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float64, attn_implementation="sdpa"
    )


def reference(model_path, responses, *, mode, temperature):
    """fp64: the mini-batch loss through verl's agg_loss, its gradients, log p and entropy."""
    model = reference_model(model_path)
    model.zero_grad(set_to_none=True)
    width = max(RESPONSE_LENGTHS)
    losses = torch.zeros(len(PROMPTS), width, dtype=torch.float64)
    mask = torch.zeros(len(PROMPTS), width, dtype=torch.bool)
    logprobs, entropies, probs = [], [], []
    for b, (prompt, response) in enumerate(zip(PROMPTS, responses)):
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
        z = logits[len(prompt) - 1 : len(prompt) + len(response) - 1]
        terms = gft_token_terms_reference(
            z, torch.tensor(response), tau=TAU, temperature=temperature
        )
        losses[b, : len(response)] = -ADVANTAGES[b] * terms["coef"] * terms["logprobs"]
        mask[b, : len(response)] = True
        logprobs.append(terms["logprobs"].detach())
        entropies.append(terms["entropy"])
        probs.append(terms["probs"])
    loss = verl_cpu.whole_batch_agg_loss(losses, mask, mode)
    loss.backward()
    grads = {name: p.grad.detach() for name, p in model.named_parameters()}
    entropy = torch.zeros_like(losses)
    for b, e in enumerate(entropies):
        entropy[b, : len(e)] = e
    entropy_agg = verl_cpu.whole_batch_agg_loss(entropy, mask, mode)
    q = torch.cat(probs)
    return {
        "loss": loss.item(),
        "grads": grads,
        "logprobs": logprobs,
        "entropy": entropies,
        "entropy_agg": entropy_agg.item(),
        "rectified": (q <= TAU).double().mean().item(),
    }


def run_actor_update(tmp_path, *, world, **run):
    port = verl_cpu.free_port()
    out = tmp_path / f"out{world}"
    out.mkdir()
    mp.spawn(verl_workers.actor_update, args=(world, port, run, str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def make_run(model_path, responses, *, steps, micro_batch_size, **more):
    width = max(len(r) for r in responses)
    return dict(
        model_path=model_path,
        prompts=PROMPTS,
        responses=responses,
        advantages=ADVANTAGES,
        old_log_probs=torch.zeros(len(PROMPTS), width),
        prompt_width=4,
        response_width=width,
        tau=TAU,
        global_batch_size=len(PROMPTS),
        micro_batch_size=micro_batch_size,
        steps=steps,
        **{"fused": True, **more},
    )


def assert_grads_match(grads, ref_grads, rtol=2e-5):
    # One scale for all parameters: some gradients are exactly 0 in theory (the key bias
    # cancels in the softmax), where a per-parameter relative error means nothing.
    scale = max(g.abs().max().item() for g in ref_grads.values())
    assert scale > 0
    for name, ref in ref_grads.items():
        got = grads[name]
        assert got is not None, name
        err = (got.double() - ref).abs().max().item()
        assert err <= rtol * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


def tiny_model(tmp_path, *, tied):
    model_path = str(tmp_path / "model")
    # Logit spreads (set through the final norm) that put the sampled tokens' q on both
    # sides of tau.
    verl_cpu.save_tiny_qwen2(model_path, tied=tied, logit_scale=8.0 if tied else 30.0)
    return model_path, sample_responses(model_path)


def check_steps(results, steps, model_path, responses):
    world = len(results)
    for k, step in enumerate(steps):
        ref = reference(model_path, responses, mode=step["mode"], temperature=step["temperature"])
        assert 0 < ref["rectified"] < 1  # tau splits the tokens: both branches of c are used
        # verl sums the micro-batch losses and averages the ranks (its _postprocess_output).
        loss = sum(sum(r["steps"][k]["losses"]) for r in results) / world
        assert math.isclose(loss, ref["loss"], rel_tol=1e-5, abs_tol=1e-9), (step, loss, ref)
        for r in results[1:]:  # FSDP reduced the same full gradient on every rank
            for name, g in r["steps"][k]["grads"].items():
                torch.testing.assert_close(g, results[0]["steps"][k]["grads"][name])
        assert_grads_match(results[0]["steps"][k]["grads"], ref["grads"])


ONE_RANK_STEPS = [
    {"mode": "token-mean", "temperature": 0.7, "packed": True},
    {"mode": "token-sum", "temperature": 1.0, "packed": True},
    {"mode": "seq-mean-token-sum", "temperature": 0.7, "packed": False},
    {"mode": "seq-mean-token-mean", "temperature": 1.3, "packed": True},
    {"mode": "seq-mean-token-sum-norm", "temperature": 0.7, "packed": False},
    # verl's V1 trainer layout: every field nested, nothing padded.
    {"mode": "seq-mean-token-mean", "temperature": 0.7, "packed": True, "nested": True},
]


@pytest.mark.distributed
def test_fused_engine_one_rank_every_mode_inference_and_refusals(tmp_path):
    """Untied head, 2 micro-batches of 2; packed (verl's remove-padding) and padded input,
    the legacy and the V1 trainer's data layouts."""
    model_path, responses = tiny_model(tmp_path, tied=False)
    run = make_run(
        model_path,
        responses,
        steps=ONE_RANK_STEPS,
        micro_batch_size=2,
        calculate_entropy=True,
        infer=True,
        refusals=True,
    )
    (result,) = run_actor_update(tmp_path, world=1, **run)
    assert result["engine"] == "GFTFSDPEngine"
    check_steps([result], ONE_RANK_STEPS, model_path, responses)

    first = ONE_RANK_STEPS[0]
    ref = reference(model_path, responses, mode=first["mode"], temperature=first["temperature"])
    metrics = result["steps"][0]["metrics"]
    assert len(metrics["actor/gft_rectified_fraction"]) == 2  # one per micro-batch
    assert math.isclose(sum(metrics["actor/entropy_loss"]), ref["entropy_agg"], rel_tol=1e-5)
    # Inference is verl's own path: the log-probs (rollout temperature) and entropy of every
    # position, whose response slice is the reference's.
    for b, (prompt, response) in enumerate(zip(PROMPTS, responses)):
        span = slice(len(prompt) - 1, len(prompt) + len(response) - 1)
        got = result["infer_log_probs"][b][span].double()
        torch.testing.assert_close(got, ref["logprobs"][b], rtol=1e-4, atol=1e-5)
        got = result["infer_entropy"][b][span].double()
        torch.testing.assert_close(got, ref["entropy"][b], rtol=1e-4, atol=1e-5)
    refusals = result["refusals"]
    assert "entropy_coeff" in refusals and "expected 0" in refusals["entropy_coeff"]
    assert "use_kl_loss" in refusals and "expected False" in refusals["use_kl_loss"]


TWO_RANK_STEPS = [
    {"mode": "token-mean", "temperature": 0.7, "packed": True},
    {"mode": "seq-mean-token-mean", "temperature": 0.7, "packed": True},
]


@pytest.mark.distributed
@pytest.mark.parametrize("fused_head", [None, "blockwise"])
def test_fused_engine_two_ranks_tied_head(tmp_path, fused_head):
    """Tied embedding/head, 2 data-parallel ranks, 2 micro-batches of 1 on each: the
    averaged gradient is the one-process mini-batch gradient, with the chunked head
    (default) and the blockwise one (``policy_loss.fused_head``; Triton's interpreter)."""
    model_path, responses = tiny_model(tmp_path, tied=True)
    run = make_run(
        model_path, responses, steps=TWO_RANK_STEPS, micro_batch_size=1, fused_head=fused_head
    )
    results = run_actor_update(tmp_path, world=2, **run)
    assert all(r["engine"] == "GFTFSDPEngine" for r in results)
    check_steps(results, TWO_RANK_STEPS, model_path, responses)


@pytest.mark.distributed
@pytest.mark.slow
def test_fused_head_peak_memory_next_to_verl_logits_path(tmp_path):
    """One actor update of the same mini-batch (4 x 512 response tokens, vocabulary 32000)
    with the fused engine and with verl's default engine (logits, log-softmax and their
    gradient; the plug-in loss): the step's peak memory (resident-set increase, each in
    its own process) must be well below verl's, and the losses equal."""
    vocab, length = 32000, 512
    model_path = str(tmp_path / "model")
    verl_cpu.save_tiny_qwen2(model_path, tied=False, vocab=vocab)
    g = torch.Generator().manual_seed(0)
    responses = [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in PROMPTS]
    steps = [{"mode": "token-mean", "temperature": 1.0, "packed": True}]
    runs = [
        make_run(model_path, responses, steps=steps, micro_batch_size=4, fused=fused)
        for fused in (True, False)
    ]
    outs = [tmp_path / "fused", tmp_path / "verl"]
    for out in outs:
        out.mkdir()
    ports = [verl_cpu.free_port(), verl_cpu.free_port()]
    mp.spawn(
        verl_workers.independent_updates,
        args=(runs, ports, [str(o) for o in outs]),
        nprocs=2,
        join=True,
    )
    fused, default = (torch.load(o / "rank0.pt", weights_only=False) for o in outs)
    assert fused["engine"] == "GFTFSDPEngine" and default["engine"] == "FSDPEngineWithLMHead"
    mib = [r["steps"][0]["peak_rss_increase"] / 2**20 for r in (fused, default)]
    tokens = sum(len(r) for r in responses)
    print(
        f"\nactor step peak memory, {tokens} response tokens, V={vocab}: fused GFT head "
        f"{mib[0]:.0f} MiB, verl logits path {mib[1]:.0f} MiB (logits alone "
        f"{tokens * vocab * 4 / 2**20:.0f} MiB)"
    )
    assert math.isclose(
        sum(fused["steps"][0]["losses"]), sum(default["steps"][0]["losses"]), rel_tol=1e-4
    )
    assert mib[0] < 0.5 * mib[1]
