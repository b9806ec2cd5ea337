"""torch.compile with option values that change between calls, ``inplace_backward`` under
``fullgraph``, the custom ops' fake implementations (``opcheck`` over layouts, Inductor),
and torch.func transforms."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

from gft_kernels import fused_linear_gft_loss, gft_loss
from gft_kernels._token_loss_op import token_loss, token_loss_backward, token_loss_backward_
from gft_kernels.fused_linear import fused_linear_loss, fused_linear_loss_backward
from tests.helpers import BACKENDS, device_for, make_case, reference_fp64

B, T, H, V = 2, 4, 6, 11


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def inputs(backend):
    """Logits, a head stored as an ``(H, V)`` parameter (passed transposed, as a model
    whose lm_head keeps that layout would), a bias and the token inputs."""
    dev = device_for(backend)
    logits, targets, adv, mask = make_case(B, T, V, device=dev)
    hidden = torch.randn(B, T, H, device=dev)
    head = torch.randn(H, V, device=dev) * 0.5
    bias = torch.randn(V, device=dev) * 0.1
    return logits, hidden, head, bias, targets, adv, mask


def all_entries(backend, targets, adv, mask):
    """One function through every entry: gft_loss, and the fused head by default, with
    stats and without compaction."""

    def fn(x, h, p, b, *args):
        extra = dict(zip(("num_tokens", "tau", "temperature"), args))
        fused = dict(backend=backend, bias=b, **extra)
        total = gft_loss(x, targets, adv, mask, backend=backend, **extra)
        total = total + fused_linear_gft_loss(h, p.t(), targets, adv, mask, **fused)
        loss, stats = fused_linear_gft_loss(
            h, p.t(), targets, adv, mask, return_stats=True, **fused
        )
        total = (
            total
            + loss
            + fused_linear_gft_loss(h, p.t(), targets, adv, mask, compact_tokens=False, **fused)
        )
        return total, stats.entropy

    return fn


def run_with_grads(fn, tensors, *args):
    """``(loss, [grads], extra outputs)`` of ``fn`` on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves, *args)
    loss, extra = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
    loss.backward()
    return loss.detach(), [t.grad for t in leaves], [e.detach() for e in extra]


def reference_total(x, h, p, b, targets, adv, mask, **kw):
    """The fp64 reference of :func:`all_entries`'s loss."""
    cpu = [t.detach().cpu().double() for t in (x, h, p, b)]
    t_, a_, m_ = targets.cpu(), adv.cpu(), mask.cpu()
    head_logits = cpu[1] @ cpu[2] + cpu[3]
    return reference_fp64(cpu[0], t_, a_, m_, **kw) + 3 * reference_fp64(
        head_logits, t_, a_, m_, **kw
    )


def assert_matches(got, want, what):
    """Compiled against eager: the loss, every gradient and every extra output."""
    for a, b in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_step_num_tokens_does_not_recompile(backend):
    """A new ``num_tokens`` every step (as from ``global_num_tokens()``): a Python float
    recompiles once (dynamo makes a number dynamic on its second value) and never
    after, a 0-dim tensor never; the values match eager and the fp64 reference (the
    float used to fail on ``math.isnan`` of a symbolic float)."""
    x, h, p, b, targets, adv, mask = inputs(backend)
    fn = all_entries(backend, targets, adv, mask)
    for kind, frames in (("float", 2), ("tensor", 1)):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(fn, backend=counter, fullgraph=True)
        for step, count in enumerate([37.0, 12.5, 3.0]):
            n = torch.tensor(count, device=x.device) if kind == "tensor" else count
            with torch._dynamo.config.patch(error_on_recompile=step >= 2):
                got = run_with_grads(compiled, (x, h, p, b), n)
            if step != 1:  # the first graph and the dynamic one (eager is slow on triton)
                assert_matches(got, run_with_grads(fn, (x, h, p, b), n), f"{kind} {count}")
            ref = reference_total(x, h, p, b, targets, adv, mask, num_tokens=count)
            torch.testing.assert_close(got[0].double().cpu(), ref, rtol=1e-5, atol=1e-5)
        assert counter.frame_count == frames, kind


@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_tau_and_temperature_never_break_fullgraph(backend):
    """tau and temperature reach the kernels as constants (one graph per value is
    allowed) but no value may break ``fullgraph`` (the second value used to)."""
    x, h, p, b, targets, adv, mask = inputs(backend)
    fn = all_entries(backend, targets, adv, mask)
    compiled = torch.compile(fn, backend=CompileCounter(), fullgraph=True)
    for tau, temperature in [(0.1, 1.0), (0.3, 0.7), (0.05, 1.3)]:
        got = run_with_grads(compiled, (x, h, p, b), None, tau, temperature)
        want = run_with_grads(fn, (x, h, p, b), None, tau, temperature)
        assert_matches(got, want, f"tau={tau}, temperature={temperature}")
        ref = reference_total(x, h, p, b, targets, adv, mask, tau=tau, temperature=temperature)
        torch.testing.assert_close(got[0].double().cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_inplace_backward_on_the_causal_shift(backend):
    """``inplace_backward=True`` traces without a graph break (the overlap check is plain
    arithmetic on sizes and strides) on ``logits[:, :-1]``, and the head's gradients
    match the fp64 reference."""
    x, h, p, b, targets, adv, mask = inputs(backend)

    def fn(h, p, n):
        logits = torch.cat([h, h[:, :1]], dim=1) @ p
        return gft_loss(
            logits[:, :-1], targets, adv, mask, backend=backend, inplace_backward=True, num_tokens=n
        )

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for count in (9.0, 4.0):
        loss, (grad_h, grad_p), _ = run_with_grads(compiled, (h, p), count)
        h64, p64 = (t.detach().cpu().double().requires_grad_(True) for t in (h, p))
        ref = reference_fp64(h64 @ p64, targets.cpu(), adv.cpu(), mask.cpu(), num_tokens=count)
        ref.backward()
        torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_h.double().cpu(), h64.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad_p.double().cpu(), p64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_inductor_fullgraph_with_a_transposed_head_and_inplace_backward():
    """Inductor trusts the fakes' strides (it asserts them): the fused head's gradient of a
    weight passed as ``.t()`` used to come back with other strides than the fake's."""
    backend = "cpu"
    x, h, p, b, targets, adv, mask = inputs(backend)

    def fn(x, h, p, b, n):
        total = fused_linear_gft_loss(h, p.t(), targets, adv, mask, bias=b, backend=backend)
        total = total + fused_linear_gft_loss(
            h, p.t(), targets, adv, mask, backend=backend, compact_tokens=False, num_tokens=n
        )
        return total + gft_loss(x * 1, targets, adv, mask, backend=backend, inplace_backward=True)

    compiled = torch.compile(fn, backend="inductor", fullgraph=True)
    n = torch.tensor(7.0)
    got = run_with_grads(compiled, (x, h, p, b), n)
    assert_matches(got, run_with_grads(fn, (x, h, p, b), n), "inductor")


def op_layouts(layout, device):
    """The fused op's ``(hidden, weight, bias)`` and the token op's logits for a layout
    (made on the device: moving a strided view would make it contiguous)."""
    n = B * T

    def randn(*shape):
        return torch.randn(*shape, device=device)

    hidden, weight, bias, logits = randn(n, H), randn(V, H) * 0.5, None, randn(n, V)
    if layout == "transposed_weight":
        weight = randn(H, V).t()
    elif layout == "sliced_hidden":
        hidden = randn(n, 2 * H)[:, 1 : H + 1]
        logits = randn(n, V + 5)[:, 2 : V + 2]
    elif layout == "bias":
        weight, bias = randn(H, V).t(), randn(2 * V)[::2]
    return hidden, weight, bias, logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_over_layouts(backend):
    """``torch.library.opcheck`` (schema, autograd registration, fake tensors against the
    real op's sizes and strides, AOT dispatch) for every custom op, over input layouts
    (a transposed weight or a strided bias used to get a fake gradient of other strides)."""
    for layout in ("contiguous", "transposed_weight", "sliced_hidden", "bias"):
        opcheck_layout(backend, layout)


def opcheck_layout(backend, layout):
    dev = device_for(backend)
    hidden, weight, bias, logits = op_layouts(layout, dev)
    _, targets, adv, mask = make_case(B, T, V, per_token_adv=True, device=dev)
    targets, adv = targets.reshape(-1), adv.reshape(-1)
    mask = mask.reshape(-1).to(torch.uint8)
    weights = torch.rand(B * T, device=dev)

    def leaf(t):
        return None if t is None else t.detach().requires_grad_(True)

    # Compaction changes where dh comes from (a scatter, or a buffer like hidden); the
    # per-token form's gradients come from the backward op, whose fake is checked too.
    for reduced, compact in ((True, True), (True, False), (False, True)):
        args = (
            leaf(hidden),
            leaf(weight),
            leaf(bias),
            targets,
            adv,
            mask,
            weights if reduced else None,
            1,
            0.1,
            0.7,
            1.0,
            None,
            -100,
            not compact,
            True,
            True,
            bias is not None,
            compact,
            0,
            backend,
            "chunked",
        )
        # A reduced loss's backward scales the gradients it computed in the forward
        # (outputs of the op) in place, by design: no second V x H buffer in eager.
        # opcheck's AOT test compares the op's outputs after a backward, so it runs
        # on the per-token form; torch.compile of the reduced form is checked above.
        skip = ("test_aot_dispatch_dynamic",) if reduced else ()
        utils = tuple(u for u in torch.library._OPCHECK_DEFAULT_UTILS if u not in skip)
        torch.library.opcheck(fused_linear_loss, args, test_utils=utils)

    grad_tokens = torch.randn(B * T, device=dev)
    for compact in (True, False):
        options = (1, 0.1, 0.7, 1.0, None, -100, True, True, bias is not None, compact, 0)
        back = (hidden, weight, bias, targets, adv, mask, grad_tokens, *options)
        torch.library.opcheck(fused_linear_loss_backward, (*back, backend, "chunked"))

    if layout not in ("contiguous", "sliced_hidden"):
        return  # the logits-level ops see the same logits for the other layouts
    row = (targets, adv, mask, 1, 0.1, 0.7, 1.0, None, -100)
    for with_stats, inplace in ((True, False), (False, True)):
        args = (leaf(logits), *row, with_stats, backend, inplace)
        torch.library.opcheck(token_loss, args)
    out = token_loss(logits, *row, False, backend, False)
    grad_rows = torch.randn(B * T, device=dev)
    tail = (targets, out[4], out[5], grad_rows, out[6], 0.7, 1.0, None, backend)
    torch.library.opcheck(token_loss_backward, (logits, *tail))
    torch.library.opcheck(token_loss_backward_, (logits.clone(), *tail))


TRANSFORMS = {
    "grad": lambda f, x: torch.func.grad(f)(x),
    "jacrev": lambda f, x: torch.func.jacrev(f)(x),
    "vjp": lambda f, x: torch.func.vjp(f, x)[1](torch.tensor(1.0, device=x.device)),
    "jvp": lambda f, x: torch.func.jvp(f, (x,), (torch.ones_like(x),)),
}


def forward_ad(f, x):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        return f(fwAD.make_dual(x, torch.ones_like(x)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", [*TRANSFORMS, "forward_ad"])
def test_differentiating_function_transforms_raise_a_clear_error(backend, transform):
    """torch.func.grad failed deep in PyTorch (a message about ``setup_context``) and
    jvp silently returned a zero tangent: both now name the library and what to use."""
    x, h, p, b, targets, adv, mask = inputs(backend)
    apply = forward_ad if transform == "forward_ad" else TRANSFORMS[transform]
    for f, arg in [
        (lambda z: gft_loss(z, targets, adv, mask, backend=backend), x),
        (lambda w: fused_linear_gft_loss(h, w, targets, adv, mask, backend=backend), p.t()),
    ]:
        with pytest.raises(RuntimeError, match=r"gft_kernels\..*loss\.backward\(\)"):
            apply(f, arg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_matches_a_loop_and_refuses_inplace(backend):
    """vmap works (PyTorch runs the op once per example); ``inplace_backward`` under it is
    refused by name instead of as "logits that do not require grad"."""
    x, h, p, b, targets, adv, mask = inputs(backend)
    adv_tok = adv[:, None].expand(B, T).contiguous()

    def per_example(z, y, a, m):
        return gft_loss(z, y, a, m, backend=backend, tau=0.3)

    def per_example_fused(hh, y, a, m):
        return fused_linear_gft_loss(hh, p.t(), y, a, m, bias=b, backend=backend)

    for fn, first in ((per_example, x), (per_example_fused, h)):
        got = torch.func.vmap(fn)(first, targets, adv_tok, mask)
        want = torch.stack([fn(first[i], targets[i], adv_tok[i], mask[i]) for i in range(B)])
        torch.testing.assert_close(got, want)
    ref = torch.stack(
        [
            reference_fp64(x[i].cpu(), targets[i].cpu(), adv_tok[i].cpu(), mask[i].cpu(), tau=0.3)
            for i in range(B)
        ]
    )
    got = torch.func.vmap(per_example)(x, targets, adv_tok, mask)
    torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-5, atol=1e-6)

    z = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"gft_kernels\.gft_loss.*inplace_backward.*vmap"):
        torch.func.vmap(
            lambda zz, y, a, m: gft_loss(zz, y, a, m, backend=backend, inplace_backward=True)
        )(z * 1, targets, adv_tok, mask)
