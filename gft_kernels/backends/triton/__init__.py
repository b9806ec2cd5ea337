"""The ``triton`` backend: launch wrappers of the Triton row kernels.

Kernels: :mod:`.token_pass` (the fused token pass and the column-block statistics),
:mod:`.fixed_reference` (its soft-capped statistics walk) and :mod:`.row_grad` (gradient
rows), with :mod:`.common` (constants, logit transforms) and :mod:`.fma_math`. Every launch
is built by :mod:`.launch` (which ``make aot`` compiles too); :mod:`.autotune` picks among
configurations on a GPU when asked.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import re
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

# The oldest Triton the kernels are built and checked with (pyproject states the same
# floor; ``make aot`` compiles every sm_90 variant with it too).
TRITON_FLOOR: Tuple[int, int] = (3, 6)


def triton_release(version: str) -> Tuple[int, ...]:
    """``(major, minor)`` of a Triton version string ("3.10.0+git..." -> (3, 10))."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def check_triton_version(version: str) -> None:
    """Raise ``ImportError`` naming the floor when ``version`` is older than it: an older
    Triton fails later, inside a kernel's compilation, with a message about the kernel."""
    if triton_release(version) < TRITON_FLOOR:
        floor = ".".join(map(str, TRITON_FLOOR))
        raise ImportError(
            f"gft_kernels' Triton kernels need triton >= {floor}; found triton {version}"
        )


check_triton_version(triton.__version__)

from gft_kernels.backends import PartialStats, RowBackend, RowParams, TokenPass  # noqa: E402
from gft_kernels.backends.base import GradRows, TokenPassCall  # noqa: E402
from gft_kernels.backends.token_terms import (  # noqa: E402
    SEGMENTS,
    raise_for_token_flags,
    token_pass_from_statistics,
)
from gft_kernels.backends.triton import autotune, launch  # noqa: E402
from gft_kernels.backends.triton.row_grad import row_grad_kernel  # noqa: E402
from gft_kernels.backends.triton.token_pass import partial_stats_kernel, token_pass_kernel  # noqa: E402


def _vectors(n: int, device: torch.device, count: int, *shape: int):
    return [torch.empty(n, *shape, dtype=torch.float32, device=device) for _ in range(count)]


class TritonRows(RowBackend):
    """Triton implementation of :class:`~gft_kernels.backends.base.RowBackend`."""

    name = "triton"

    def _token_pass(self, call: TokenPassCall) -> TokenPass:
        logits, tokens, params = call.logits, call.tokens, call.params
        n_rows, n_cols = logits.shape
        cfg = launch.launch_config(logits.dtype, params.logit_softcap is not None)
        segments = launch.row_segments(n_rows, n_cols, cfg.block_v, logits.device)
        if segments > 1:
            return self._split_token_pass(call, segments)
        loss, logprobs, probs, row_max, sum_exp, scale = _vectors(n_rows, logits.device, 6)
        entropy = _vectors(n_rows, logits.device, 1)[0] if call.with_stats else None
        flags = torch.empty(n_rows, dtype=torch.int32, device=logits.device)
        outputs = (loss, logprobs, probs, entropy, row_max, sum_exp, scale, flags)
        grad_out = None if call.grad_out is None else launch.LogitsRows.of(call.grad_out)

        def build(config=None):
            return launch.token_pass_launch(
                launch.LogitsRows.of(logits),
                tokens,
                call.grad_weights,
                grad_out,
                outputs,
                params,
                call.with_stats,
                config,
            )

        config = None
        # Autotuning reruns the kernel: never when it writes over the logits it reads.
        if n_rows and autotune.autotune_enabled(logits.device) and call.grad_out is not logits:
            softcap = params.logit_softcap is not None
            key = (
                "token_pass",
                logits.dtype,
                softcap,
                call.with_stats,
                grad_out is not None,
                tokens.mask is not None,
                n_cols.bit_length(),
            )
            config = autotune.choose_config(
                key,
                autotune.candidate_configs(logits.dtype, softcap),
                lambda cfg: _time_launch(build(cfg)),
            )
        if n_rows:
            _launch(token_pass_kernel, build(config))
        raise_for_token_flags(flags, tokens, n_cols, params.ignore_index)
        return TokenPass(loss, logprobs, probs, entropy, row_max, sum_exp, scale)

    def _partial_stats(
        self, logits: Tensor, local_targets: Tensor, params: RowParams, with_entropy: bool
    ) -> PartialStats:
        part = self._segment_stats(logits, local_targets, params, with_entropy, segments=1)
        fields = (part.row_max, part.sum_exp, part.sum_exp_1, part.weighted, part.target_logit)
        return PartialStats(*(t.reshape(-1) if t is not None else None for t in fields))

    def _segment_stats(self, logits, local_targets, params, with_entropy, segments):
        """``(N, segments)`` statistics of column segments of each row."""
        n_rows, n_cols = logits.shape
        cfg = launch.launch_config(logits.dtype, params.logit_softcap is not None)
        segments = -(-n_cols // launch.segment_length(n_cols, segments, cfg.block_v))
        row_max, sum_exp, sum_exp_1, target_logit = _vectors(n_rows, logits.device, 4, segments)
        weighted = _vectors(n_rows, logits.device, 1, segments)[0] if with_entropy else None
        outputs = (row_max, sum_exp, sum_exp_1, weighted, target_logit)
        built = launch.partial_stats_launch(
            launch.LogitsRows.of(logits), segments, local_targets, outputs, params, with_entropy
        )
        if n_rows:
            _launch(partial_stats_kernel, built)
        return PartialStats(row_max, sum_exp, sum_exp_1, weighted, target_logit)

    def _split_token_pass(self, call: TokenPassCall, segments: int) -> TokenPass:
        """Few rows: each row's columns are split across programs, and the segments'
        statistics are combined exactly (the same algebra as vocab-parallel shards)."""

        def statistics(local: Tensor, rows: Optional[Tensor]) -> PartialStats:
            return self._segment_stats(call.logits, local, call.params, call.with_stats, segments)

        out, _ = token_pass_from_statistics(
            self, call, statistics=statistics, reduce=SEGMENTS, host_checks=False
        )
        return out

    def _row_grad(self, logits: Tensor, rows: GradRows, params: RowParams, out: Tensor) -> Tensor:
        n_rows, n_cols = logits.shape
        softcap = params.logit_softcap is not None
        cfg = launch.launch_config(logits.dtype, softcap, launch.GRAD_WARPS)
        segments = launch.row_segments(n_rows, n_cols, cfg.grad_block, logits.device)
        built = launch.row_grad_launch(
            launch.LogitsRows.of(logits), launch.LogitsRows.of(out), rows, params, segments
        )
        if n_rows:
            _launch(row_grad_kernel, built)
        return out


def launch_device(tensor: torch.Tensor):
    """The context every launch (and every autotuning timing) runs in: the CUDA device of
    the kernel's tensors. Triton compiles for, and launches on, the *current* device and
    that device's current stream; without this, logits on ``cuda:1`` while ``cuda:0`` is
    current (an HF ``device_map="auto"`` head on the last GPU) would be read by a kernel
    launched on the wrong GPU. A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device_of(tensor)


def _launch(kernel, built: launch.Launch) -> None:
    grid, args, meta = built
    with launch_device(args[0]):
        kernel[grid](*args, **meta)


def _time_launch(built: launch.Launch) -> float:
    """Seconds one ``token_pass_kernel`` launch takes (CUDA; autotuning only)."""
    import triton.testing

    grid, args, meta = built
    # do_bench's events, synchronisations and cache flushes use the current device too.
    with launch_device(args[0]):
        return triton.testing.do_bench(lambda: token_pass_kernel[grid](*args, **meta)) * 1e-3
