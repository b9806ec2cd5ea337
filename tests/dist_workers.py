"""Worker processes for the multi-process tests (gloo on CPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from gft_kernels._options import LOSS_AGG_MODES

MODES = LOSS_AGG_MODES


def rank_environment(rank: int, world: int, port: int) -> None:
    """The variables transformers and accelerate read to detect distributed training (the
    process group itself is initialised by the worker), and one torch thread per rank."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def shard_bounds(vocab: int, world: int):
    """Uneven contiguous blocks: rank r gets a share growing with r."""
    weights = list(range(1, world + 1))
    cuts = [0]
    for w in weights:
        cuts.append(cuts[-1] + vocab * w // sum(weights))
    cuts[-1] = vocab
    return cuts


def make_inputs(seed: int = 0, batch: int = 3, seq: int = 4, hidden: int = 8, vocab: int = 23):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * 0.5
    b = torch.randn(vocab, generator=gen)
    logits = torch.randn(batch, seq, vocab, generator=gen) * 2
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    targets[0, 1] = -100
    mask = torch.ones(batch, seq)
    mask[-1] = 0  # a fully masked sequence
    adv = torch.randn(batch, generator=gen)
    return dict(h=h, w=w, b=b, logits=logits, targets=targets, mask=mask, adv=adv)


def loss_options(mode: str, backend: str) -> dict:
    """The loss settings of the vocab-parallel comparison, for aggregation ``mode``."""
    return dict(tau=0.3, temperature=0.7, loss_agg_mode=mode, backend=backend)


def upstream_gradient(loss: torch.Tensor) -> torch.Tensor:
    """The gradient both sides of the comparison backpropagate: 1 for a scalar loss, a ramp
    from -1 to 1 over the elements of an unreduced one (each element weighted differently)."""
    if loss.dim() == 0:
        return torch.ones_like(loss)
    return torch.linspace(-1, 1, loss.numel()).reshape(loss.shape)


def _init(rank: int, world: int, init_file: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)


def _finish():
    # Every rank leaves together: a rank that tears gloo down while a peer still holds the
    # connection can make the peer abort (seen as an occasional SIGABRT).
    dist.barrier()
    dist.destroy_process_group()


def vocab_parallel_worker(rank: int, world: int, init_file: str, out_dir: str, backend: str):
    from gft_kernels import fused_linear_gft_loss, gft_loss

    _init(rank, world, init_file)
    x = make_inputs()
    cuts = shard_bounds(x["logits"].shape[-1], world)
    cols = slice(cuts[rank], cuts[rank + 1])
    results = {}
    for mode in MODES:
        kw = dict(loss_options(mode, backend), process_group=dist.group.WORLD)
        z = x["logits"][..., cols].clone().requires_grad_(True)
        loss, stats = gft_loss(z, x["targets"], x["adv"], x["mask"], return_stats=True, **kw)
        upstream = upstream_gradient(loss)
        (loss * upstream).sum().backward()
        results[("logits", mode)] = dict(
            loss=loss.detach(), grad=z.grad, entropy=stats.entropy, logprobs=stats.logprobs
        )
        h = x["h"].clone().requires_grad_(True)
        w = x["w"][cols].clone().requires_grad_(True)
        b = x["b"][cols].clone().requires_grad_(True)
        loss = fused_linear_gft_loss(
            h, w, x["targets"], x["adv"], x["mask"], bias=b, chunk_size=5, **kw
        )
        (loss * upstream).sum().backward()
        results[("linear", mode)] = dict(loss=loss.detach(), h=h.grad, w=w.grad, b=b.grad)
    torch.save(dict(cuts=cuts, results=results), os.path.join(out_dir, f"rank{rank}.pt"))
    _finish()


def blockwise_vocab_parallel_worker(
    rank: int, world: int, init_file: str, out_dir: str, backend: str
):
    """The fused head of :func:`vocab_parallel_worker` with ``head="blockwise"`` (Triton:
    the interpreter on CPU, as the parent process sets it)."""
    from gft_kernels import fused_linear_gft_loss

    _init(rank, world, init_file)
    x = make_inputs()
    cuts = shard_bounds(x["logits"].shape[-1], world)
    cols = slice(cuts[rank], cuts[rank + 1])
    results = {}
    for mode in MODES:
        kw = dict(loss_options(mode, backend), process_group=dist.group.WORLD)
        h = x["h"].clone().requires_grad_(True)
        w = x["w"][cols].clone().requires_grad_(True)
        b = x["b"][cols].clone().requires_grad_(True)
        loss = fused_linear_gft_loss(
            h, w, x["targets"], x["adv"], x["mask"], bias=b, head="blockwise", **kw
        )
        (loss * upstream_gradient(loss)).sum().backward()
        results[("linear", mode)] = dict(loss=loss.detach(), h=h.grad, w=w.grad, b=b.grad)
    torch.save(dict(cuts=cuts, results=results), os.path.join(out_dir, f"rank{rank}.pt"))
    _finish()


def ddp_worker(rank: int, world: int, init_file: str, out_dir: str, backend: str):
    """Each rank holds half the sequences; DDP averages the gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gft_kernels import gft_loss
    from gft_kernels.distributed import global_num_tokens

    _init(rank, world, init_file)
    x = make_inputs(batch=4)
    head = torch.nn.Linear(8, 23)
    torch.manual_seed(1)
    head.load_state_dict({k: torch.randn_like(v) for k, v in head.state_dict().items()})
    model = DDP(head)
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    targets, mask = x["targets"][rows], x["mask"][rows]
    # Uneven token counts per rank (the masked sequence is on the last rank).
    num_tokens = global_num_tokens(targets, mask)
    logits = model(x["h"][rows])
    loss = gft_loss(logits, targets, x["adv"][rows], mask, num_tokens=num_tokens, backend=backend)
    loss.backward()
    torch.save(
        dict(
            weight=head.weight.grad,
            bias=head.bias.grad,
            state=head.state_dict(),
            num_tokens=num_tokens,
        ),
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    _finish()
