"""A backend registered by a user works everywhere a built-in one does: the losses, their
module forms and the integrations' configs read the live registry, with its devices and
dtypes."""

import pytest
import torch

import gft_kernels.backends as backends
from gft_kernels import FusedLinearGFTLoss, GFTLoss, fused_linear_gft_loss, gft_loss
from gft_kernels.backends.torch_rows import TorchRows
from tests.helpers import make_case, reference_fp64


class CountingRows(TorchRows):
    """The torch backend under another name, counting its row passes."""

    name = "counting"

    def __init__(self):
        self.calls = 0

    def token_pass(self, *args, **kwargs):
        self.calls += 1
        return super().token_pass(*args, **kwargs)


@pytest.fixture
def counting():
    rows = CountingRows()
    backends.register_backend(
        "counting", lambda required: rows, devices=("cpu",), dtypes=(torch.float32,)
    )
    yield rows
    backends._REGISTRY.pop("counting")
    backends._CACHE.pop("counting", None)


def test_registered_backend_runs_both_losses_and_their_modules(counting):
    logits, targets, adv, mask = make_case(2, 4, 9)
    ref = reference_fp64(logits.double(), targets, adv, mask)
    for loss in (
        gft_loss(logits, targets, adv, mask, backend="counting"),
        GFTLoss(backend="counting")(logits, targets, adv, mask),
    ):
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    hidden, weight = torch.randn(2, 4, 5), torch.randn(9, 5)
    ref = reference_fp64(hidden.double() @ weight.double().T, targets, adv, mask)
    for loss in (
        fused_linear_gft_loss(hidden, weight, targets, adv, mask, backend="counting"),
        FusedLinearGFTLoss(backend="counting")(hidden, weight, targets, adv, mask),
    ):
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert counting.calls >= 4
    assert "counting" in backends.backend_names()


def test_registered_backend_refuses_what_it_does_not_take(counting):
    logits, targets, adv, mask = make_case(2, 4, 9)
    with pytest.raises(TypeError, match=r"logits: backend 'counting' takes float32, got bfloat16"):
        gft_loss(logits.bfloat16(), targets, adv, mask, backend="counting")
    meta = torch.randn(2, 9, device="meta")
    with pytest.raises(ValueError, match=r"backend: 'counting' needs CPU tensors, got device"):
        gft_loss(
            meta,
            torch.zeros(2, dtype=torch.long, device="meta"),
            torch.ones(2, device="meta"),
            backend="counting",
        )


def test_integration_configs_accept_a_registered_backend(counting, tmp_path):
    from gft_kernels.integration.config import GFTConfig
    from gft_kernels.integration.trl import GFTGRPOConfig

    common = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert GFTConfig(gft_backend="counting", **common).gft_backend == "counting"
    assert GFTGRPOConfig(gft_backend="counting", bf16=False, **common).gft_backend == "counting"
    with pytest.raises(ValueError, match="gft_backend: expected one of auto, "):
        GFTConfig(gft_backend="nonesuch", **common)


def test_unknown_backend_lists_the_registered_names():
    with pytest.raises(ValueError, match=r"backend: expected one of auto, torch, cpu, triton"):
        GFTLoss(backend="nonesuch")


@pytest.mark.parametrize("name", ["", "auto", 3])
def test_register_backend_refuses_a_bad_name(name):
    with pytest.raises(ValueError, match="name: expected a non-empty backend name"):
        backends.register_backend(name, lambda required: None)


def test_backend_info_reads_the_registry(counting):
    assert backends.backend_info("counting").dtypes == (torch.float32,)
    assert torch.float64 not in backends.backend_info("triton").dtypes
    with pytest.raises(ValueError, match="backend: expected one of torch, cpu, triton"):
        backends.backend_info("auto")
