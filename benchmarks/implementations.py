"""The implementations compared side by side, for both operations.

Each :class:`Impl` turns a :class:`~benchmarks.cases.Case` into a function of the case's input
dict that returns the scalar loss (the runner times that call and its ``backward()``), or says
why it cannot run here (:func:`skip_reason`). Nothing heavy is imported at module import:
``gft_kernels.fused_linear_gft_loss``, the native CPU kernel and Liger-Kernel are looked up
when a case asks for them, so a missing piece becomes a stated skip instead of a crash.

Peers (what the library is compared with):

* ``naive``: :func:`gft_kernels.reference.gft_loss_reference` on full logits (fused-linear
  cases first form ``hidden @ weight.T``): a transcription of the published code.
* ``naive+compile``: the same function under ``torch.compile`` (inductor; C++ on CPU).
* ``careful``: the loss in plain, careful PyTorch (:mod:`benchmarks.careful_torch`): one
  ``log_softmax``, one ``gather``, no copies; the fused form chunks the head under
  checkpointing.
* ``liger``: the best composed peer, Liger-Kernel's (fused linear) cross-entropy for
  per-token ``log p`` and the GFT coefficient applied in PyTorch (CUDA only).
* ``cce``: the same composition on Cut Cross-Entropy's ``linear_cross_entropy`` (fused head
  only, CUDA only, when the ``cut-cross-entropy`` package is installed).
* ``verl``: the same composition on verl's fused linear kernel
  (``verl.utils.kernel.linear_cross_entropy``: per-token ``log p`` and entropy from logit
  tiles that never reach memory, what verl's ``use_fused_kernels=True`` runs; fused head
  only, CUDA only, when ``verl`` is installed).

Ours: ``gft:<backend>`` (``torch``, ``cpu``, ``triton``), ``gft:inplace`` (logits-level,
``backend="auto"`` with ``inplace_backward=True``: no extra ``N x V`` buffer) and
``gft:blockwise`` (fused head, ``head="blockwise"``: logit tiles that never reach memory).

Floors (:mod:`benchmarks.floors`), the least work of the case, timed alike: ``floor:mem``
(logits level: a read pass and a read-and-write pass) and ``floor:gemm`` (fused head: the
three GEMMs of forward and backward).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from benchmarks import floors
from benchmarks.careful_torch import careful_fused_linear_gft_loss, careful_gft_loss
from benchmarks.cases import LOSS_AGG_MODE, OPS, TAU, TEMPERATURE, Case

Inputs = Dict[str, torch.Tensor]
LossFn = Callable[[Inputs], torch.Tensor]

QUICK_SKIP = "skipped in --quick"
LIGER_CPU_SKIP = (
    "Liger-Kernel's kernels need a CUDA device; the Triton interpreter is not a benchmark"
)
CCE_CPU_SKIP = "Cut Cross-Entropy's kernels need a CUDA device"
TRITON_CPU_SKIP = (
    "Triton kernels need a CUDA device; the Triton interpreter (TRITON_INTERPRET=1) is for "
    "tests only, not a benchmark"
)


@dataclass(frozen=True)
class Impl:
    """One implementation: a name, the ops it serves and how it is built."""

    name: str
    description: str
    ops: Tuple[str, ...]
    ours: bool = False
    # The loss call overwrites an input (Liger's cross-entropy writes its gradient into the
    # logits; in-place backward does too): the runner restores the inputs before each run.
    mutates_inputs: bool = False
    # Untimed runs needed before the first sample whatever the case says (compilation).
    min_warmup: int = 0
    # A floor row (not a loss): no loss check, no memory probe; the "/ floor" reference.
    floor: bool = False


IMPLS: Tuple[Impl, ...] = (
    Impl("naive", "gft_kernels.reference on full logits (the published formula)", OPS),
    Impl("naive+compile", "the naive reference under torch.compile (inductor)", OPS, min_warmup=1),
    Impl(
        "careful",
        "plain careful PyTorch: one log_softmax + gather, DCR from the same statistics; "
        "fused: checkpointed chunks of the head",
        OPS,
    ),
    Impl("gft:torch", "gft_kernels, backend='torch' (chunked PyTorch)", OPS, ours=True),
    Impl("gft:cpu", "gft_kernels, backend='cpu' (native C++ kernel)", OPS, ours=True),
    Impl("gft:triton", "gft_kernels, backend='triton'", OPS, ours=True),
    Impl(
        "gft:inplace",
        "gft_kernels, backend='auto', inplace_backward=True (gradient written into the logits)",
        ("gft_loss",),
        ours=True,
        mutates_inputs=True,
    ),
    Impl(
        "gft:blockwise",
        "gft_kernels, head='blockwise' (Triton: logit tiles from tl.dot, never in memory)",
        ("fused_linear_gft_loss",),
        ours=True,
    ),
    Impl(
        "liger",
        "Liger-Kernel (fused linear) cross-entropy -> log p, GFT coefficient in PyTorch",
        OPS,
        mutates_inputs=True,
    ),
    Impl(
        "cce",
        "Cut Cross-Entropy linear_cross_entropy -> log p, GFT coefficient in PyTorch",
        ("fused_linear_gft_loss",),
    ),
    Impl(
        "verl",
        "verl's fused linear kernel (log p + entropy) -> GFT coefficient in PyTorch",
        ("fused_linear_gft_loss",),
    ),
    Impl(
        "floor:mem",
        "floor: a read pass over the logits + a read-and-write pass into a fresh N x V buffer",
        ("gft_loss",),
        floor=True,
    ),
    Impl(
        "floor:gemm",
        "floor: the three GEMMs of the head (z = h W^T, dh = G W, dW = G^T h), nothing else",
        ("fused_linear_gft_loss",),
        # Its first call makes its N x V buffers: never a timed one.
        min_warmup=1,
        floor=True,
    ),
)
IMPL_BY_NAME = {impl.name: impl for impl in IMPLS}


def impls_for(op: str) -> List[Impl]:
    return [impl for impl in IMPLS if op in impl.ops]


# --------------------------------------------------------------------------- availability


def _short(err: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def native_cpu_reason() -> Optional[str]:
    """None when the native CPU kernel builds/loads here, else why not."""
    try:
        from gft_kernels.backends import cpu_rows
    except ImportError as err:
        return f"native CPU kernel not available ({_short(err)})"
    try:
        cpu_rows.load()
    except Exception as err:  # a failed build is reported, not raised
        return f"native CPU kernel not available ({_short(err)})"
    return None


def fused_linear_fn() -> Optional[Callable]:
    """``gft_kernels.fused_linear_gft_loss`` if this checkout has it."""
    import gft_kernels

    return getattr(gft_kernels, "fused_linear_gft_loss", None)


def _dist_version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def liger_version() -> Optional[str]:
    return _dist_version("liger-kernel")


def cce_version() -> Optional[str]:
    return _dist_version("cut-cross-entropy")


def skip_reason(impl: Impl, case: Case, device: torch.device, quick: bool) -> Optional[str]:
    """Why ``impl`` does not run ``case`` on ``device`` (None: it runs)."""
    reason = case.skip_reason(impl.name, device.type)
    if reason:
        return reason
    if impl.name == "naive+compile" and quick:
        return QUICK_SKIP
    if case.op == "fused_linear_gft_loss" and impl.ours and fused_linear_fn() is None:
        return "not available: gft_kernels.fused_linear_gft_loss is missing in this checkout"
    if impl.name == "gft:cpu":
        if device.type != "cpu":
            return "the native C++ kernel takes CPU tensors"
        return native_cpu_reason()
    if impl.name in ("gft:triton", "gft:blockwise") and device.type != "cuda":
        return TRITON_CPU_SKIP
    if impl.name == "gft:inplace":
        from gft_kernels import gft_loss

        if "inplace_backward" not in inspect.signature(gft_loss).parameters:
            return "not available: gft_loss has no inplace_backward option"
    if impl.name == "careful" and LOSS_AGG_MODE != "token-mean":
        return "the careful PyTorch peer is written for token-mean"
    if impl.name == "liger":
        if device.type != "cuda":
            return LIGER_CPU_SKIP
        if liger_version() is None:
            return "liger-kernel is not installed (pip install liger-kernel)"
        if TEMPERATURE != 1.0:
            return "the composed peer reads q = exp(log p), valid at temperature 1 only"
    if impl.name == "cce":
        if device.type != "cuda":
            return CCE_CPU_SKIP
        if cce_version() is None:
            return "cut-cross-entropy is not installed (make gpu-check takes its wheel: --wheels)"
    if impl.name == "verl":
        if device.type != "cuda":
            return "verl's fused kernels need a CUDA device"
        if _dist_version("verl") is None:
            return "verl is not installed (pip install verl; not a wheel gpu-check installs)"
        if TEMPERATURE != 1.0:
            return "the composed peer reads q = exp(log p), valid at temperature 1 only"
    return None


# --------------------------------------------------------------------------- loss functions

# The loss every implementation computes: the DCR settings, and the aggregation for those that
# take one (the careful peer is token-mean by construction).
DCR_SETTINGS = dict(tau=TAU, temperature=TEMPERATURE)
LOSS_SETTINGS = dict(DCR_SETTINGS, loss_agg_mode=LOSS_AGG_MODE)


def _logits_inputs(x: Inputs) -> Tuple[torch.Tensor, ...]:
    """The positional inputs of a logits-level loss: logits, targets, advantages, mask."""
    return x["logits"], x["targets"], x["advantages"], x["mask"]


def _head_inputs(x: Inputs) -> Tuple[torch.Tensor, ...]:
    """The positional inputs of a fused-head loss: hidden, weight, targets, advantages, mask."""
    return x["hidden"], x["weight"], x["targets"], x["advantages"], x["mask"]


def _reference_logits(x: Inputs) -> torch.Tensor:
    from gft_kernels.reference import gft_loss_reference

    return gft_loss_reference(*_logits_inputs(x), **LOSS_SETTINGS)


def _reference_fused(x: Inputs) -> torch.Tensor:
    return _reference_logits({**x, "logits": x["hidden"] @ x["weight"].T})


def _gft_from_logprobs(
    logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The GFT formula on per-token log-probs (T = 1, so q = exp(log p)), token-mean."""
    logp = logp.float()
    q = logp.detach().exp()
    coef = torch.where(q <= TAU, q, torch.ones_like(q))
    m = mask.to(logp.dtype)
    return (-(advantages.to(logp.dtype) * coef * logp) * m).sum() / m.sum().clamp_min(1.0)


def _liger_logits(x: Inputs) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_cross_entropy

    logits = x["logits"]
    # reduction="none" gives -log p per token; Liger writes the logits' gradient into the
    # logits during the forward (hence mutates_inputs).
    nll = liger_cross_entropy(
        logits.view(-1, logits.shape[-1]), x["targets"].view(-1), reduction="none"
    )
    return _gft_from_logprobs(-nll, x["advantages"].view(-1), x["mask"].view(-1))


def _liger_fused(x: Inputs) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    hidden, targets = x["hidden"], x["targets"]
    # A reduced-precision head accumulates dW in fp32, as ours does (Liger's default would
    # accumulate in the head's dtype).
    accum = None if x["weight"].dtype == torch.float32 else torch.float32
    nll = liger_fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        x["weight"],
        targets.reshape(-1),
        reduction="none",
        accum_dtype=accum,
    )
    advantages = x["advantages"].unsqueeze(-1).expand_as(targets).reshape(-1)
    return _gft_from_logprobs(-nll, advantages, x["mask"].reshape(-1))


def _cce_fused(x: Inputs) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    hidden, targets = x["hidden"], x["targets"]
    nll = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), x["weight"], targets.reshape(-1), reduction="none"
    )
    advantages = x["advantages"].unsqueeze(-1).expand_as(targets).reshape(-1)
    return _gft_from_logprobs(-nll, advantages, x["mask"].reshape(-1))


def _verl_fused(x: Inputs) -> torch.Tensor:
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    hidden, targets = x["hidden"], x["targets"]
    # Entropy comes with log p (verl logs it); only log p carries the loss's gradient.
    logp, _entropy = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), x["weight"], targets.reshape(-1), 1.0, "none"
    )
    advantages = x["advantages"].unsqueeze(-1).expand_as(targets).reshape(-1)
    return _gft_from_logprobs(logp, advantages, x["mask"].reshape(-1))


def _careful_logits(x: Inputs) -> torch.Tensor:
    return careful_gft_loss(*_logits_inputs(x), **DCR_SETTINGS)


def _careful_fused(x: Inputs) -> torch.Tensor:
    return careful_fused_linear_gft_loss(*_head_inputs(x), **DCR_SETTINGS)


def _ours_logits(backend: str, inplace: bool = False) -> LossFn:
    from gft_kernels import gft_loss

    extra = {"inplace_backward": True} if inplace else {}

    def run(x: Inputs) -> torch.Tensor:
        return gft_loss(*_logits_inputs(x), backend=backend, **LOSS_SETTINGS, **extra)

    return run


def _ours_fused(backend: str, head: str = "chunked") -> LossFn:
    fused = fused_linear_fn()
    assert fused is not None
    # An older checkout's function has no head argument: the chunked head is its only one.
    extra = {"head": head} if head != "chunked" else {}

    def run(x: Inputs) -> torch.Tensor:
        return fused(*_head_inputs(x), backend=backend, chunk_size=None, **LOSS_SETTINGS, **extra)

    return run


_COMPILED: Dict[str, LossFn] = {}


def _compiled(op: str) -> LossFn:
    """One compiled function per op and process, reused by every case of that op.

    Dynamo's default shape policy applies: the first shape compiles static, a later shape
    recompiles once with dynamic sizes (what a training loop with varying batches gets). The
    recompile limit is raised so that a long run never silently falls back to eager.
    """
    if op not in _COMPILED:
        import torch._dynamo.config as dynamo_config

        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, max(64, getattr(dynamo_config, knob)))
        base = _reference_logits if op == "gft_loss" else _reference_fused
        _COMPILED[op] = torch.compile(base)
    return _COMPILED[op]


def build(impl: Impl, case: Case) -> LossFn:
    """The loss function of ``impl`` for ``case`` (call :func:`skip_reason` first)."""
    logits_level = case.op == "gft_loss"
    if impl.name == "naive":
        return _reference_logits if logits_level else _reference_fused
    if impl.name == "naive+compile":
        return _compiled(case.op)
    if impl.name.startswith("gft:"):
        if impl.name == "gft:inplace":
            return _ours_logits("auto", inplace=True)
        if impl.name == "gft:blockwise":
            return _ours_fused("triton", head="blockwise")
        backend = impl.name.split(":", 1)[1]
        return _ours_logits(backend) if logits_level else _ours_fused(backend)
    if impl.name == "liger":
        return _liger_logits if logits_level else _liger_fused
    if impl.name == "cce":
        return _cce_fused
    if impl.name == "verl":
        return _verl_fused
    if impl.name == "careful":
        return _careful_logits if logits_level else _careful_fused
    if impl.name == "floor:mem":
        return floors.memory_floor
    if impl.name == "floor:gemm":
        return floors.bare_gemms()
    raise ValueError(f"unknown implementation {impl.name!r}")
