"""Triton row kernels of the GFT loss: one chunked pass over the vocabulary each way.

Forward (:func:`row_stats`): one streaming pass per row keeps an online max and rescales
three accumulators on every new max: the exp-sum at temperature T, the exp-sum at
temperature 1 (the DCR probability is read from the raw logits) and, when asked, the
entropy numerator ``sum e * (x - max_x)``. Only O(rows) statistics leave the kernel.

Backward (:func:`row_grad`): one read of the row and one write of
``coef * (softmax(z / T) - onehot(y))``. Rows whose coefficient is 0 (masked, zero
advantage, rectified to 0) only write zeros and never read the logits.

Both kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

# A block covers 16 KiB of fp32 per program step on GPU; the interpreter on CPU runs
# blocks as numpy arrays and is fastest with the same size.
MAX_BLOCK_V = 4096


def block_size_for(n_cols: int, max_block: int = MAX_BLOCK_V) -> int:
    return min(triton.next_power_of_2(max(n_cols, 1)), max_block)


def _num_warps(block_v: int) -> int:
    return 16 if block_v >= 4096 else (8 if block_v >= 1024 else 4)


@triton.jit
def _row_stats_kernel(
    logits_ptr,
    stride_row,
    lse_t_ptr,
    lse_1_ptr,
    entropy_ptr,
    active_ptr,
    n_cols,
    inv_temperature,
    BLOCK_V: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    UNIT_TEMPERATURE: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if HAS_ACTIVE:
        # A row that carries neither loss nor gradient is not read: lse = +inf means
        # softmax 0 and q = 0 downstream.
        if tl.load(active_ptr + row) == 0:
            tl.store(lse_t_ptr + row, float("inf"))
            tl.store(lse_1_ptr + row, float("inf"))
            if WITH_ENTROPY:
                tl.store(entropy_ptr + row, 0.0)
            return
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    row_max = -float("inf")
    sum_1 = 0.0
    sum_t = 0.0
    ent_acc = 0.0  # sum e_t * (x - max_x), x = z / T
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        z = tl.load(row_ptr + offs, mask=offs < n_cols, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(z, axis=0))
        # Shift by 0 while everything seen is -inf so that exp() gives 0, not NaN.
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)
        rescale_1 = tl.exp(row_max - shift)
        e_1 = tl.exp(z - shift)
        if UNIT_TEMPERATURE:
            # T = 1: both exp-sums are the same sum; one exponential per element.
            delta_t = row_max - shift
            rescale_t = rescale_1
            x = z - shift
            e_t = e_1
        else:
            delta_t = (row_max - shift) * inv_temperature
            rescale_t = tl.exp(delta_t)
            x = (z - shift) * inv_temperature
            e_t = tl.exp(x)
        if WITH_ENTROPY:
            # U' = r * (U + delta * S) re-centres the entropy numerator on the new max;
            # with no finite value seen yet S = 0 and delta is -inf, so the term is 0.
            carried = tl.where(sum_t > 0.0, ent_acc + delta_t * sum_t, 0.0)
            ent_acc = rescale_t * carried + tl.sum(tl.where(e_t > 0.0, e_t * x, 0.0), axis=0)
        sum_1 = sum_1 * rescale_1 + tl.sum(e_1, axis=0)
        sum_t = sum_t * rescale_t + tl.sum(e_t, axis=0)
        row_max = new_max
    shift = tl.where(row_max == -float("inf"), 0.0, row_max)
    log_sum_t = tl.log(sum_t)
    tl.store(lse_t_ptr + row, shift * inv_temperature + log_sum_t)
    tl.store(lse_1_ptr + row, shift + tl.log(sum_1))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, log_sum_t - ent_acc / sum_t)


@triton.jit
def _row_grad_kernel(
    logits_ptr,
    stride_row,
    grad_ptr,
    stride_grad_row,
    targets_ptr,
    lse_t_ptr,
    coef_ptr,
    n_cols,
    inv_temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grad_row_ptr = grad_ptr + row * stride_grad_row
    cols = tl.arange(0, BLOCK_V)
    coef = tl.load(coef_ptr + row).to(tl.float32)
    if coef == 0.0:
        zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            tl.store(grad_row_ptr + offs, zeros.to(grad_ptr.dtype.element_ty), mask=offs < n_cols)
    else:
        target = tl.load(targets_ptr + row)
        lse_t = tl.load(lse_t_ptr + row).to(tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            valid = offs < n_cols
            z = tl.load(row_ptr + offs, mask=valid, other=-float("inf")).to(tl.float32)
            g = coef * tl.exp(z * inv_temperature - lse_t)
            g = tl.where(offs == target, g - coef, g)
            tl.store(grad_row_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=valid)


def row_stats(
    logits: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    active: Optional[torch.Tensor] = None,
    block_v: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Row statistics of ``(N, V)`` logits (last dim contiguous): fp32 ``(N,)`` each.

    Returns ``(lse_t, lse_1, entropy)``; ``entropy`` is None unless requested. Rows with
    ``active[i] == False`` (optional bool ``(N,)``) are not read and get ``lse = +inf``.
    """
    n_rows, n_cols = logits.shape
    lse_t = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse_1 = torch.empty_like(lse_t)
    entropy = torch.empty_like(lse_t) if with_entropy else None
    if n_rows:
        args, meta = _stats_launch(
            logits, logits.stride(0), n_cols, lse_t, lse_1, entropy, active, temperature, block_v
        )
        _row_stats_kernel[(n_rows,)](*args, **meta)
    return lse_t, lse_1, entropy


def _stats_launch(logits, stride_row, n_cols, lse_t, lse_1, entropy, active, temperature, block_v):
    """Arguments and meta-parameters of one ``_row_stats_kernel`` launch.

    Shared by :func:`row_stats` and :func:`aot_variants`, so the ahead-of-time check compiles
    exactly the variants the wrapper launches.
    """
    block = block_v or block_size_for(n_cols)
    args = (
        logits,
        stride_row,
        lse_t,
        lse_1,
        entropy if entropy is not None else lse_t,
        active if active is not None else lse_t,
        n_cols,
        1.0 / temperature,
    )
    meta = dict(
        BLOCK_V=block,
        WITH_ENTROPY=entropy is not None,
        UNIT_TEMPERATURE=temperature == 1.0,
        HAS_ACTIVE=active is not None,
        num_warps=_num_warps(block),
    )
    return args, meta


def row_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse_t: torch.Tensor,
    coef: torch.Tensor,
    temperature: float,
    out: torch.Tensor,
    block_v: Optional[int] = None,
) -> torch.Tensor:
    """Write ``coef * (softmax(z / T) - onehot(targets))`` into ``out`` (may alias logits)."""
    n_rows, n_cols = logits.shape
    if n_rows:
        args, meta = _grad_launch(
            logits,
            logits.stride(0),
            out,
            out.stride(0),
            n_cols,
            targets,
            lse_t,
            coef.to(torch.float32),
            temperature,
            block_v,
        )
        _row_grad_kernel[(n_rows,)](*args, **meta)
    return out


def _grad_launch(
    logits, stride_row, out, stride_out, n_cols, targets, lse_t, coef, temperature, block_v
):
    """Arguments and meta-parameters of one ``_row_grad_kernel`` launch (see _stats_launch)."""
    block = block_v or block_size_for(n_cols)
    args = (logits, stride_row, out, stride_out, targets, lse_t, coef, n_cols, 1.0 / temperature)
    return args, dict(BLOCK_V=block, num_warps=_num_warps(block))


_AOT_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _aot_vocab_sizes() -> List[int]:
    """Row lengths whose launches reach every specialisation the wrappers can produce.

    For each block size, a multiple of 16 and a length that is not (Triton specialises
    integers and addresses on 16-divisibility), plus V = 1 (an integer equal to 1 becomes a
    constant); lengths past MAX_BLOCK_V give the same compilations again and are deduplicated.
    """
    sizes = set()
    for k in range(18):
        sizes.update({2**k, 2**k + 1})
    return sorted(sizes)


def _vocab_class(n_cols: int) -> str:
    return "V=1" if n_cols == 1 else ("V%16=0" if n_cols % 16 == 0 else "V%16!=0")


def aot_variants() -> list:
    """Every compilation of the two row kernels that :func:`row_stats` / :func:`row_grad` launch.

    Logits dtypes fp32 / bf16 / fp16; the stats kernel's switches (temperature 1 or not,
    entropy, active-row mask); each block / warp configuration the row length selects;
    contiguous rows of an aligned allocation with any row length. Returns
    ``List[gft_kernels.ops.variants.KernelVariant]``.
    """
    from gft_kernels.ops.variants import AotTensor, HotLoop, dedupe, launch_variant

    stats_out = AotTensor(torch.float32)
    records = []
    for dtype, label in _AOT_DTYPES.items():
        size = torch.empty((), dtype=dtype).element_size()
        logits = AotTensor(dtype)
        for n_cols in _aot_vocab_sizes():
            for temperature in (1.0, 0.7):
                for entropy in (None, stats_out):
                    for active in (None, AotTensor(torch.bool)):
                        args, meta = _stats_launch(
                            logits, n_cols, n_cols, stats_out, stats_out, entropy, active,
                            temperature, None,
                        )  # fmt: skip
                        block = meta["BLOCK_V"]
                        switches = "/".join(
                            [
                                "T=1" if meta["UNIT_TEMPERATURE"] else "T!=1",
                                "entropy" if meta["WITH_ENTROPY"] else "no-entropy",
                                "active" if meta["HAS_ACTIVE"] else "all-rows",
                            ]
                        )
                        records.append(
                            launch_variant(
                                "row_stats",
                                f"{label}/{switches}/BLOCK_V={block}/w{meta['num_warps']}"
                                f"/{_vocab_class(n_cols)}",
                                label,
                                _row_stats_kernel,
                                args,
                                meta,
                                [HotLoop("stats", size, block)],
                            )
                        )
            args, meta = _grad_launch(
                logits, n_cols, logits, n_cols, n_cols, AotTensor(torch.int64), stats_out,
                stats_out, 1.0, None,
            )  # fmt: skip
            block = meta["BLOCK_V"]
            records.append(
                launch_variant(
                    "row_grad",
                    f"{label}/BLOCK_V={block}/w{meta['num_warps']}/{_vocab_class(n_cols)}",
                    label,
                    _row_grad_kernel,
                    args,
                    meta,
                    # Rows with coefficient 0 only write zeros; the others read and write.
                    [
                        HotLoop("zero-fill", size, block, ordinal=0),
                        HotLoop("gradient", 2 * size, block, ordinal=1),
                    ],
                )
            )
    return dedupe(records)
