"""Loader of the native CPU row kernels (``backend="cpu"``), built on first use.

``csrc/gft_cpu.cpp`` is compiled with :func:`torch.utils.cpp_extension.load` the first time
it is needed and cached in torch's extension directory (or ``$GFT_KERNELS_BUILD_DIR``), so
later processes only load the shared object. The primitives have exactly the signatures and
semantics of :mod:`gft_kernels.cpu.torch_rows`.

* :func:`is_available` builds once and never raises: on failure it warns once and the
  ``auto`` backend falls back to the chunked-PyTorch kernels.
* :func:`require` builds or raises ``RuntimeError`` (``backend="cpu"``).
* ``GFT_KERNELS_DISABLE_NATIVE=1`` makes the build fail on purpose (simulates a machine
  without a compiler); :func:`_reset_for_tests` forgets the cached outcome.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional, Tuple

import torch

EXTENSION_NAME = "gft_kernels_cpu"
_SOURCE_NAME = "gft_cpu.cpp"
DISABLE_ENV = "GFT_KERNELS_DISABLE_NATIVE"
BUILD_DIR_ENV = "GFT_KERNELS_BUILD_DIR"

# -O3 for the vector loops; -fopenmp because at::parallel_for is a header template whose
# OpenMP pragmas are compiled into this module (without it the kernels run on one thread).
# No -march=native: the cached .so may be loaded on another CPU; the AVX2 path is selected
# at run time through function target attributes instead.
EXTRA_CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-Wall")
EXTRA_LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_error: Optional[str] = None  # short reason of the failed build, once tried
_warned = False
_build_seconds: Optional[float] = None


def source_path() -> Path:
    """The C++ source: shipped inside the package (wheel) or at the repository root."""
    package_dir = Path(__file__).resolve().parent.parent
    for candidate in (
        package_dir / "csrc" / _SOURCE_NAME,
        package_dir.parent / "csrc" / _SOURCE_NAME,
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{_SOURCE_NAME} not found in {package_dir / 'csrc'} or {package_dir.parent / 'csrc'}"
    )


def _short_reason(err: BaseException, max_lines: int = 4, max_chars: int = 240) -> str:
    """A compiler failure is pages long (the whole command line included); keep what went
    wrong: the compiler's ``error:`` lines if any, else the first line of the message."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    keys = ("error:", "fatal", "not found", "no such file")
    errors = [ln for ln in lines if any(k in ln.lower() for k in keys)]
    picked = errors[:max_lines] if errors else lines[:1]
    if not picked:
        return type(err).__name__
    clipped = [ln if len(ln) <= max_chars else ln[: max_chars - 3] + "..." for ln in picked]
    prefix = "compiler error: " if errors else f"{type(err).__name__}: "
    return prefix + " | ".join(clipped)


def _build(verbose: bool) -> ModuleType:
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        raise RuntimeError(f"disabled by {DISABLE_ENV}")
    # Imported here: cpp_extension pulls in setuptools, which `import gft_kernels` should not.
    from torch.utils import cpp_extension

    kwargs = {}
    build_dir = os.environ.get(BUILD_DIR_ENV)
    if build_dir:
        os.makedirs(build_dir, exist_ok=True)
        kwargs["build_directory"] = build_dir
    return cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(source_path())],
        # Fresh lists: load() appends to them in place, and a changed argument list makes
        # a second load() in the same process rebuild under a new "_v1" name.
        extra_cflags=list(EXTRA_CFLAGS),
        extra_ldflags=list(EXTRA_LDFLAGS),
        verbose=verbose,
        **kwargs,
    )


def load(verbose: bool = False) -> ModuleType:
    """Build (first call only) and return the extension module; raises on failure.

    A failure is cached too, so a missing compiler costs one attempt per process.
    """
    global _module, _error, _build_seconds
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(_error)
        start = time.perf_counter()
        try:
            _module = _build(verbose)
        except Exception as err:  # any build/import failure means "not available"
            _error = _short_reason(err)
            raise RuntimeError(_error) from err
        _build_seconds = time.perf_counter() - start
        return _module


def build_seconds() -> Optional[float]:
    """Seconds the successful :func:`load` took (compile or cache hit), else None."""
    return _build_seconds


def is_available() -> bool:
    """True if the native kernels build/load here; warns once (RuntimeWarning) if not."""
    global _warned
    try:
        load()
        return True
    except Exception as err:
        with _lock:
            first = not _warned
            _warned = True
        if first:
            warnings.warn(
                f"gft_kernels: the native CPU kernel could not be built ({err}); "
                "using the torch backend instead",
                RuntimeWarning,
                stacklevel=2,
            )
        return False


def require() -> ModuleType:
    """The extension module, or ``RuntimeError`` saying why it could not be built."""
    try:
        return load()
    except RuntimeError as err:
        raise RuntimeError(
            f"backend 'cpu': the native CPU kernel could not be built: {err}"
        ) from err


def simd_path() -> str:
    """``"avx2"`` (AVX2+FMA+F16C inner loops) or ``"scalar"`` (portable C++ with libm exp:
    CPUs without AVX2 and non-x86 machines); builds the module if needed."""
    return load().simd_path()


def _reset_for_tests() -> None:
    """Forget the cached module, failure and warning so the next call builds again."""
    global _module, _error, _warned, _build_seconds
    with _lock:
        _module = None
        _error = None
        _warned = False
        _build_seconds = None


def row_stats(
    logits: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    active: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Row statistics of CPU logits ``(N, V)`` (fp32/bf16/fp16/fp64, last dim contiguous).

    Returns ``(lse_t, lse_1, entropy)``, each ``(N,)`` in fp64 for fp64 logits else fp32:
    ``logsumexp(z / T)``, ``logsumexp(z)`` and the entropy of ``softmax(z / T)`` (None
    unless ``with_entropy``). Rows with ``active[i] == False`` (bool ``(N,)``) are not read
    and get ``lse = +inf`` (softmax 0, so such a token carries no loss and no gradient).
    """
    lse_t, lse_1, entropy = load().row_stats(logits, float(temperature), bool(with_entropy), active)
    if not with_entropy or entropy is None or entropy.numel() != lse_t.numel():
        entropy = None
    return lse_t, lse_1, entropy


def row_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse_t: torch.Tensor,
    coef: torch.Tensor,
    temperature: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write ``coef * (softmax(z / T) - onehot(targets))`` into ``out`` and return it.

    ``logits``/``out``: ``(N, V)``, same dtype; ``out`` may be ``logits`` itself (in place)
    but must not otherwise overlap it.
    ``targets``: int64 ``(N,)`` in ``[0, V)``; ``lse_t``/``coef``: ``(N,)`` in the stat dtype
    (fp64 for fp64 logits, else fp32). Rows with ``coef == 0`` are zero-filled without
    reading their logits.
    """
    return load().row_grad(logits, targets, lse_t, coef, float(temperature), out)
