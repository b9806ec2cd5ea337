"""Every bad input (docs/design.md, "Bad input") raises ValueError/TypeError naming the argument."""

import math

import pytest
import torch

from gft_kernels import gft_loss, group_advantages


def base():
    logits = torch.randn(2, 3, 11)
    targets = torch.randint(0, 11, (2, 3))
    adv = torch.randn(2)
    return logits, targets, adv


def call(**over):
    logits, targets, adv = base()
    args = dict(logits=logits, targets=targets, advantages=adv, backend="torch")
    args.update(over)
    return gft_loss(**args)


@pytest.mark.parametrize(
    "override, exc, words",
    [
        (dict(logits=[[1.0]]), TypeError, ["logits", "torch.Tensor"]),
        (dict(logits=torch.randn(11)), ValueError, ["logits", "2-D or 3-D", "(11,)"]),
        (dict(logits=torch.randn(2, 3, 11).long()), TypeError, ["logits", "int64"]),
        (dict(logits=torch.randn(2, 0, 11)), ValueError, ["logits", "at least one"]),
        (dict(targets=torch.randint(0, 11, (2, 4))), ValueError, ["targets", "(2, 3)", "(2, 4)"]),
        (dict(targets=torch.zeros(2, 3)), TypeError, ["targets", "integer", "float32"]),
        (dict(targets=torch.full((2, 3), 11)), ValueError, ["targets", "[0, 11)", "11"]),
        (dict(targets=torch.full((2, 3), -1)), ValueError, ["targets", "ignore_index", "-1"]),
        (dict(advantages=torch.randn(3)), ValueError, ["advantages", "(2,)", "(3,)"]),
        (dict(advantages=torch.tensor([1.0, math.nan])), ValueError, ["advantages", "finite"]),
        (dict(advantages=torch.tensor([1.0, math.inf])), ValueError, ["advantages", "finite"]),
        (dict(advantages=torch.tensor([1, 2])), TypeError, ["advantages", "floating"]),
        (dict(mask=torch.ones(2, 4)), ValueError, ["mask", "(2, 3)", "(2, 4)"]),
        (dict(mask=torch.full((2, 3), 0.5)), ValueError, ["mask", "0/1"]),
        (dict(tau=-0.1), ValueError, ["tau", ">= 0", "-0.1"]),
        (dict(tau=math.inf), ValueError, ["tau", "finite"]),
        (dict(tau="0.1"), TypeError, ["tau", "number", "str"]),
        (dict(temperature=0.0), ValueError, ["temperature", "> 0", "0.0"]),
        (dict(temperature=-1.0), ValueError, ["temperature", "> 0"]),
        (dict(temperature=math.nan), ValueError, ["temperature", "finite"]),
        (dict(temperature=math.inf), ValueError, ["temperature", "finite"]),
        (dict(loss_agg_mode="mean"), ValueError, ["loss_agg_mode", "token-mean", "'mean'"]),
        (dict(num_tokens=-1), ValueError, ["num_tokens", ">= 0", "-1.0"]),
        (dict(num_tokens=math.nan), ValueError, ["num_tokens", "finite"]),
        (dict(max_response_length=0), ValueError, ["max_response_length", "positive"]),
        (dict(max_response_length=2.5), TypeError, ["max_response_length", "int", "float"]),
        (dict(backend="cuda"), ValueError, ["backend", "auto", "'cuda'"]),
        (dict(return_stats=1), TypeError, ["return_stats", "bool"]),
        (dict(ignore_index=None), TypeError, ["ignore_index", "int"]),
    ],
)
def test_bad_input(override, exc, words):
    with pytest.raises(exc) as info:
        call(**override)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize(
    "mode", ["seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
)
def test_seq_mode_needs_3d(mode):
    with pytest.raises(ValueError, match="loss_agg_mode.*2-D"):
        gft_loss(
            torch.randn(4, 7),
            torch.randint(0, 7, (4,)),
            torch.randn(4),
            loss_agg_mode=mode,
            backend="torch",
        )


def test_per_sequence_advantages_need_3d():
    with pytest.raises(ValueError, match=r"advantages: expected shape \(4,\)"):
        gft_loss(torch.randn(4, 7), torch.randint(0, 7, (4,)), torch.randn(2), backend="torch")


def test_triton_rejects_fp64():
    with pytest.raises(TypeError, match="logits.*float64"):
        gft_loss(
            torch.randn(2, 5, dtype=torch.float64),
            torch.zeros(2, dtype=torch.long),
            torch.ones(2),
            backend="triton",
        )


def test_cpu_backend_rejects_cuda_like_device():
    meta = torch.randn(2, 5, device="meta")
    with pytest.raises(ValueError, match="backend: 'cpu' needs CPU tensors"):
        gft_loss(
            meta,
            torch.zeros(2, dtype=torch.long, device="meta"),
            torch.ones(2, device="meta"),
            backend="cpu",
        )


def test_bad_input_leaves_nothing_modified():
    logits, targets, adv = base()
    copies = [t.clone() for t in (logits, targets, adv)]
    with pytest.raises(ValueError):
        gft_loss(logits, targets, adv, tau=-1.0)
    for t, c in zip((logits, targets, adv), copies):
        assert torch.equal(t, c)


@pytest.mark.parametrize(
    "args, kwargs, exc, words",
    [
        ((torch.randn(4, 2),), dict(group_size=2), ValueError, ["rewards", "1-D", "(4, 2)"]),
        ((torch.randn(0),), dict(group_size=1), ValueError, ["rewards", "at least one"]),
        ((torch.tensor([1.0, math.nan]),), dict(group_size=2), ValueError, ["rewards", "finite"]),
        ((torch.randn(4),), {}, ValueError, ["group_ids/group_size", "neither"]),
        (
            (torch.randn(4), torch.zeros(4, dtype=torch.long)),
            dict(group_size=2),
            ValueError,
            ["both"],
        ),
        ((torch.randn(4),), dict(group_size=3), ValueError, ["group_size", "divisor", "3"]),
        ((torch.randn(4),), dict(group_size=0), ValueError, ["group_size"]),
        ((torch.randn(4),), dict(group_size=2.0), TypeError, ["group_size", "int"]),
        (
            (torch.randn(4), torch.zeros(3, dtype=torch.long)),
            {},
            ValueError,
            ["group_ids", "(4,)", "(3,)"],
        ),
        ((torch.randn(4), torch.zeros(4)), {}, TypeError, ["group_ids", "integer"]),
        ((torch.randn(4),), dict(group_size=2, eps=-1.0), ValueError, ["eps", ">= 0"]),
        ((torch.randn(4),), dict(group_size=2, norm_by_std=1), TypeError, ["norm_by_std", "bool"]),
    ],
)
def test_group_advantages_bad_input(args, kwargs, exc, words):
    with pytest.raises(exc) as info:
        group_advantages(*args, **kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value!s}"
