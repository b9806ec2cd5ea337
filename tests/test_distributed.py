"""Multi-process tests (gloo on CPU): vocab-parallel heads and data-parallel token counts."""

import pytest
import torch
import torch.multiprocessing as mp

from gft_kernels import fused_linear_gft_loss, gft_loss
from tests import dist_workers as workers

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not torch.distributed.is_available(), reason="torch.distributed is not built"
    ),
]


def spawn(fn, world, tmp_path, backend):
    init_file = str(tmp_path / "init")
    mp.spawn(fn, args=(world, init_file, str(tmp_path), backend), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_single_process(world, tmp_path):
    ranks = spawn(workers.vocab_parallel_worker, world, tmp_path, "torch")
    x = workers.make_inputs()
    cuts = ranks[0]["cuts"]
    assert len(set(cuts[r + 1] - cuts[r] for r in range(world))) > 1, "shards must be uneven"
    for mode in workers.MODES:
        kw = workers.loss_options(mode, "torch")
        z = x["logits"].clone().requires_grad_(True)
        loss, stats = gft_loss(z, x["targets"], x["adv"], x["mask"], return_stats=True, **kw)
        upstream = workers.upstream_gradient(loss)
        (loss * upstream).sum().backward()
        h = x["h"].clone().requires_grad_(True)
        w = x["w"].clone().requires_grad_(True)
        b = x["b"].clone().requires_grad_(True)
        lin = fused_linear_gft_loss(h, w, x["targets"], x["adv"], x["mask"], bias=b, **kw)
        (lin * upstream).sum().backward()
        valid = (x["targets"] != -100) & x["mask"].bool()
        for r, out in enumerate(ranks):
            cols = slice(cuts[r], cuts[r + 1])
            got = out["results"][("logits", mode)]
            close(got["loss"], loss.detach(), f"{mode} loss rank {r}")
            close(got["grad"], z.grad[..., cols], f"{mode} logits grad rank {r}")
            close(got["entropy"][valid], stats.entropy[valid], f"{mode} entropy rank {r}")
            close(got["logprobs"][valid], stats.logprobs[valid], f"{mode} logprobs rank {r}")
            got = out["results"][("linear", mode)]
            close(got["loss"], lin.detach(), f"{mode} fused loss rank {r}")
            close(got["h"], h.grad, f"{mode} hidden grad rank {r}")
            close(got["w"], w.grad[cols], f"{mode} weight grad rank {r}")
            close(got["b"], b.grad[cols], f"{mode} bias grad rank {r}")


def test_vocab_parallel_blockwise_head_matches_single_process(tmp_path):
    """The blockwise head on vocabulary shards (uneven, one of them a partial tile): the
    statistics combine across ranks, dh is summed, dW and db stay local."""
    world = 3
    ranks = spawn(workers.blockwise_vocab_parallel_worker, world, tmp_path, "triton")
    x = workers.make_inputs()
    cuts = ranks[0]["cuts"]
    for mode in workers.MODES:
        h = x["h"].clone().requires_grad_(True)
        w = x["w"].clone().requires_grad_(True)
        b = x["b"].clone().requires_grad_(True)
        kw = workers.loss_options(mode, "torch")
        lin = fused_linear_gft_loss(h, w, x["targets"], x["adv"], x["mask"], bias=b, **kw)
        (lin * workers.upstream_gradient(lin)).sum().backward()
        for r, out in enumerate(ranks):
            cols = slice(cuts[r], cuts[r + 1])
            got = out["results"][("linear", mode)]
            close(got["loss"], lin.detach(), f"{mode} fused loss rank {r}")
            close(got["h"], h.grad, f"{mode} hidden grad rank {r}")
            close(got["w"], w.grad[cols], f"{mode} weight grad rank {r}")
            close(got["b"], b.grad[cols], f"{mode} bias grad rank {r}")


def test_ddp_global_token_mean_matches_single_process(tmp_path):
    ranks = spawn(workers.ddp_worker, 2, tmp_path, "torch")
    x = workers.make_inputs(batch=4)
    head = torch.nn.Linear(8, 23)
    head.load_state_dict(ranks[0]["state"])
    loss = gft_loss(head(x["h"]), x["targets"], x["adv"], x["mask"], backend="torch")
    loss.backward()
    valid = ((x["targets"] != -100) & x["mask"].bool()).sum().item()
    assert ranks[0]["num_tokens"] == ranks[1]["num_tokens"] == valid / 2
    for out in ranks:
        close(out["weight"], head.weight.grad, "DDP weight grad")
        close(out["bias"], head.bias.grad, "DDP bias grad")


def test_readme_distributed_command_runs():
    """The README's torchrun command: every rank reports matching gradients."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "integration/examples/vocab_parallel.py",
    ]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("gradients match: True") == 2, proc.stdout
    assert (
        "torchrun --standalone --nproc_per_node 2 integration/examples/vocab_parallel.py"
        in (root / "README.md").read_text()
    )
