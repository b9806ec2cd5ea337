"""Floor rows: the least work any implementation of a case must do, timed like a loss.

They are not losses (the scalar they return is not compared with the others); they give the tables a
"/ floor" column: how far an implementation is from the machine's floor on that case.

* logits level (:func:`memory_floor`): one read pass over the ``N x V`` logits (a row
  maximum) and one read-and-write pass into a fresh ``N x V`` buffer (the gradient). This is
  the traffic of a kernel that reads the logits for its row statistics and reads them again
  to write the gradient; on a GPU it is the bandwidth roofline, measured with PyTorch's own
  streaming kernels on the same card.
* fused head (:func:`bare_gemms`): the three matrix products of forward and backward,
  ``z = h W^T`` (into a preallocated ``N x V`` buffer), ``dh = G W`` and ``dW = G^T h`` with a
  fixed ``N x V`` matrix ``G``, each one GEMM over all tokens, in the head's dtype.
"""

from __future__ import annotations

from typing import Dict

import torch

Inputs = Dict[str, torch.Tensor]


class _MemoryFloor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits)
        return torch.amax(logits, dim=-1).sum().float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (logits,) = ctx.saved_tensors
        return logits * grad.to(logits.dtype)


def memory_floor(x: Inputs) -> torch.Tensor:
    """Logits-level floor on the case inputs (``x["logits"]`` requires grad)."""
    return _MemoryFloor.apply(x["logits"])


class _BareGemms(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor, grad: torch.Tensor
    ) -> torch.Tensor:
        torch.mm(hidden, weight.t(), out=logits)
        ctx.save_for_backward(hidden, weight, grad)
        return hidden.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, _):
        hidden, weight, grad = ctx.saved_tensors
        return grad.mm(weight), grad.t().mm(hidden), None, None


class BareGemms:
    """Fused-head floor: a loss-shaped callable holding its ``N x V`` buffers.

    The buffers (the logits output and the fixed gradient ``G``) are made on the first call,
    outside any timed region that matters (warm-up), and reused: the floor pays no
    allocation.
    """

    def __init__(self) -> None:
        self._buffers: Dict[tuple, tuple] = {}

    def __call__(self, x: Inputs) -> torch.Tensor:
        hidden, weight = x["hidden"], x["weight"]
        h = hidden.reshape(-1, hidden.shape[-1])
        key = (h.shape[0], weight.shape[0], h.dtype, h.device)
        if key not in self._buffers:
            self._buffers.clear()
            gen = torch.Generator(device=h.device).manual_seed(0)
            shape = (h.shape[0], weight.shape[0])
            grad = torch.randn(shape, generator=gen, device=h.device, dtype=h.dtype) * 1e-3
            self._buffers[key] = (torch.empty(shape, device=h.device, dtype=h.dtype), grad)
        logits, grad = self._buffers[key]
        return _BareGemms.apply(h, weight, logits, grad)


def bare_gemms() -> BareGemms:
    """A fresh fused-head floor (one per case: its buffers are sized for that case)."""
    return BareGemms()


def device_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Bytes read plus bytes written per second by a device-to-device copy of ``nbytes``
    (CUDA): the bandwidth a streaming kernel can reach on this card, which the achieved
    bandwidth of a loss is compared with (a data-sheet figure is not reached by any kernel)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    stop.record()
    stop.synchronize()
    seconds = start.elapsed_time(stop) / 1e3 / repeats
    del src, dst
    return 2 * nbytes / seconds
