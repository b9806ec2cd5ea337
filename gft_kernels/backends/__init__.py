"""Backends: implementations of the row-kernel contract, registered by name.

:class:`~gft_kernels.backends.base.RowBackend` is the contract (written once);
``torch`` (chunked PyTorch, any device), ``cpu`` (native C++, built on first use) and
``triton`` (CUDA, and CPU tensors under ``TRITON_INTERPRET=1``) implement it. ``auto``
picks one per call: CUDA -> triton, CPU -> cpu if it builds, else torch (one warning).

Choosing a backend has two steps so that argument checks never wait for a build:
:func:`check_backend` (static: name, device, dtype; no build) runs with the other argument
checks, and :func:`load_backend` (may build the native kernel) runs only once every
argument has been accepted. ``docs/backends.md`` explains how to add a backend.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch

from gft_kernels.backends.base import PartialStats, RowBackend, RowParams, TokenPass

__all__ = [
    "BACKENDS",
    "PartialStats",
    "RowBackend",
    "RowParams",
    "TokenPass",
    "check_backend",
    "load_backend",
    "register_backend",
    "triton_interpreted",
]

# name -> factory(required: bool) returning a backend, or None when an optional backend
# is unavailable (``auto`` then falls back to ``torch``).
_FACTORIES: Dict[str, Callable[[bool], Optional[RowBackend]]] = {}
_CACHE: Dict[str, RowBackend] = {}


def register_backend(name: str, factory: Callable[[bool], Optional[RowBackend]]) -> None:
    """Register ``factory`` under ``name``; it is called once, on first use."""
    _FACTORIES[name] = factory
    _CACHE.pop(name, None)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _torch_factory(required: bool) -> RowBackend:
    from gft_kernels.backends.torch_rows import TorchRows

    return TorchRows()


def _native_factory(required: bool) -> Optional[RowBackend]:
    from gft_kernels.backends import native

    if required:
        return native.NativeRows(native.require())
    if not native.is_available():
        return None
    return native.NativeRows(native.load())


def _triton_factory(required: bool) -> RowBackend:
    try:
        from gft_kernels.backends.triton import TritonRows
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ValueError(f"backend: 'triton' needs the triton package ({err})") from err
    return TritonRows()


register_backend("torch", _torch_factory)
register_backend("cpu", _native_factory)
register_backend("triton", _triton_factory)

# The names a caller may pass: every registered backend, plus "auto".
BACKENDS: Tuple[str, ...] = ("auto", "triton", "cpu", "torch")


def check_backend(
    backend: object, device: torch.device, dtype: torch.dtype, tensor_name: str = "logits"
) -> str:
    """Resolve ``backend`` for tensors of ``device``/``dtype`` without building anything.

    ``tensor_name`` is the argument whose dtype decides (``logits``, or ``hidden`` for the
    fused head), so that a refusal names what the caller passed.

    Returns the concrete name, or ``"auto-cpu"`` when ``auto`` on the CPU must try the
    native kernel first. Raises ``ValueError``/``TypeError`` for impossible choices.
    """
    names = tuple(_FACTORIES) + ("auto",)
    if not isinstance(backend, str) or backend not in names:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "triton":
        if device.type == "cpu" and not triton_interpreted():
            raise ValueError(
                "backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton "
                "is imported (the Triton interpreter); use backend='cpu' or 'torch' on CPU"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend: 'triton' needs CUDA tensors, got device {device}")
        if dtype == torch.float64:
            raise TypeError(
                f"{tensor_name}: backend 'triton' takes float32/bfloat16/float16, got float64 "
                "(use backend='torch' or 'cpu' for fp64, e.g. gradcheck)"
            )
        return "triton"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend: 'cpu' needs CPU tensors, got device {device}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and dtype != torch.float64:
        return "triton"
    return "auto-cpu" if device.type == "cpu" else "torch"


def load_backend(name: str) -> RowBackend:
    """The backend for a name returned by :func:`check_backend` (builds on first use)."""
    if name == "auto-cpu":
        return _CACHE.get("cpu") or _load("cpu", required=False) or _load("torch", True)
    return _CACHE.get(name) or _load(name, required=True)


def _load(name: str, required: bool) -> Optional[RowBackend]:
    backend = _FACTORIES[name](required)
    if backend is not None:
        _CACHE[name] = backend
    return backend


def _reset_for_tests() -> None:
    _CACHE.clear()
