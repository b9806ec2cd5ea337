"""Static model of the fused head on a GPU: HBM traffic per token and time against the three
bare GEMMs, for the ``chunked`` and ``blockwise`` head strategies.

``python -m benchmarks.head_traffic`` prints the tables of ``benchmarks/RESULTS.md``
(bf16, ``V = 151936``, ``N = 16384``, ``H`` = 1536, 3584, 4096; H200 and H100 figures).

Each strategy is a sequence of passes; a pass costs ``max(flops / tensor peak, bytes /
HBM bandwidth)`` (a roofline: the pass is as fast as its binding resource allows, at data
sheet peaks) and the passes add. What the model counts:

* bare GEMMs: ``z = h W^T`` (writes ``N x V``), ``dh = G W`` and ``dW = G^T h`` (each reads
  ``N x V``; ``dW`` written in fp32), the least a head built on GEMMs moves;
* ``chunked``: per chunk of ``C`` tokens the logits GEMM, the row pass (reads the chunk's
  logits, writes the gradient in place), ``dh`` and ``dW`` (adds into the fp32 ``dW``:
  read and written per chunk), with ``C`` from the 1 GiB CUDA budget;
* ``blockwise``: the statistics pass (one product), the gradient pass (the product again,
  and ``dh``, ``dW`` on the kept share ``kept`` of tiles: gradient filtering) and, in the
  deterministic mode, one more product; HBM traffic is each operand once (tiles reused
  from shared memory and L2) plus the fp32 sums.

What it does not count, so that its times are lower bounds: the exponentials and the
transform (MUFU and FMA work beside the tensor cores: one or two exponentials per logit,
hidden under the product at ``H`` >= 1536 by the row kernels' counts), L2 misses when
``W`` or ``h`` tiles are re-read (``W`` is read once per token block if L2 cannot hold it:
up to ``N / BLOCK_M`` times), pipeline latency and occupancy. The atomic adds of the fast
gradient mode (``dh`` and ``dW`` in fp32, once per kept tile pair) are resolved in L2; their
volume is printed beside the time, not in it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

VOCAB = 151936
TOKENS = 16384
HIDDEN_SIZES = (1536, 3584, 4096)
ELEMENT = 2  # bf16
F32 = 4
CHUNK_BYTES = 1 << 30  # the chunked head's CUDA budget (gft_kernels._head)
BLOCK_M, BLOCK_N = 64, 128  # the blockwise gradient kernel's 16-bit tiles


@dataclass(frozen=True)
class Card:
    name: str
    tensor_flops: float  # dense bf16, data sheet
    hbm_bytes_per_s: float


H100 = Card("H100 SXM", 989e12, 3.35e12)
H200 = Card("H200", 989e12, 4.8e12)


@dataclass(frozen=True)
class Pass:
    name: str
    flops: float
    hbm_bytes: float
    l2_atomic_bytes: float = 0.0

    def seconds(self, card: Card) -> float:
        return max(self.flops / card.tensor_flops, self.hbm_bytes / card.hbm_bytes_per_s)


def bare_gemms(n: int, h: int, v: int) -> List[Pass]:
    product = 2.0 * n * v * h
    return [
        Pass("z = h W^T", product, (n * h + v * h + n * v) * ELEMENT),
        Pass("dh = G W", product, (n * v + v * h + n * h) * ELEMENT),
        Pass("dW = G^T h", product, (n * v + n * h) * ELEMENT + v * h * F32),
    ]


def chunk_tokens(n: int, v: int) -> int:
    """Tokens per chunk of the chunked head (equal chunks within the budget)."""
    step = max(1, min(n, CHUNK_BYTES // (v * ELEMENT)))
    chunks = -(-n // step)
    return -(-n // chunks)


def chunked(n: int, h: int, v: int) -> List[Pass]:
    c = chunk_tokens(n, v)
    chunks = -(-n // c)
    product = 2.0 * n * v * h
    weight_reads = chunks * v * h * ELEMENT
    return [
        Pass("logits GEMM", product, (n * h + n * v) * ELEMENT + weight_reads),
        Pass("row pass", 0.0, 2 * n * v * ELEMENT),
        Pass("dh = G W", product, (n * v + n * h) * ELEMENT + weight_reads),
        # The first chunk writes dW, every later one reads and writes it (fp32).
        Pass("dW += G^T h", product, (n * v + n * h) * ELEMENT + (2 * chunks - 1) * v * h * F32),
    ]


def blockwise(n: int, h: int, v: int, kept: float = 1.0, deterministic: bool = False) -> List[Pass]:
    product = 2.0 * n * v * h
    operands = (n * h + v * h) * ELEMENT
    tile_pairs = kept * -(-n // BLOCK_M) * -(-v // BLOCK_N)
    atomics = 0.0 if deterministic else tile_pairs * (BLOCK_M + BLOCK_N) * h * F32 * 2
    # dh leaves through the fp32 scratch (written, read, rounded to bf16), dW in fp32.
    sums = n * h * (2 * F32 + ELEMENT) + v * h * F32
    passes = [
        Pass("statistics", product, operands),
        Pass("gradient", product * (1 + 2 * kept), operands + sums, atomics),
    ]
    if deterministic:
        passes.insert(1, Pass("recompute (ordered sums)", product, operands))
    return passes


def total(passes: Sequence[Pass], card: Card) -> float:
    return sum(p.seconds(card) for p in passes)


STRATEGIES: Tuple[Tuple[str, dict], ...] = (
    ("chunked", {}),
    ("blockwise, no tile skipped", dict(kept=1.0)),
    ("blockwise, 25% of tiles kept", dict(kept=0.25)),
    ("blockwise, 5% of tiles kept", dict(kept=0.05)),
    ("blockwise deterministic, no tile skipped", dict(kept=1.0, deterministic=True)),
)


def strategy_passes(name: str, options: dict, n: int, h: int, v: int) -> List[Pass]:
    return chunked(n, h, v) if name == "chunked" else blockwise(n, h, v, **options)


def traffic_table(n: int = TOKENS, v: int = VOCAB, sizes: Sequence[int] = HIDDEN_SIZES) -> str:
    lines = [
        f"HBM bytes per token, bf16, V = {v}, N = {n} (each operand once, fp32 sums):",
        "",
        "| H | bare GEMMs | chunked | blockwise | blockwise L2 atomics (no tile skipped) |",
        "|---|---|---|---|---|",
    ]
    for h in sizes:
        per_token = [
            sum(p.hbm_bytes for p in passes) / n / 1e3
            for passes in (bare_gemms(n, h, v), chunked(n, h, v), blockwise(n, h, v))
        ]
        atomics = sum(p.l2_atomic_bytes for p in blockwise(n, h, v)) / n / 1e6
        lines.append(
            f"| {h} | {per_token[0]:.0f} KB | {per_token[1]:.0f} KB | {per_token[2]:.1f} KB "
            f"| {atomics:.1f} MB |"
        )
    return "\n".join(lines)


def time_table(
    card: Card, n: int = TOKENS, v: int = VOCAB, sizes: Sequence[int] = HIDDEN_SIZES
) -> str:
    lines = [
        f"Expected fwd+bwd time over the three bare GEMMs, {card.name} "
        f"({card.tensor_flops / 1e12:.0f} TFLOP/s bf16 dense, "
        f"{card.hbm_bytes_per_s / 1e12:.2f} TB/s), bf16, V = {v}, N = {n}:",
        "",
        "| strategy | " + " | ".join(f"H = {h}" for h in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    gemm = {h: total(bare_gemms(n, h, v), card) for h in sizes}
    lines.append("| bare GEMMs (ms) | " + " | ".join(f"{gemm[h] * 1e3:.1f}" for h in sizes) + " |")
    for name, options in STRATEGIES:
        ratios = [total(strategy_passes(name, options, n, h, v), card) / gemm[h] for h in sizes]
        lines.append(f"| {name} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    args = parser.parse_args(argv)
    print(traffic_table(args.tokens, args.vocab))
    for card in (H200, H100):
        print()
        print(time_table(card, args.tokens, args.vocab))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
