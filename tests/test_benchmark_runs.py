"""The benchmark runner's warm-up, sampling, ratios and target verdicts (no timing asserted)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from benchmarks import report, runner
from benchmarks import targets as targets_module
from benchmarks.cases import Case, full_cases, quick_cases
from benchmarks.implementations import Impl, skip_reason
from benchmarks.measure import CaseSetup, time_case
from benchmarks.run_policy import RunPolicy, Warmup, is_stable
from benchmarks.targets import TARGET_BY_KEY, TARGETS, evaluate, format_targets

# --------------------------------------------------------------------------- warm-up


def _warm_up(times, policy):
    """Feed ``times`` (ms) to a Warmup until it stops; the runs it asked for."""
    warm = Warmup(policy)
    for t in times:
        if not warm.needs_more():
            break
        warm.add(t)
    return warm


def test_is_stable_needs_no_improvement_over_the_earlier_best():
    assert not is_stable([300, 60, 62], window=3, rel_tol=0.1)  # too few runs
    # The window still holds the drop from 300 to 60; one more run shows it has settled.
    assert not is_stable([300, 60, 62, 61], window=3, rel_tol=0.1)
    assert is_stable([300, 60, 62, 61, 63], window=3, rel_tol=0.1)
    # Still getting faster: 100 beats the earlier best (200) by more than 10%.
    assert not is_stable([300, 200, 150, 120, 100], window=3, rel_tol=0.1)
    # Noise upward does not count as instability.
    assert is_stable([50, 90, 55, 70], window=3, rel_tol=0.1)


def test_warmup_runs_through_a_decaying_first_call_phase():
    # Fresh buffers fault in for a few calls, then the time settles at 40 ms.
    times = [205, 160, 120, 80, 40, 41, 40, 40, 40, 40]
    warm = _warm_up(times, RunPolicy(warmup_budget_s=10.0))
    assert warm.samples == times[:8]
    assert warm.stable is True


def test_warmup_stops_on_its_budget_and_says_so():
    # Getting faster by 20% per run forever: only the budget ends it.
    times = [1000 * 0.8**i for i in range(50)]
    warm = _warm_up(times, RunPolicy(min_warmup=1, warmup_budget_s=2.0))
    spent_after_mandatory = sum(warm.samples[1:])
    assert spent_after_mandatory <= 2000.0
    assert warm.stable is False
    assert len(warm.samples) < len(times)


def test_warmup_mandatory_runs_and_disabled_adaptive_part():
    assert len(_warm_up([9e9] * 5, RunPolicy(min_warmup=3, warmup_budget_s=0.0)).samples) == 3
    off = _warm_up([500, 100, 100, 100], RunPolicy(min_warmup=0, adaptive=False))
    assert off.samples == [] and off.stable is None
    compile_first = RunPolicy(min_warmup=0, adaptive=False).for_impl(
        Impl("x", "", ("gft_loss",), min_warmup=1)
    )
    assert compile_first.min_warmup == 1


def test_timed_runs_at_least_repeats_then_until_min_time():
    policy = RunPolicy(repeats=2, min_timed_s=0.1, max_repeats=5)
    assert policy.wants_timed_run([500.0])
    assert not policy.wants_timed_run([500.0, 500.0])
    assert policy.wants_timed_run([10.0, 10.0])  # 20 ms < 100 ms: more samples
    assert not policy.wants_timed_run([10.0] * 5)  # capped


def test_time_case_round_robin_with_warmup_and_isolated_errors():
    case = Case(op="gft_loss", n=64, vocab=32, seq_len=32)
    setup = CaseSetup(case, torch.device("cpu"), keep_pristine=False)
    calls = []

    def good(x):
        calls.append("good")
        return (x["logits"] * 2).sum()

    def bad(x):
        calls.append("bad")
        raise RuntimeError("boom")

    impls = [
        (Impl("good", "", ("gft_loss",)), good),
        (Impl("bad", "", ("gft_loss",)), bad),
    ]
    policy = RunPolicy(min_warmup=2, warmup_budget_s=0.0, repeats=3, min_timed_s=0.0)
    out = time_case(setup, impls, policy)
    assert len(out["good"].warmup) == 2 and len(out["good"].fwd_bwd) == 3
    assert out["good"].loss == pytest.approx(
        2 * float(setup.inputs["logits"].detach().sum()), rel=1e-5
    )
    assert out["bad"].error.startswith("RuntimeError: boom")
    assert calls.count("bad") == 1 and calls.count("good") == 5


def _args(**kw):
    base = {"quick": False, "repeats": 0, "warmup_budget": None}
    base.update(kw)
    return argparse.Namespace(**base)


def test_run_policy_per_device_and_case():
    heavy = Case(op="gft_loss", n=512, vocab=32, warmup=0, repeats=2)
    cpu = runner.run_policy(heavy, torch.device("cpu"), _args())
    assert cpu.min_warmup == 0 and not cpu.adaptive and cpu.repeats == 2
    cuda = runner.run_policy(heavy, torch.device("cuda"), _args())
    assert cuda.adaptive and cuda.min_warmup >= 3 and cuda.repeats >= 20
    exact = runner.run_policy(heavy, torch.device("cpu"), _args(repeats=4, warmup_budget=0.5))
    assert (exact.repeats, exact.max_repeats, exact.warmup_budget_s) == (4, 4, 0.5)


def test_peers_and_floors_are_in_every_case_where_they_apply():
    for case in quick_cases() + full_cases():
        names = {name for name, _ in case.skip}
        floor = "floor:mem" if case.op == "gft_loss" else "floor:gemm"
        if case.zero_adv_share:
            # Same work at any zero share: their figures come from the baseline case.
            assert {"naive", "careful", floor} <= names and case.baseline
        else:
            assert skip_reason(
                Impl("careful", "", (case.op,)), case, torch.device("cpu"), quick=True
            ) in (None, "over the full run's time budget here; measured on the fp32 head")


# --------------------------------------------------------------------------- ratios, targets


def _entry(ms, peak=None, loss=1.0, status="ok", floor=False):
    return {
        "status": status,
        "reason": None,
        "floor": floor,
        "median_ms": {"fwd": ms / 2, "bwd": ms / 2, "fwd_bwd": ms},
        "samples_ms": {"fwd": [ms / 2], "bwd": [ms / 2], "fwd_bwd": [ms]},
        "warmup_ms": [ms, ms],
        "warmup_stable": True,
        "memory": None if peak is None else {"peak_mb": peak},
        "loss": loss,
    }


def _result(name, op="gft_loss", n=1024, vocab=151936, tags=(), baseline=None, **impls):
    case = {
        "name": name,
        "op": op,
        "group": op,
        "n": n,
        "vocab": vocab,
        "dtype": "float32",
        "zero_adv_share": 0.5 if baseline else 0.0,
        "baseline": baseline,
        "tags": list(tags),
    }
    return {"case": case, "impls": {k.replace("_", ":"): v for k, v in impls.items()}}


def _headline(cpu_ms=100.0, cpu_peak=594.0):
    return _result(
        "headline",
        tags=("headline-logits-cpu",),
        naive=_entry(900.0, peak=2967.0),
        careful=_entry(400.0, peak=1200.0),
        gft_torch=_entry(300.0, peak=657.0, loss=1.0005),
        gft_cpu=_entry(cpu_ms, peak=cpu_peak),
        gft_inplace=_entry(50.0, peak=0.0),
        floor_mem=_entry(90.0, loss=123.0, floor=True),
    )


def test_ratios_against_both_peers_and_the_floor():
    results = [_headline()]
    report.add_ratios(results)
    cpu = results[0]["impls"]["gft:cpu"]
    assert cpu["vs_naive"]["speedup_fwd_bwd"] == pytest.approx(9.0)
    assert cpu["vs_careful"]["speedup_fwd_bwd"] == pytest.approx(4.0)
    assert cpu["vs_careful"]["memory_fraction"] == pytest.approx(594.0 / 1200.0)
    assert cpu["vs_floor"] == pytest.approx(100.0 / 90.0)
    # The floor's value is no loss: not compared; a 5e-4 difference is within fp32's 1e-3.
    assert "loss_ok" not in results[0]["impls"]["floor:mem"]
    assert results[0]["impls"]["gft:torch"]["loss_ok"] is True
    text = report.format_tables(results)
    assert "vs careful" in text and "4.00x" in text and "1.11x" in text


def test_zero_share_case_takes_both_peers_from_its_baseline():
    zero = _result(
        "zero",
        baseline="headline",
        tags=("zero-adv",),
        gft_cpu=_entry(80.0, peak=594.0),
        naive=_entry(0, status="skipped"),
    )
    results = [_headline(), zero]
    report.add_ratios(results)
    cpu = results[1]["impls"]["gft:cpu"]
    assert cpu["vs_naive"]["baseline_case"] == "headline"
    assert cpu["vs_careful"]["speedup_fwd_bwd"] == pytest.approx(5.0)
    assert "loss_ok" not in cpu  # other inputs: no loss comparison


def _verdicts(results, device="cpu"):
    report.add_ratios(results)
    return {(v.target.key, v.label.split(": ", 1)[1]): v for v in evaluate(results, device)}


def test_target_verdicts_pass_and_miss():
    good = _verdicts([_headline()])
    assert good[("cpu-logits-vs-naive", "naive / gft:cpu")].status == "PASS"
    assert good[("cpu-logits-vs-naive", "naive / gft:cpu")].value == pytest.approx(9.0)
    assert good[("cpu-logits-vs-torch", "gft:torch / gft:cpu")].status == "PASS"
    assert good[("cpu-logits-floor", "gft:cpu / floor:mem")].status == "PASS"
    assert good[("logits-memory", "gft:cpu peak / N x V")].status == "PASS"
    assert good[("logits-inplace-memory", "gft:inplace peak / N x V")].status == "PASS"

    bad = _verdicts([_headline(cpu_ms=200.0, cpu_peak=1200.0)])
    assert bad[("cpu-logits-vs-naive", "naive / gft:cpu")].status == "MISS"
    assert bad[("cpu-logits-floor", "gft:cpu / floor:mem")].status == "MISS"
    assert bad[("logits-memory", "gft:cpu peak / N x V")].status == "MISS"
    line = bad[("cpu-logits-vs-naive", "naive / gft:cpu")].line()
    assert line.startswith("MISS") and "(target >= 8x)" in line


def test_targets_follow_the_device():
    cuda = _verdicts([_headline()], device="cuda")
    # The CPU headline case is not a GPU target; the GPU targets need their own cases.
    assert not any(key.startswith("cpu-") for key, _ in cuda)


def test_fused_targets_gemm_floor_zero_advantage_and_liger():
    fused = dict(op="fused_linear_gft_loss", n=8192)
    base = _result(
        "base",
        tags=("headline-gemm",),
        naive=_entry(60.0, peak=20000.0),
        gft_triton=_entry(45.0, peak=900.0),
        liger=_entry(190.0, peak=1000.0),
        floor_gemm=_entry(42.0, floor=True),
        **fused,
    )
    zero = _result(
        "zero", baseline="base", tags=("zero-adv",), gft_triton=_entry(20.0, peak=900.0), **fused
    )
    v = _verdicts([base, zero], device="cuda")
    assert v[("fused-vs-gemm", "gft:triton / floor:gemm")].value == pytest.approx(45 / 42)
    assert v[("fused-vs-gemm", "gft:triton / floor:gemm")].status == "PASS"
    assert v[("fused-zero-advantage", "gft:triton 0% / 50% zero")].value == pytest.approx(2.25)
    assert v[("vs-liger-time", "liger / gft:triton time")].status == "PASS"
    assert v[("vs-liger-memory", "gft:triton / liger peak")].value == pytest.approx(0.9)


def test_target_table_is_complete_and_printable():
    keys = [t.key for t in TARGETS]
    assert len(keys) == len(set(keys)) == len(TARGET_BY_KEY)
    for target in TARGETS:
        assert target.quantity and target.source and target.devices
        assert target.threshold is None or target.threshold > 0
    text = format_targets(markdown=True)
    assert text.count("\n") == len(TARGETS) + 1
    assert "| fused-vs-gemm |" in text and "<= 1.1x" in text


def test_report_has_no_thresholds_of_its_own(monkeypatch):
    # The verdicts come from the target table: changing it changes the report.
    results = [_headline()]
    report.add_ratios(results)
    before = report.target_lines(copy.deepcopy(results), "cpu")
    assert any(line.startswith("PASS  cpu-logits-vs-naive") for line in before)
    target = TARGET_BY_KEY["cpu-logits-vs-naive"]
    stricter = dataclasses.replace(target, threshold=20.0)
    patched = tuple(stricter if t is target else t for t in targets_module.TARGETS)
    monkeypatch.setattr(targets_module, "TARGETS", patched)
    after = report.target_lines(results, "cpu")
    assert any(line.startswith("MISS  cpu-logits-vs-naive") for line in after)


def test_readme_shows_the_target_table():
    readme = (Path(report.__file__).parent / "README.md").read_text()
    assert format_targets(markdown=True) in readme


def test_chunk_budget_script_times_each_budget_against_the_floor(capsys):
    from benchmarks import chunk_budget

    assert (
        chunk_budget.main(
            ["--n", "256", "--budgets", "64", "--rounds", "1", "--warmup-rounds", "0"]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fused_linear/Qwen2.5-0.5B/float32/N256")
    assert [line.split()[0] for line in lines[1:]] == ["floor:gemm", "gft:cpu"]
    assert "1.000x floor" in lines[1] and "64 MiB" in lines[2]
    with pytest.raises(SystemExit):
        chunk_budget.main(["--n", "100"])
    assert "--n: expected a positive multiple of 256 tokens, got 100" in capsys.readouterr().err
