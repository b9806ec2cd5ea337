"""Loader of the native CPU row kernels (``backend="cpu"``), built on first use.

``csrc/cpu_rows.cpp`` is compiled with :func:`torch.utils.cpp_extension.load` the first time
it is needed, into a folder named after a hash of everything that makes a build
different: the source, the compiler flags, the torch and Python versions, the compiler
and the machine architecture. Two checkouts or environments on one machine therefore never
rebuild each other's copy, and a process never loads a module another is rewriting (a
build becomes visible only once a completion marker is written after it).

Robust first use, as it happens on shared machines and in jobs that get killed:

* a folder that already holds a complete build is only read (a read-only folder works);
* builds are serialised by a lock file that records its owner; a lock whose owner is gone
  (same host) or that is older than ``GFT_KERNELS_BUILD_STALE_S`` (default 900 s) is
  stale and is broken, together with the lock torch's builder may have left behind;
* a caller waits at most ``GFT_KERNELS_BUILD_WAIT_S`` (default 300 s) for another
  process's build, then gives up: ``auto`` falls back to the torch backend with one
  warning and ``cpu`` raises.

``GFT_KERNELS_BUILD_DIR`` picks the parent folder (default: torch's extension folder);
``GFT_KERNELS_DISABLE_NATIVE=1`` makes the build fail on purpose (a machine without a
compiler).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from gft_kernels.backends import PartialStats, RowBackend, RowParams, TokenPass
from gft_kernels.backends.base import GradRows, TokenPassCall

EXTENSION_PREFIX = "gft_kernels_cpu"
_SOURCE_NAME = "cpu_rows.cpp"
DISABLE_ENV = "GFT_KERNELS_DISABLE_NATIVE"
BUILD_DIR_ENV = "GFT_KERNELS_BUILD_DIR"
WAIT_ENV = "GFT_KERNELS_BUILD_WAIT_S"
STALE_ENV = "GFT_KERNELS_BUILD_STALE_S"
_LOCK_NAME = "gft_build.lock"
_DONE_NAME = "gft_build.complete"

# -O3 for the vector loops; -fopenmp because at::parallel_for is a header template whose
# OpenMP pragmas are compiled into this module (without it the kernels run on one thread);
# -ffp-contract=off so that no product is fused with a later subtraction behind our back
# (the kernels' rounding must not depend on the compiler). No -march=native: the cached
# .so may be loaded on another CPU; the AVX2 path is chosen at run time instead.
EXTRA_CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wall")
EXTRA_LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_error: Optional[str] = None  # short reason of the failed build, once tried
_warned = False


def source_path() -> Path:
    """The C++ source, in the package ``gft_kernels.csrc`` (the repository's ``csrc/``,
    installed into the package or mapped there in a checkout)."""
    from gft_kernels._checkout import package_folder

    return package_folder("gft_kernels.csrc") / _SOURCE_NAME


def _compiler_identity() -> str:
    compiler = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        return compiler + "\n" + out.stdout.splitlines()[0] if out.stdout else compiler
    except (OSError, subprocess.SubprocessError):
        return compiler + " (unavailable)"


def build_key() -> str:
    """Hash of the source, flags, torch, Python, compiler and architecture (16 hex)."""
    digest = hashlib.sha256()
    for part in (
        source_path().read_bytes(),
        repr((EXTRA_CFLAGS, EXTRA_LDFLAGS)).encode(),
        torch.__version__.encode(),
        sys.version.encode(),
        _compiler_identity().encode(),
        platform.machine().encode(),
    ):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def build_directory() -> Path:
    """The folder of this configuration's build (not created here)."""
    parent = os.environ.get(BUILD_DIR_ENV) or os.environ.get("TORCH_EXTENSIONS_DIR")
    if not parent:
        from torch._appdirs import user_cache_dir

        parent = user_cache_dir(appname="torch_extensions")
    return Path(parent) / f"{EXTENSION_PREFIX}_{build_key()}"


def _env_seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def _import_built(folder: Path, name: str) -> Optional[ModuleType]:
    """Import a complete build from ``folder`` without writing anything, else None."""
    library = folder / f"{name}.so"
    if not ((folder / _DONE_NAME).is_file() and library.is_file()):
        return None
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _owner_alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # cannot tell across hosts: only the age bound applies
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def _try_lock(lock: Path, stale_after: float) -> bool:
    """Create the lock file (True), or break it if stale and report False to retry."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            owner = json.loads(lock.read_text() or "{}")
            age = time.time() - lock.stat().st_mtime
        except (OSError, ValueError):
            return False  # being written or removed right now: look again shortly
        if not _owner_alive(owner) or age > stale_after:
            for stale in (lock, lock.parent / "lock"):  # ours and torch's builder's
                try:
                    stale.unlink()
                except FileNotFoundError:
                    pass
        return False
    with os.fdopen(fd, "w") as handle:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}, handle)
    return True


def _compile(folder: Path, name: str, verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension  # pulls in setuptools: only when building

    return cpp_extension.load(
        name=name,
        sources=[str(source_path())],
        # Fresh lists: load() appends to them in place.
        extra_cflags=list(EXTRA_CFLAGS),
        extra_ldflags=list(EXTRA_LDFLAGS),
        build_directory=str(folder),
        verbose=verbose,
    )


def _build(verbose: bool) -> ModuleType:
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        raise RuntimeError(f"disabled by {DISABLE_ENV}")
    folder = build_directory()
    name = folder.name
    module = _import_built(folder, name)
    if module is not None:
        return module
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RuntimeError(f"cannot create the build folder {folder}: {err}") from err
    lock = folder / _LOCK_NAME
    wait = _env_seconds(WAIT_ENV, 300.0)
    stale_after = _env_seconds(STALE_ENV, 900.0)
    deadline = time.monotonic() + wait
    while not _try_lock(lock, stale_after):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"timed out after {wait:.0f} s waiting for another process's build in "
                f"{folder} (remove {lock} if no build is running)"
            )
        time.sleep(0.2)
        module = _import_built(folder, name)
        if module is not None:
            return module
    try:
        module = _import_built(folder, name)  # finished while we took the lock
        if module is None:
            try:
                (folder / "lock").unlink()  # torch's own lock: stale, since we hold ours
            except FileNotFoundError:
                pass
            module = _compile(folder, name, verbose)
            (folder / _DONE_NAME).write_text(name + "\n")
        return module
    finally:
        try:
            lock.unlink()
        except FileNotFoundError:
            pass


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


def load(verbose: bool = False) -> ModuleType:
    """Build (first call only) and return the extension module; raises on failure.

    A failure is cached too, so a missing compiler costs one attempt per process.
    """
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(_error)
        try:
            _module = _build(verbose)
        except Exception as err:  # any build/import failure means "not available"
            _error = _short_reason(err)
            raise RuntimeError(_error) from err
        return _module


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
                stacklevel=3,
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
    global _module, _error, _warned
    with _lock:
        _module = None
        _error = None
        _warned = False


class CpuRows(RowBackend):
    """The ``cpu`` backend: the row primitives of ``csrc/cpu_rows.cpp`` (CPU tensors)."""

    name = "cpu"

    def __init__(self, module: ModuleType) -> None:
        self._module = module

    @staticmethod
    def _transform_args(params: RowParams):
        cap = 0.0 if params.logit_softcap is None else float(params.logit_softcap)
        return float(params.inv_temperature), float(params.logit_scale), cap

    def _token_pass(self, call: TokenPassCall) -> TokenPass:
        tokens, params = call.tokens, call.params
        outputs = self._module.token_pass(
            call.logits,
            tokens.targets,
            tokens.advantages,
            tokens.mask,
            int(tokens.tokens_per_advantage),
            float(params.tau),
            *self._transform_args(params),
            int(params.ignore_index),
            bool(call.with_stats),
            call.grad_weights,
            call.grad_out,
        )
        loss, logprobs, probs, entropy, row_max, sum_exp, scale = outputs
        entropy = entropy if call.with_stats else None
        return TokenPass(loss, logprobs, probs, entropy, row_max, sum_exp, scale)

    def _partial_stats(
        self, logits: Tensor, local_targets: Tensor, params: RowParams, with_entropy: bool
    ) -> PartialStats:
        row_max, sum_exp, sum_exp_1, weighted, target_logit = self._module.partial_stats(
            logits, local_targets, *self._transform_args(params), bool(with_entropy)
        )
        return PartialStats(
            row_max, sum_exp, sum_exp_1, weighted if with_entropy else None, target_logit
        )

    def _row_grad(self, logits: Tensor, rows: GradRows, params: RowParams, out: Tensor) -> Tensor:
        return self._module.row_grad(
            logits,
            rows.targets,
            rows.row_max,
            rows.sum_exp,
            rows.grad_rows,
            rows.scale,
            *self._transform_args(params),
            out,
        )
