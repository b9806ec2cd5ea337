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
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from gft_kernels.backends.base import PartialStats, RowBackend, RowParams, TokenPass

__all__ = [
    "BACKENDS",
    "BackendInfo",
    "backend_info",
    "backend_names",
    "check_backend_name",
    "PartialStats",
    "RowBackend",
    "RowParams",
    "TokenPass",
    "check_backend",
    "load_backend",
    "register_backend",
    "triton_interpreted",
]

ALL_DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class BackendInfo:
    """A registered backend: how to build it and which tensors it takes.

    ``factory(required)`` returns the backend, or None when an optional backend is
    unavailable (``auto`` then falls back to ``torch``); it is called once, on first use.
    ``devices`` are the device types it takes (None: any); ``dtypes`` the logits/hidden
    dtypes; ``device_hint`` is added to the refusal of another device.
    """

    name: str
    factory: Callable[[bool], Optional[RowBackend]]
    devices: Optional[Tuple[str, ...]] = None
    dtypes: Tuple[torch.dtype, ...] = ALL_DTYPES
    device_hint: str = ""


_REGISTRY: Dict[str, BackendInfo] = {}
_CACHE: Dict[str, RowBackend] = {}


def register_backend(
    name: str,
    factory: Callable[[bool], Optional[RowBackend]],
    *,
    devices: Optional[Sequence[str]] = None,
    dtypes: Sequence[torch.dtype] = ALL_DTYPES,
    device_hint: str = "",
) -> None:
    """Register ``factory`` under ``name`` for tensors on ``devices`` (device types, None:
    any) of ``dtypes``. The name is then accepted wherever a backend is chosen: the
    losses, ``GFTLoss``/``FusedLinearGFTLoss`` and the integrations' configs."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"name: expected a non-empty backend name other than 'auto', got {name!r}")
    _REGISTRY[name] = BackendInfo(
        name, factory, None if devices is None else tuple(devices), tuple(dtypes), device_hint
    )
    _CACHE.pop(name, None)


def backend_names() -> Tuple[str, ...]:
    """Every name a caller may pass now: ``auto`` and each registered backend."""
    return ("auto",) + tuple(_REGISTRY)


def backend_info(name: str) -> BackendInfo:
    """What the registry holds for ``name`` (a registered backend, not ``auto``)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"backend: expected one of {', '.join(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def check_backend_name(arg: str, value: object) -> str:
    """``value`` names a registered backend (or ``auto``); ``arg`` is the argument's name
    in the error (``backend``, ``gft_backend``)."""
    names = backend_names()
    if not isinstance(value, str) or value not in names:
        raise ValueError(f"{arg}: expected one of {', '.join(names)}, got {value!r}")
    return value


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _torch_factory(required: bool) -> RowBackend:
    from gft_kernels.backends.torch_rows import TorchRows

    return TorchRows()


def _native_factory(required: bool) -> Optional[RowBackend]:
    from gft_kernels.backends import cpu_rows

    if required:
        return cpu_rows.CpuRows(cpu_rows.require())
    if not cpu_rows.is_available():
        return None
    return cpu_rows.CpuRows(cpu_rows.load())


def _triton_factory(required: bool) -> RowBackend:
    try:
        from gft_kernels.backends.triton import TritonRows
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ValueError(f"backend: 'triton' needs the triton package ({err})") from err
    return TritonRows()


register_backend("torch", _torch_factory)
register_backend("cpu", _native_factory, devices=("cpu",))
register_backend(
    "triton",
    _triton_factory,
    devices=("cuda",),
    dtypes=(torch.float32, torch.bfloat16, torch.float16),
    device_hint="on CPU tensors it needs TRITON_INTERPRET=1 set before triton is imported "
    "(the Triton interpreter); use backend='cpu' or 'torch' on CPU",
)

# The built-in names (with "auto"), for documentation and parametrised tests; a caller may
# pass any name of backend_names(), user-registered ones included.
BACKENDS: Tuple[str, ...] = ("auto", "triton", "cpu", "torch")


def _takes_device(info: BackendInfo, device: torch.device) -> bool:
    if info.devices is None or device.type in info.devices:
        return True
    # The Triton interpreter runs the same kernels on CPU tensors (how the tests check them).
    return info.name == "triton" and device.type == "cpu" and triton_interpreted()


def check_backend(
    backend: object, device: torch.device, dtype: torch.dtype, tensor_name: str = "logits"
) -> str:
    """Resolve ``backend`` for tensors of ``device``/``dtype`` without building anything.

    ``tensor_name`` is the argument whose dtype decides (``logits``, or ``hidden`` for the
    fused head), so that a refusal names what the caller passed.

    Returns the concrete name, or ``"auto-cpu"`` when ``auto`` on the CPU must try the
    native kernel first. Raises ``ValueError``/``TypeError`` for impossible choices.
    """
    check_backend_name("backend", backend)
    if backend == "auto":
        if device.type == "cuda" and dtype != torch.float64:
            return "triton"
        return "auto-cpu" if device.type == "cpu" else "torch"
    info = _REGISTRY[backend]
    if not _takes_device(info, device):
        where = "/".join(d.upper() for d in info.devices or ())
        hint = f"; {info.device_hint}" if info.device_hint else ""
        raise ValueError(f"backend: {backend!r} needs {where} tensors, got device {device}{hint}")
    if dtype not in info.dtypes:
        want = "/".join(str(d).replace("torch.", "") for d in info.dtypes)
        fp64 = " (use backend='torch' or 'cpu' for fp64, e.g. gradcheck)"
        raise TypeError(
            f"{tensor_name}: backend {backend!r} takes {want}, got "
            f"{str(dtype).replace('torch.', '')}" + (fp64 if dtype == torch.float64 else "")
        )
    return backend


def load_backend(name: str) -> RowBackend:
    """The backend for a name returned by :func:`check_backend` (builds on first use)."""
    if name == "auto-cpu":
        return _CACHE.get("cpu") or _load("cpu", required=False) or _load("torch", True)
    return _CACHE.get(name) or _load(name, required=True)


def _load(name: str, required: bool) -> Optional[RowBackend]:
    backend = _REGISTRY[name].factory(required)
    if backend is not None:
        _CACHE[name] = backend
    return backend


def _reset_for_tests() -> None:
    _CACHE.clear()
