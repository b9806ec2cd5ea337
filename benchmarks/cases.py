"""Benchmark cases, shared by the runner (``python -m benchmarks``) and the pytest-benchmark tests.

A :class:`Case` is one problem shape: the operation (logits-level ``gft_loss`` or
``fused_linear_gft_loss``), the number of tokens, the vocabulary (and hidden size of the head
for the fused form), the dtype and the share of sequences whose advantage is exactly 0.
:func:`make_inputs` builds its tensors deterministically, so every implementation of a case
sees the same numbers, in the runner and in a memory-probe subprocess alike.

Input layout:

* logits-level: ``logits (N, V)``, per-token ``advantages (N,)``, ``targets``/``mask (N,)``;
* fused-linear: ``hidden (B, T, H)``, ``weight (V, H)``, per-sequence ``advantages (B,)``,
  ``targets``/``mask (B, T)``.

Both use ``token-mean`` aggregation, ``tau = 0.1`` and temperature 1 (the composed peer reads
the DCR probability as ``exp(log p)``, which is only right at T = 1).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

OPS = ("gft_loss", "fused_linear_gft_loss")
TAU = 0.1
TEMPERATURE = 1.0
LOSS_AGG_MODE = "token-mean"
# Added to the target logit of every other token: a random head puts q ~ 1/V on every target,
# so every token would be rectified (c = q). The boost gives a realistic mix of rectified and
# confident tokens and keeps the loss O(1), which makes the cross-implementation check useful.
TARGET_BOOST = 10.0


@dataclass(frozen=True)
class Head:
    """The lm_head of a real model: hidden size and vocabulary."""

    model: str
    hidden: int
    vocab: int


QWEN25_05B = Head("Qwen2.5-0.5B", 896, 151936)
LLAMA32_1B = Head("Llama-3.2-1B", 2048, 128256)
TINYLLAMA_11B = Head("TinyLlama-1.1B", 2048, 32000)
QWEN25_15B = Head("Qwen2.5-1.5B", 1536, 151936)
TOY_HEAD = Head("toy", 256, 8192)  # --quick, pytest and the CPU bf16 case
# bf16 smoke cases: a CPU without bf16 matrix instructions runs bf16 GEMMs one to two orders
# of magnitude slower than fp32 (5 s for the toy head's dh = G W at N=512 on an AVX2 EPYC).
TINY_HEAD = Head("tiny", 128, 2048)  # --quick and pytest only


@dataclass(frozen=True)
class Case:
    """One benchmark problem. ``name`` is unique and is what ``--filter`` matches."""

    op: str
    n: int  # tokens (rows of the logits)
    vocab: int
    dtype: str = "float32"
    head: Optional[Head] = None  # fused-linear only
    zero_adv_share: float = 0.0  # share of sequences whose advantage is exactly 0
    seq_len: int = 256  # tokens per sequence (N = B * seq_len)
    repeats: int = 3  # timed fwd+bwd samples per implementation, at least (CPU)
    # Warm-up runs before the samples, at least; more until the times are stable (within a
    # time budget, see benchmarks.run_policy). 0: no warm-up at all, for cases where one run
    # costs > 10 s (the process is already warm from the smaller cases before them).
    warmup: int = 1
    # Implementations not run in this case, with the reason printed in the table.
    skip: Tuple[Tuple[str, str], ...] = ()
    # Name of the case whose naive result is the reference here when naive is skipped.
    baseline: Optional[str] = None
    tags: Tuple[str, ...] = field(default=())
    devices: Tuple[str, ...] = ("cpu", "cuda")  # where the case is part of the run

    def skip_reason(self, impl: str, device: str) -> Optional[str]:
        reason = dict(self.skip).get(impl)
        # Budget skips are about a 2-core CPU's time; a GPU runs those rows in seconds.
        if reason in BUDGET_SKIPS and device != "cpu":
            return None
        return reason

    @property
    def hidden(self) -> Optional[int]:
        return self.head.hidden if self.head is not None else None

    @property
    def name(self) -> str:
        parts: List[str] = []
        if self.op == "gft_loss":
            parts += ["gft_loss", self.dtype, f"V{self.vocab}", f"N{self.n}"]
        else:
            assert self.head is not None
            parts += ["fused_linear", self.head.model, self.dtype, f"N{self.n}"]
        if self.zero_adv_share:
            parts.append(f"zero{round(100 * self.zero_adv_share)}")
        return "/".join(parts)

    @property
    def group(self) -> str:
        """Title of the table this case is printed in."""
        if self.op == "gft_loss":
            return f"gft_loss (logits-level), {self.dtype}"
        assert self.head is not None
        return (
            f"fused_linear_gft_loss, {self.head.model} head "
            f"(H={self.head.hidden}, V={self.head.vocab}), {self.dtype}"
        )

    @property
    def label(self) -> str:
        """Short row label inside its group's table."""
        label = f"N={self.n}" if self.op != "gft_loss" else f"N={self.n} V={self.vocab}"
        if self.zero_adv_share:
            label += f" A=0:{round(100 * self.zero_adv_share)}%"
        return label

    @property
    def batch(self) -> int:
        return self.n // self.seq_len

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_spec(self) -> str:
        """The case as a JSON string (what the memory-probe subprocess is given)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_spec(cls, spec: str) -> Case:
        fields = json.loads(spec)
        head = fields.pop("head")
        for key in ("skip", "tags", "devices"):
            fields[key] = tuple(tuple(x) if isinstance(x, list) else x for x in fields[key])
        return cls(head=Head(**head) if head else None, **fields)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "op": self.op,
            "group": self.group,
            "n": self.n,
            "vocab": self.vocab,
            "hidden": self.hidden,
            "model": self.head.model if self.head else None,
            "dtype": self.dtype,
            "zero_adv_share": self.zero_adv_share,
            "seq_len": self.seq_len,
            "batch": self.batch,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "baseline": self.baseline,
            "tags": list(self.tags),
            "devices": list(self.devices),
            "tau": TAU,
            "temperature": TEMPERATURE,
            "loss_agg_mode": LOSS_AGG_MODE,
        }


def _logits_case(n: int, vocab: int, dtype: str = "float32", **kw) -> Case:
    return Case(op="gft_loss", n=n, vocab=vocab, dtype=dtype, **kw)


def _fused_case(head: Head, n: int, dtype: str = "float32", **kw) -> Case:
    return Case(op="fused_linear_gft_loss", n=n, vocab=head.vocab, head=head, dtype=dtype, **kw)


def _validate(cases: List[Case]) -> List[Case]:
    names = set()
    for case in cases:
        if case.op not in OPS:
            raise ValueError(f"case {case.name}: unknown op {case.op!r}")
        if case.n % case.seq_len:
            raise ValueError(f"case {case.name}: N={case.n} is not a multiple of {case.seq_len}")
        if case.zero_adv_share and case.batch < 2:
            raise ValueError(f"case {case.name}: a zero-advantage share needs >= 2 sequences")
        if case.name in names:
            raise ValueError(f"duplicate case name {case.name}")
        names.add(case.name)
    return cases


# Reasons shared by several cases of the full run. The time budget of the full run (under 20
# minutes on a 2-core CPU) is what drops them; the same implementations are measured on the
# smaller cases of the same table.
_BUDGET_COMPILE = "over the full run's time budget here (compile + runs); measured at smaller N"
_BUDGET_TORCH = (
    "over the full run's time budget here (~1 min per run on 2 cores); measured at smaller N"
)
_BUDGET_CAREFUL = "over the full run's time budget here; measured on the fp32 head"
_ZERO_NAIVE = "does the same work at any zero share: reference from the 0% case"
_ZERO_FLOOR = "the floor is the 0% case's"
BUDGET_SKIPS = (_BUDGET_COMPILE, _BUDGET_TORCH, _BUDGET_CAREFUL)
# What a case with zero advantages leaves out: the peers that do the same work at any share
# (their figures come from the 0% case named as its baseline) and the floor rows.
ZERO_SHARE_SKIPS = (
    ("naive", _ZERO_NAIVE),
    ("naive+compile", _ZERO_NAIVE),
    ("careful", _ZERO_NAIVE),
    ("floor:mem", _ZERO_FLOOR),
    ("floor:gemm", _ZERO_FLOOR),
)


def full_cases() -> List[Case]:
    """What ``python -m benchmarks`` (``make bench``) runs; < 20 minutes on a 2-core CPU."""
    cases: List[Case] = []
    # Logits-level, fp32: the "first benchmark" table (V x N) plus the Llama-3 vocabulary at
    # N=1024 for the time-vs-V plot. N=1024, V=151936 is the native-CPU headline.
    for vocab in (32000, 151936):
        for n in (512, 1024, 2048):
            tags = ("headline-logits-cpu",) if (vocab, n) == (151936, 1024) else ()
            # N=2048, V=151936: the naive run alone takes ~10 s here, the process is warm.
            heavy = n * vocab > 1024 * 151936
            runs = {"repeats": 2, "warmup": 0} if heavy else {"repeats": 3}
            cases.append(_logits_case(n, vocab, tags=tags, **runs))
    cases.append(_logits_case(1024, 128256))
    cases.append(
        _logits_case(
            1024,
            151936,
            zero_adv_share=0.5,
            skip=ZERO_SHARE_SKIPS,
            baseline=_logits_case(1024, 151936).name,
            tags=("zero-adv",),
        )
    )
    # bf16 logits are what a bf16 model hands the loss; the reference then computes in bf16.
    for vocab in (32000, 151936):
        cases.append(_logits_case(1024, vocab, "bfloat16"))

    # Fused linear head, Qwen2.5-0.5B: tokens per batch 512 .. 4096 (the memory headline).
    no_compile = (("naive+compile", _BUDGET_COMPILE),)
    heavy = (("naive+compile", _BUDGET_COMPILE), ("gft:torch", _BUDGET_TORCH))
    cases.append(_fused_case(QWEN25_05B, 512, repeats=2))
    cases.append(_fused_case(QWEN25_05B, 1024, warmup=0, repeats=2, skip=no_compile))
    # N=2048 fp32: where the fused head's time is compared with its three bare GEMMs.
    cases.append(
        _fused_case(QWEN25_05B, 2048, warmup=0, repeats=2, skip=no_compile, tags=("headline-gemm",))
    )
    cases.append(
        _fused_case(
            QWEN25_05B,
            2048,
            zero_adv_share=0.5,
            warmup=0,
            repeats=2,
            skip=ZERO_SHARE_SKIPS,
            baseline=_fused_case(QWEN25_05B, 2048).name,
            tags=("zero-adv",),
        )
    )
    cases.append(
        _fused_case(QWEN25_05B, 4096, warmup=0, repeats=1, skip=heavy, tags=("headline-memory",))
    )
    # bf16 heads: on CPUs without bf16 matrix units (e.g. AMD EPYC before Zen 4) a bf16
    # GEMM runs ~100x slower than fp32, so the CPU run shows bf16 on the toy head; the
    # real heads in bf16 are GPU cases.
    cases.append(_fused_case(TOY_HEAD, 1024, "bfloat16", repeats=3))
    # Other real heads, one size each.
    cases.append(_fused_case(LLAMA32_1B, 512, warmup=0, repeats=2, skip=no_compile))
    cases.append(_fused_case(TINYLLAMA_11B, 1024, warmup=0, repeats=2, skip=no_compile))
    # GPU only: micro-batch sizes of real training (4k-32k tokens), out of reach of
    # the CPU run's time budget.
    gpu = {"devices": ("cuda",)}
    cases.append(_logits_case(8192, 151936, tags=("headline-logits-gpu",), **gpu))
    cases.append(_logits_case(8192, 151936, "bfloat16", tags=("headline-logits-gpu",), **gpu))
    cases.append(_fused_case(QWEN25_05B, 8192, tags=("headline-gemm",), **gpu))
    cases.append(
        _fused_case(
            QWEN25_05B,
            8192,
            zero_adv_share=0.5,
            skip=ZERO_SHARE_SKIPS,
            baseline=_fused_case(QWEN25_05B, 8192).name,
            tags=("zero-adv",),
            **gpu,
        )
    )
    cases.append(_fused_case(QWEN25_05B, 16384, "bfloat16", tags=("headline-gemm",), **gpu))
    cases.append(_fused_case(LLAMA32_1B, 8192, "bfloat16", tags=("headline-gemm",), **gpu))
    return _validate(cases)


def quick_cases() -> List[Case]:
    """``--quick``: small shapes, a smoke test that still fills every table and plot.

    Two sizes per sweep (N at V=8192, V at N=256) are what the plots need; the bf16 head is
    tiny because bf16 GEMMs are slow on CPUs without bf16 matrix instructions. About a
    minute on 2 cores.
    """
    quick = {"seq_len": 64, "repeats": 2}
    cases = [
        _logits_case(256, 8192, **quick),
        _logits_case(512, 8192, **quick),
        _logits_case(256, 16384, **quick),
        _logits_case(
            512,
            8192,
            zero_adv_share=0.5,
            skip=ZERO_SHARE_SKIPS,
            baseline=_logits_case(512, 8192, seq_len=64).name,
            **quick,
        ),
        _fused_case(TOY_HEAD, 256, **quick),
        _fused_case(TOY_HEAD, 512, **quick),
        _fused_case(TINY_HEAD, 128, "bfloat16", **quick),
    ]
    return _validate(cases)


# torch.compile of the naive loss takes tens of seconds per shape: gpu-check compiles it once.
_GPU_CHECK_COMPILE = "gpu-check's 8-minute budget compiles naive once, at N=4096"


def gpu_check_cases() -> List[Case]:
    """``--cases gpu-check`` (``make gpu-check``): bf16 at ``V = 151936``, N from 4096 to
    16384 tokens, logits level and the Qwen2.5-1.5B head (``H = 1536``); minutes on one
    H100/H200 with every peer."""
    cases: List[Case] = []
    gpu = {"devices": ("cuda",)}
    for n in (4096, 8192, 16384):
        skip = () if n == 4096 else (("naive+compile", _GPU_CHECK_COMPILE),)
        cases.append(_logits_case(n, 151936, "bfloat16", skip=skip, **gpu))
    for n in (4096, 8192, 16384):
        skip = () if n == 4096 else (("naive+compile", _GPU_CHECK_COMPILE),)
        cases.append(_fused_case(QWEN25_15B, n, "bfloat16", skip=skip, **gpu))
    return _validate(cases)


CASE_SETS = {"full": full_cases, "quick": quick_cases, "gpu-check": gpu_check_cases}


def pytest_cases(op: str) -> List[Case]:
    """Small shapes for ``pytest benchmarks``: the whole suite runs in a couple of minutes."""
    if op == "gft_loss":
        cases = [
            _logits_case(256, 32000, seq_len=64),
            _logits_case(256, 32000, "bfloat16", seq_len=64),
        ]
    elif op == "fused_linear_gft_loss":
        cases = [
            _fused_case(TOY_HEAD, 512, seq_len=64),
            _fused_case(TINY_HEAD, 256, "bfloat16", seq_len=64),
        ]
    else:
        raise ValueError(f"unknown op {op!r}")
    return _validate(cases)


def _advantages_per_sequence(case: Case, gen: torch.Generator) -> torch.Tensor:
    """Per-sequence advantages in [0.5, 1.5]; a share of whole groups set exactly to 0.

    Signs do not change the work, and positive values keep the token-mean loss away from 0
    so that the implementations' losses can be compared relatively. Groups are contiguous
    blocks of sequences (like GFT's response groups); every other group is zeroed, which is
    what "all rewards of the group equal" produces.
    """
    batch = case.batch
    adv = torch.rand(batch, generator=gen) + 0.5
    if case.zero_adv_share > 0:
        n_groups = max(2, min(batch, 8))
        group_of = torch.arange(batch) * n_groups // batch
        n_zero = round(case.zero_adv_share * n_groups)
        # Spread the zero groups evenly (every other one at 50%).
        zero_groups = torch.linspace(1, n_groups - 1, n_zero).round().long() if n_zero else []
        for g in zero_groups:
            adv[group_of == int(g)] = 0.0
    return adv


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """The case's tensors on ``device`` (none requires grad; the runner makes the leaves)."""
    gen = torch.Generator().manual_seed(seed)
    n, vocab, dtype = case.n, case.vocab, case.torch_dtype
    targets = torch.randint(0, vocab, (n,), generator=gen)
    boosted = torch.zeros(n, dtype=torch.bool)
    boosted[::2] = True
    adv_seq = _advantages_per_sequence(case, gen)
    mask = torch.ones(n, dtype=torch.bool)
    if case.op == "gft_loss":
        # Generated on the CPU with a seeded generator (same numbers on every device), in
        # row blocks so that the fp32 staging buffer stays small for bf16 cases.
        logits = torch.empty(n, vocab, dtype=dtype, device=device)
        step = max(1, (64 << 20) // (4 * vocab))
        for start in range(0, n, step):
            stop = min(start + step, n)
            block = torch.randn(stop - start, vocab, generator=gen).mul_(2.0)
            rows = torch.arange(stop - start)
            block[rows, targets[start:stop]] += TARGET_BOOST * boosted[start:stop]
            logits[start:stop].copy_(block)
        return {
            "logits": logits,
            "targets": targets.to(device),
            "advantages": adv_seq.repeat_interleave(case.seq_len).to(device),
            "mask": mask.to(device),
        }
    hidden_size = case.hidden
    assert hidden_size is not None
    # W ~ N(0, 1/H) and h ~ N(0, 4) give logits ~ N(0, 4), like a trained head's spread.
    weight = torch.randn(vocab, hidden_size, generator=gen).div_(hidden_size**0.5)
    hidden = torch.randn(n, hidden_size, generator=gen).mul_(2.0)
    # h += boost * W[y] / |W[y]|^2 raises the target logit by exactly the boost.
    w_y = weight[targets]
    hidden += (TARGET_BOOST * boosted).unsqueeze(1) * w_y / w_y.square().sum(1, keepdim=True)
    shape = (case.batch, case.seq_len)
    return {
        "hidden": hidden.view(*shape, hidden_size).to(device=device, dtype=dtype),
        "weight": weight.to(device=device, dtype=dtype),
        "targets": targets.view(shape).to(device),
        "advantages": adv_seq.to(device),
        "mask": mask.view(shape).to(device),
    }


def grad_inputs(case: Case) -> Tuple[str, ...]:
    """Names of the inputs that receive gradients (the leaves of the timed graph)."""
    return ("logits",) if case.op == "gft_loss" else ("hidden", "weight")
