"""Vocab-parallel GFT loss across processes, checked against one process.

    torchrun --standalone --nproc_per_node 2 integration/examples/vocab_parallel.py

Each rank holds a contiguous block of the lm_head's rows (the blocks may differ in size);
hidden states, targets and advantages are replicated, as in Megatron-style tensor
parallelism. The loss and ``dh`` match the single-process values on every rank, and each
rank's ``dW`` block matches the matching rows of the full ``dW``. Runs on CPU (gloo) or one
GPU per rank (nccl).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from gft_kernels import fused_linear_gft_loss, group_advantages


def main() -> None:
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else "cpu"

    gen = torch.Generator().manual_seed(0)  # identical inputs on every rank
    groups, group_size, seq, hidden_size, vocab = 2, 4, 16, 64, 1000
    batch = groups * group_size
    hidden = torch.randn(batch, seq, hidden_size, generator=gen).to(device)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.5).to(device)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    rewards = torch.rand(batch, generator=gen).to(device)
    advantages = group_advantages(rewards, group_size=group_size)

    # Uneven contiguous blocks: rank r holds a share proportional to r + 1.
    shares = [r + 1 for r in range(world)]
    bounds = [vocab * sum(shares[:r]) // sum(shares) for r in range(world + 1)]
    rows = slice(bounds[rank], bounds[rank + 1])

    h = hidden.clone().requires_grad_(True)
    w = weight[rows].clone().requires_grad_(True)
    loss = fused_linear_gft_loss(h, w, targets, advantages, process_group=dist.group.WORLD)
    loss.backward()

    h_full = hidden.clone().requires_grad_(True)
    w_full = weight.clone().requires_grad_(True)
    loss_full = fused_linear_gft_loss(h_full, w_full, targets, advantages)
    loss_full.backward()

    ok = (
        torch.allclose(loss, loss_full, rtol=1e-5, atol=1e-7)
        and torch.allclose(h.grad, h_full.grad, rtol=1e-4, atol=1e-7)
        and torch.allclose(w.grad, w_full.grad[rows], rtol=1e-4, atol=1e-7)
    )
    print(
        f"rank {rank}/{world}: vocab rows [{rows.start}, {rows.stop}) loss {loss.item():.6f} "
        f"single-process {loss_full.item():.6f} gradients match: {ok}",
        flush=True,
    )
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
