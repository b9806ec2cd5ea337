"""The README's usage example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    adv = namespace["adv"]
    assert [round(v, 4) for v in adv.tolist()] == [0.7071, -0.7071, 0.0, 0.0]
    assert namespace["hidden"].grad is not None and namespace["logits"].grad is not None
    assert "torch.Size([4, 16])" in capsys.readouterr().out
