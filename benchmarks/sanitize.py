"""``python -m benchmarks.sanitize``: a few launches of every Triton kernel, small shapes,
for ``compute-sanitizer --tool memcheck`` (``make gpu-check`` step 4).

Each launch family the wrappers have: the fused token pass with and without the gradient
written in the pass, the split-row path (column segments and the standalone gradient
rows), 16-bit and fp32 logits, an odd vocabulary at an unaligned base (a view one column
into a wider buffer), temperature != 1 with a soft-cap, and the fused linear head. A
memory error in any of them makes the sanitizer's exit status non-zero; the losses are
checked against the fp64 reference so that a launch that silently did nothing fails too.
"""

from __future__ import annotations

import sys

import torch

from gft_kernels import fused_linear_gft_loss, gft_loss
from gft_kernels.reference import gft_loss_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(n: int, vocab: int, dtype: torch.dtype, offset: int):
    gen = torch.Generator(device="cpu").manual_seed(n + vocab)
    wide = torch.randn(n, vocab + offset, generator=gen).mul_(3.0)
    logits = wide.to(device=DEVICE, dtype=dtype)[:, offset:]  # unaligned base when offset
    targets = torch.randint(0, vocab, (n,), generator=gen).to(DEVICE)
    advantages = torch.randn(n, generator=gen).to(DEVICE)
    mask = (torch.rand(n, generator=gen) > 0.1).to(DEVICE)
    return logits, targets, advantages, mask


def check_logits_level() -> int:
    failures = 0
    # (rows, vocabulary, dtype, column offset, options): many rows take the token pass,
    # four rows the split-row path.
    cases = [
        (256, 50257, torch.bfloat16, 1, {}),
        (256, 50257, torch.bfloat16, 0, {"temperature": 0.7, "logit_softcap": 30.0}),
        (256, 32000, torch.float32, 0, {"temperature": 1.3}),
        (4, 151936, torch.float16, 1, {"logit_softcap": 200.0}),
        (4, 151936, torch.bfloat16, 0, {}),
    ]
    for n, vocab, dtype, offset, options in cases:
        logits, targets, advantages, mask = _inputs(n, vocab, dtype, offset)
        z = logits.double()
        cap = options.get("logit_softcap")
        z = cap * torch.tanh(z / cap) if cap else z
        reference_options = {k: v for k, v in options.items() if k != "logit_softcap"}
        expected = gft_loss_reference(z, targets, advantages, mask, **reference_options).item()
        for inplace in (False, True):
            leaf = logits.detach().clone().requires_grad_()
            # In place, the gradient is written into the loss's input: a copy of the leaf.
            loss = gft_loss(
                leaf * 1 if inplace else leaf,
                targets,
                advantages,
                mask,
                backend="triton",
                inplace_backward=inplace,
                **options,
            )
            loss.backward()
            ok = abs(loss.item() - expected) <= 2e-2 * max(1.0, abs(expected))
            ok = ok and bool(torch.isfinite(leaf.grad).all())
            failures += not ok
            print(
                f"gft_loss {dtype} N={n} V={vocab} {options} inplace={inplace}: "
                f"{loss.item():.6f} vs {expected:.6f} {'ok' if ok else 'WRONG'}"
            )
    return failures


def check_fused_head() -> int:
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch, seq, hidden, vocab = 4, 64, 96, 5003
    h = torch.randn(batch, seq, hidden, generator=gen).to(DEVICE, torch.bfloat16)
    weight = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(DEVICE, torch.bfloat16)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen).to(DEVICE)
    advantages = torch.randn(batch, generator=gen).to(DEVICE)
    mask = torch.ones(batch, seq, dtype=torch.bool, device=DEVICE)
    h.requires_grad_()
    weight.requires_grad_()
    loss = fused_linear_gft_loss(h, weight, targets, advantages, mask, backend="triton")
    loss.backward()
    logits = (h.detach().double() @ weight.detach().double().T).view(-1, vocab)
    per_token = advantages.repeat_interleave(seq)
    expected = gft_loss_reference(logits, targets.view(-1), per_token, mask.view(-1)).item()
    ok = abs(loss.item() - expected) <= 2e-2 * max(1.0, abs(expected))
    print(
        f"fused_linear_gft_loss bf16: {loss.item():.6f} vs {expected:.6f} {'ok' if ok else 'WRONG'}"
    )
    return int(not ok)


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks.sanitize: needs a CUDA device", file=sys.stderr)
        return 2
    failures = check_logits_level() + check_fused_head()
    torch.cuda.synchronize()
    print("sanitize launches:", "ok" if not failures else f"{failures} WRONG")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
