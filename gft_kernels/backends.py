"""Backend selection: which row kernels (``row_stats`` / ``row_grad``) serve a call.

All backends implement the same two primitives (see ``gft_kernels.cpu.torch_rows``), so
the autograd Functions above them are a single code path.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch

BACKENDS = ("auto", "triton", "cpu", "torch")


class RowKernels(NamedTuple):
    name: str
    row_stats: Callable
    row_grad: Callable


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _torch_kernels() -> RowKernels:
    from gft_kernels.cpu import torch_rows

    return RowKernels("torch", torch_rows.row_stats, torch_rows.row_grad)


def _triton_kernels(device: torch.device, dtype: torch.dtype) -> RowKernels:
    if device.type == "cpu" and not triton_interpreted():
        raise ValueError(
            "backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
            "imported (the Triton interpreter); use backend='cpu' or 'torch' for CPU speed"
        )
    if dtype == torch.float64:
        raise TypeError(
            "logits: backend 'triton' takes float32/bfloat16/float16, got float64 "
            "(use backend='torch' or 'cpu' for fp64, e.g. gradcheck)"
        )
    try:
        from gft_kernels.ops import gft_rows
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ValueError(f"backend: 'triton' needs the triton package ({err})") from err
    return RowKernels("triton", gft_rows.row_stats, gft_rows.row_grad)


def _native_kernels(required: bool):
    from gft_kernels.cpu import native

    if required:
        native.require()
    elif not native.is_available():
        return None
    return RowKernels("cpu", native.row_stats, native.row_grad)


def resolve(backend: object, device: torch.device, dtype: torch.dtype) -> RowKernels:
    """Row kernels for ``backend`` on tensors of ``device``/``dtype`` (checked here)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return _torch_kernels()
    if backend == "triton":
        return _triton_kernels(device, dtype)
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend: 'cpu' needs CPU tensors, got device {device}")
        return _native_kernels(required=True)
    # auto
    if device.type == "cuda":
        try:
            return _triton_kernels(device, dtype)
        except (ValueError, TypeError):
            return _torch_kernels()
    if device.type == "cpu":
        return _native_kernels(required=False) or _torch_kernels()
    return _torch_kernels()
