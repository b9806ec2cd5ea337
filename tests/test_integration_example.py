"""The tiny end-to-end example runs (--quick) from the repository root."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent


def test_train_tiny_quick():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the example runs like a user's script
    proc = subprocess.run(
        [sys.executable, "integration/examples/train_tiny.py", "--quick", "--backend", "torch"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "training GFT" in out and "training SFT" in out
    # GFT's metric line: loss, DCR share, entropy and the self samples' reward.
    assert "[gft] step" in out and "rectified_fraction=" in out and "reward/self=" in out
    header = next(line for line in out.splitlines() if line.split()[-2:] == ["GFT", "SFT"])
    table = out[out.index(header):]
    for row in ("final train loss", "held-out reward (greedy)", "held-out entropy"):
        line = next(line for line in table.splitlines() if line.startswith(row))
        numbers = [float(x) for x in line.split()[-2:]]  # one number per variant
        assert all(x == x for x in numbers), line


def test_readme_usage_runs(capsys):
    readme = ROOT / "integration" / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert blocks, "integration/README.md has no python example"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        namespace: dict = {}
        exec(compile(blocks[0], str(readme), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    log = namespace["trainer"].state.log_history[0]
    assert log["num_responses/self"] == 4  # 2 prompts x 2 self samples
    assert "'reward/expert'" in capsys.readouterr().out
    assert namespace["trainer"].model.config._attn_implementation == "sdpa"
