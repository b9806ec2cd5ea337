"""Errors name the argument the caller gave (not an internal name, not an AttributeError)."""

import pytest
import torch

from gft_kernels import fused_linear_gft_loss, gft_loss


def _tokens(n=4, vocab=7):
    return torch.randint(0, vocab, (n,)), torch.randn(n)


@pytest.mark.parametrize("group", [object(), "world", 0])
def test_gft_loss_process_group_type_is_named(group):
    targets, adv = _tokens()
    with pytest.raises(TypeError, match=r"process_group: expected a torch\.distributed"):
        gft_loss(torch.randn(4, 7), targets, adv, backend="torch", process_group=group)


@pytest.mark.parametrize("group", [object(), "world"])
def test_fused_process_group_type_is_named(group):
    targets, adv = _tokens()
    with pytest.raises(TypeError, match=r"process_group: expected .* got (object|str)"):
        fused_linear_gft_loss(
            torch.randn(4, 5),
            torch.randn(7, 5),
            targets,
            adv,
            backend="torch",
            process_group=group,
        )


def test_fused_triton_fp64_refusal_names_hidden():
    targets, adv = _tokens()
    hidden = torch.randn(4, 5, dtype=torch.float64)
    weight = torch.randn(7, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"^hidden: backend 'triton' takes .* got float64"):
        fused_linear_gft_loss(hidden, weight, targets, adv, backend="triton")


def test_fused_weight_dtype_mismatch_names_weight():
    targets, adv = _tokens()
    with pytest.raises(TypeError, match=r"^weight: expected dtype torch\.float32"):
        fused_linear_gft_loss(
            torch.randn(4, 5), torch.randn(7, 5, dtype=torch.float64), targets, adv
        )


def test_gft_loss_triton_fp64_refusal_names_logits():
    targets, adv = _tokens()
    with pytest.raises(TypeError, match=r"^logits: backend 'triton' takes .* got float64"):
        gft_loss(torch.randn(4, 7, dtype=torch.float64), targets, adv, backend="triton")


def test_global_num_tokens_refuses_an_ignore_index_the_targets_cannot_hold():
    from gft_kernels.distributed import global_num_tokens

    targets = torch.tensor([1, -100, 3], dtype=torch.int32)
    # -2**32 - 100 wraps to -100 in int32: counting with it would silently ignore a token.
    with pytest.raises(ValueError, match=r"ignore_index: expected an int in \[-2147483648"):
        global_num_tokens(targets, ignore_index=-(2**32) - 100)
    assert global_num_tokens(targets) == 2.0
    with pytest.raises(TypeError, match="targets: expected an integer tensor"):
        global_num_tokens(targets.float())


def test_global_num_tokens_as_tensor_is_the_same_count_without_a_host_read():
    from gft_kernels.distributed import global_num_tokens

    targets = torch.tensor([[1, -100, 3], [2, 2, -100]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    as_float = global_num_tokens(targets, mask)
    as_tensor = global_num_tokens(targets, mask, as_tensor=True)
    assert isinstance(as_float, float) and as_float == 3.0
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.shape == ()
    assert as_tensor.item() == as_float
    empty = global_num_tokens(targets, torch.zeros_like(mask), as_tensor=True)
    assert empty.item() == 1.0  # an empty batch counts as one token: loss 0, not 0 / 0
    with pytest.raises(TypeError, match="as_tensor: expected a bool"):
        global_num_tokens(targets, as_tensor=1)
