"""The row-kernel contract (``gft_kernels.backends.base``) on every backend.

Each backend's ``token_pass``, ``partial_stats`` and ``row_grad`` are compared with fp64
PyTorch computed from the values actually stored in the inputs. The native kernel runs
twice, through its AVX2 loops and through its scalar loops (CPUs without AVX2), and must
build here: a build failure fails the fixture instead of skipping.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

from gft_kernels.backends import RowParams, backend_info, cpu_rows, load_backend
from gft_kernels.backends.torch_rows import accumulate_dtype
from tests.helpers import backend_variant

BACKENDS = ["torch", "cpu-simd", "cpu-scalar", "triton", "triton-split"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(1, 1), (3, 2), (5, 37), (4, 4099), (2, 20011)]


def combos(dtypes=DTYPES, shapes=SHAPES, params=None):
    """(backend, dtype, shape[, params]) cases that exist: the Triton interpreter is slow,
    so it gets the small shapes (and one set of params for the larger ones), and each
    backend gets the dtypes the registry says it takes (Triton: no fp64, refused with a
    TypeError, tested elsewhere)."""
    out = []
    for backend in BACKENDS:
        for dtype in dtypes:
            if dtype not in backend_info(backend.split("-")[0]).dtypes:
                continue
            for shape in shapes:
                interpreted = backend.startswith("triton")
                if backend == "triton-split" and shape[1] > 5000:
                    continue
                large = shape[1] > (1000 if backend == "triton-split" else 5000)
                for i, p in enumerate(params or [None]):
                    if interpreted and large and i > 0:
                        continue
                    case = (backend, dtype, shape) + ((p,) if params else ())
                    out.append(pytest.param(*case, id="-".join(map(_name, case))))
    return out


def _name(value) -> str:
    if isinstance(value, RowParams):
        return f"T{value.temperature}-cap{value.logit_softcap}-scale{value.logit_scale}"
    return str(value).replace("torch.", "")


class OnDevice:
    """A backend whose calls run on ``device`` (CUDA for Triton when present, so that the
    same tests check the compiled kernels there): CPU tensors in, CPU tensors out."""

    def __init__(self, rows, device: torch.device) -> None:
        self.rows, self.device, self.name = rows, device, rows.name

    def _to(self, x):
        return x.to(self.device) if isinstance(x, torch.Tensor) else x

    @staticmethod
    def _back(result):
        fields = [f.cpu() if isinstance(f, torch.Tensor) else f for f in vars(result).values()]
        return type(result)(*fields)

    def _out(self, logits, d_logits, out):
        return d_logits if out is logits else self._to(out)

    def token_pass(self, logits, targets, advantages, mask, params, **kw):
        d_logits = self._to(logits)
        out = kw.get("grad_out")
        d_out = self._out(logits, d_logits, out)
        kw = {k: self._to(v) for k, v in kw.items()}
        kw["grad_out"] = d_out
        res = self.rows.token_pass(
            d_logits, self._to(targets), self._to(advantages), self._to(mask), params, **kw
        )
        if out is not None and d_out is not out:
            out.copy_(d_out)
        return self._back(res)

    def partial_stats(self, logits, local_targets, params, **kw):
        return self._back(
            self.rows.partial_stats(self._to(logits), self._to(local_targets), params, **kw)
        )

    def row_grad(self, logits, targets, row_max, sum_exp, grad_rows, scale, params, out):
        d_logits = self._to(logits)
        d_out = self._out(logits, d_logits, out)
        args = [self._to(t) for t in (targets, row_max, sum_exp, grad_rows, scale)]
        self.rows.row_grad(d_logits, *args, params, d_out)
        if d_out is not out:
            out.copy_(d_out)
        return out


TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=BACKENDS)
def rows(request) -> Iterator:
    with backend_variant(request.param) as name:
        backend = load_backend(name)
        yield OnDevice(backend, TRITON_DEVICE) if name == "triton" else backend


def make_logits(shape, dtype, seed=0, scale=4.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def transformed(z: torch.Tensor, params: RowParams) -> torch.Tensor:
    z = z.double()
    if params.logit_softcap is not None:
        return params.logit_softcap * torch.tanh(z * params.logit_scale / params.logit_softcap)
    return z * params.logit_scale


def fp64_terms(z, targets, adv, valid, params: RowParams):
    """fp64 (loss, logprobs, probs, entropy, scale) of the stored values."""
    zt = transformed(z, params)
    logp_all = torch.log_softmax(zt / params.temperature, -1)
    safe = torch.where(valid, targets.long(), torch.zeros_like(targets.long()))
    logp = logp_all.gather(1, safe[:, None]).squeeze(1)
    q = torch.softmax(zt, -1).gather(1, safe[:, None]).squeeze(1)
    c = torch.where(q <= params.tau, q, torch.ones_like(q))
    scale = torch.where(valid, adv.double() * c, torch.zeros_like(c))
    loss = torch.where(scale != 0, -scale * logp, torch.zeros_like(scale))
    p = logp_all.exp()
    entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
    return loss, logp, q, entropy, scale


def fp64_grad(z, targets, adv, valid, weights, params: RowParams):
    x = z.double().clone().requires_grad_(True)
    zt = transformed(x, params)
    logp_all = torch.log_softmax(zt / params.temperature, -1)
    safe = torch.where(valid, targets.long(), torch.zeros_like(targets.long()))
    logp = logp_all.gather(1, safe[:, None]).squeeze(1)
    with torch.no_grad():
        q = torch.softmax(zt, -1).gather(1, safe[:, None]).squeeze(1)
        c = torch.where(q <= params.tau, q, torch.ones_like(q))
    loss = -(weights.double() * torch.where(valid, adv.double() * c, 0.0) * logp).sum()
    loss.backward()
    return x.grad


def tolerances(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10)
    return dict(rtol=2e-5, atol=2e-5)


def grad_close(
    got: torch.Tensor, want: torch.Tensor, coef: torch.Tensor, logit_error: float = 0.0
) -> None:
    """Within the storage dtype's rounding of the fp64 value, relative to the row scale,
    plus a few fp32 ulps of the row's coefficient ``|g w A c / T| * max dz'/dz``: the
    target entry ``coef * (p - 1)`` cancels when ``p`` is close to 1. ``logit_error``:
    the relative error of ``p`` that the transformed logits' own error allows (a
    soft-cap's ``z'`` is within a few ulp of the cap, which ``/ T`` turns into a relative
    error of every probability)."""
    coef = coef.double().abs()[:, None]
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        return
    eps = {torch.float32: 3e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[got.dtype]
    scale = want.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    # fp16 cannot hold entries below its subnormal spacing 2^-24: they round to it or 0.
    floor = 2.0**-24 if got.dtype == torch.float16 else 0.0
    allowed = floor + (8 * 1.2e-7 + logit_error) * coef + 2 * eps * scale
    excess = (got.double() - want).abs() - allowed
    assert excess.max().item() <= 0, f"max excess {excess.max().item():.3g}"


def coefficients(z, targets, adv, valid, weights, params: RowParams) -> torch.Tensor:
    scale = fp64_terms(z, targets, adv, valid, params)[4]
    return weights.double() * scale / params.temperature * params.logit_scale


def case(shape, dtype, seed=0):
    n_rows, n_cols = shape
    gen = torch.Generator().manual_seed(seed + 1)
    z = make_logits(shape, dtype, seed)
    targets = torch.randint(0, n_cols, (n_rows,), generator=gen)
    if n_rows > 2:
        targets[1] = -100
    adv = torch.randn(n_rows, generator=gen, dtype=torch.float64).to(accumulate_dtype(dtype))
    mask = torch.ones(n_rows, dtype=torch.uint8)
    if n_rows > 3:
        mask[-1] = 0
    return z, targets, adv, mask


PARAMS = [
    RowParams(tau=0.1, temperature=1.0),
    RowParams(tau=0.5, temperature=0.7),
    RowParams(tau=1.0, temperature=1.0, logit_softcap=3.0),
    RowParams(tau=0.1, temperature=0.7, logit_scale=0.5, logit_softcap=5.0),
    RowParams(tau=0.1, temperature=1.3, logit_scale=2.0),
]


@pytest.mark.parametrize("rows, dtype, shape, params", combos(params=PARAMS), indirect=["rows"])
def test_token_pass_matches_fp64(rows, dtype, shape, params):
    z, targets, adv, mask = case(shape, dtype)
    valid = (targets != -100) & (mask != 0)
    out = rows.token_pass(z, targets, adv, mask, params, tokens_per_advantage=1, with_stats=True)
    loss, logp, q, entropy, scale = fp64_terms(z, targets, adv, valid, params)
    tol = tolerances(dtype)
    torch.testing.assert_close(out.loss.double(), loss, **tol)
    torch.testing.assert_close(out.logprobs.double(), torch.where(valid, logp, 0.0), **tol)
    torch.testing.assert_close(out.probs.double(), torch.where(valid, q, 0.0), **tol)
    torch.testing.assert_close(out.entropy.double(), entropy, **tol)
    torch.testing.assert_close(out.scale.double(), scale, **tol)
    # The row summary: m / T + log S is the tempered logsumexp.
    lse = torch.logsumexp(transformed(z, params) / params.temperature, -1)
    got = out.row_max.double() / params.temperature + out.sum_exp.double().log()
    torch.testing.assert_close(got, lse, **tol)


@pytest.mark.parametrize(
    "rows, dtype, shape, params", combos(shapes=[(6, 515)], params=PARAMS[:4]), indirect=["rows"]
)
@pytest.mark.parametrize("out_layout", ["fresh", "in-place", "shifted"])
def test_token_pass_writes_the_gradient(rows, dtype, shape, params, out_layout):
    """With grad_weights/grad_out the pass writes w A c / T (softmax - onehot) dz'/dz,
    into a fresh buffer, over the logits, or into a view whose rows start one element off
    the logits' 16-byte phase (the element-by-element store path)."""
    z, targets, adv, mask = case((6, 515), dtype, seed=3)
    valid = (targets != -100) & (mask != 0)
    weights = torch.rand(6, dtype=accumulate_dtype(dtype))
    weights[2] = 0.0
    buffer = z.clone()
    out = {
        "fresh": lambda: torch.empty_like(z),
        "in-place": lambda: buffer,
        "shifted": lambda: shifted_like(z),
    }[out_layout]()
    rows.token_pass(
        buffer,
        targets,
        adv,
        mask,
        params,
        tokens_per_advantage=1,
        with_stats=False,
        grad_weights=weights,
        grad_out=out,
    )
    want = fp64_grad(z, targets, adv, valid, weights, params)
    grad_close(out, want, coefficients(z, targets, adv, valid, weights, params))
    assert torch.all(out[~valid | (weights == 0)] == 0)


def shifted_like(z: torch.Tensor) -> torch.Tensor:
    """An uninitialised buffer shaped like ``z`` whose rows start one element later in
    memory than a contiguous copy's would (another base and row stride)."""
    return torch.empty(z.shape[0], z.shape[1] + 2, dtype=z.dtype)[:, 1:-1]


@pytest.mark.parametrize("rows, dtype, shape, params", combos(params=PARAMS[:4]), indirect=["rows"])
@pytest.mark.parametrize("shifted", [False, True])
def test_row_grad_matches_fp64(rows, dtype, shape, params, shifted):
    z, targets, adv, mask = case(shape, dtype, seed=5)
    valid = (targets != -100) & (mask != 0)
    out = rows.token_pass(z, targets, adv, mask, params, tokens_per_advantage=1, with_stats=False)
    grad_rows = torch.randn(shape[0], dtype=accumulate_dtype(dtype))
    grad_out = shifted_like(z) if shifted else torch.empty_like(z)
    got = rows.row_grad(
        z, targets, out.row_max, out.sum_exp, grad_rows, out.scale, params, grad_out
    )
    want = fp64_grad(z, targets, adv, valid, grad_rows, params)
    grad_close(got, want, coefficients(z, targets, adv, valid, grad_rows, params))


@pytest.mark.parametrize(
    "rows, dtype, shape", combos([torch.float32, torch.bfloat16], [(5, 300)]), indirect=["rows"]
)
def test_partial_stats_of_blocks_match_fp64(rows, dtype, shape):
    z = make_logits(shape, dtype, seed=7)
    z[2, :] = float("-inf")  # soft-capped to a block of -cap
    params = RowParams(tau=0.1, temperature=0.7, logit_softcap=4.0)
    local = torch.tensor([3, -1, 0, 299, -1])
    part = rows.partial_stats(z, local, params, with_entropy=True)
    zt = transformed(z, params)
    # The reference m_r is the block's max on the running-max paths and a point near T
    # times the block's tempered logsumexp on the fixed-reference one (16-bit logits,
    # soft-capped, T != 1); every sum is relative to it, whichever it is.
    m = part.row_max.double()
    assert torch.isfinite(m).all()  # soft-capped: even the row of -inf lies at -cap
    tol = dict(rtol=2e-5, atol=2e-5)
    if not (rows.name == "triton" and dtype != torch.float32):
        torch.testing.assert_close(m, zt.amax(-1), **tol)
    x = (zt - m[:, None]) / params.temperature
    torch.testing.assert_close(part.sum_exp.double(), x.exp().sum(-1), **tol)
    torch.testing.assert_close(part.sum_exp_1.double(), (zt - m[:, None]).exp().sum(-1), **tol)
    torch.testing.assert_close(part.weighted.double(), (x.exp() * x).sum(-1), **tol)
    # Whatever the reference, the backward's coef / S stays a normal number.
    assert (part.sum_exp >= 1.0).all() and (part.sum_exp <= shape[1]).all()
    want_zy = torch.where(local >= 0, zt.gather(1, local.clamp_min(0)[:, None]).squeeze(1), 0.0)
    torch.testing.assert_close(part.target_logit.double(), want_zy, **tol)


def test_softcap_is_exact_to_fp32_over_the_whole_range(rows):
    """``cap * tanh(z * scale / cap)`` per logit against fp64, from 0 (where ``1 - 2 / (1 +
    e)`` cancels) through saturation and the exponent clamp to +-inf and +-3e38: the Triton
    tanh divides on the FMA pipe (a bit-pattern seed and two refinement steps), so the
    whole range of ``1 + e`` must come out right."""
    cap, scale = 30.0, 1.5
    u = torch.cat(
        [
            torch.linspace(-1e-3, 1e-3, 41, dtype=torch.float64),
            torch.linspace(-40.0, 40.0, 161, dtype=torch.float64),
            torch.tensor([-1e4, -700.0, 443.0, 444.0, 445.0, 1e4, 3e38, -3e38]),
        ]
    )
    z = (u * cap / scale).float().clamp(-3e38, 3e38)
    z = torch.cat([z, torch.tensor([float("inf"), float("-inf"), 0.0])])[:, None]
    params = RowParams(tau=0.1, temperature=1.0, logit_scale=scale, logit_softcap=cap)
    part = rows.partial_stats(z, torch.zeros(len(z), dtype=torch.int64), params, with_entropy=False)
    want = cap * torch.tanh(z.double().squeeze(1) * scale / cap)
    # fp32 rounding of a value of size <= cap, a few ulp of it
    torch.testing.assert_close(part.target_logit.double(), want, rtol=0.0, atol=8 * cap * 2**-24)
    assert torch.equal(part.row_max.double()[-3:-1], torch.tensor([cap, -cap], dtype=torch.float64))


# Soft-capped exponents reach cap log2(e) / T = 96.2 (on the Triton path for 16-bit
# logits: a reference above 0, no term can underflow), 173 (rows whose every logit lies
# near -cap underflow and are walked again with a running max) and, at T > 1,
# cap log2(e) = 95.2.
WIDE_SOFTCAPS = [
    RowParams(tau=0.5, temperature=0.45, logit_softcap=30.0),
    RowParams(tau=0.1, temperature=0.25, logit_softcap=30.0),
    RowParams(tau=0.1, temperature=1.5, logit_scale=2.0, logit_softcap=66.0),
]


@pytest.mark.parametrize("params", WIDE_SOFTCAPS, ids=_name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=_name)
def test_softcapped_rows_across_the_whole_exponent_range(rows, dtype, params):
    """Rows at both ends of the soft-cap's range, where the Triton path's sums against
    fixed references meet their largest (every logit at +cap: 2^96 per term) and smallest
    terms (every logit at -cap: 2^-96, or underflow and a second walk): loss, log p, q,
    entropy and the gradient against fp64. The Triton row is long enough for whole
    blocks, where a quarter of tanh's exponentials are polynomials."""
    n_cols = 4107 if rows.name == "triton" else 300
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(6, n_cols, generator=gen, dtype=torch.float64)
    z[0] *= 60.0  # saturates both ends of tanh
    z[1] = float("-inf")  # every logit at -cap
    z[2] = float("inf")  # every logit at +cap
    z[3] = -1e4
    z[3, 17] = 1e4  # one certain token, the rest at -cap
    z[4] *= 3.0
    z[5] = 0.5 * z[5] - 20.0
    z = z.to(dtype)
    targets = torch.tensor([5, 0, n_cols - 1, 17, 2, n_cols - 2])
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0, -0.5, 1.5])
    mask = torch.ones(6, dtype=torch.uint8)
    valid = torch.ones(6, dtype=torch.bool)
    out = rows.token_pass(z, targets, adv, mask, params, tokens_per_advantage=1, with_stats=True)
    loss, logp, q, entropy, scale = fp64_terms(z, targets, adv, valid, params)
    tol = dict(rtol=2e-5, atol=2e-5)
    for name, want in [("loss", loss), ("logprobs", logp), ("probs", q), ("scale", scale)]:
        torch.testing.assert_close(getattr(out, name).double(), want, **tol, msg=name)
    torch.testing.assert_close(out.entropy.double(), entropy, **tol)
    lse = torch.logsumexp(transformed(z, params) / params.temperature, -1)
    got = out.row_max.double() / params.temperature + out.sum_exp.double().log()
    torch.testing.assert_close(got, lse, **tol)
    grad_rows = torch.rand(6, generator=gen, dtype=torch.float64).float() + 0.5
    grad = rows.row_grad(
        z, targets, out.row_max, out.sum_exp, grad_rows, out.scale, params, torch.empty_like(z)
    )
    want = fp64_grad(z, targets, adv, valid, grad_rows, params)
    # z' within 8 ulp of the cap (test_softcap_is_exact_to_fp32_over_the_whole_range).
    logit_error = 8 * params.logit_softcap * 2.0**-24 / params.temperature
    grad_close(grad, want, coefficients(z, targets, adv, valid, grad_rows, params), logit_error)


def test_certain_token_has_exactly_zero_gradient_at_any_temperature(rows):
    z = torch.tensor([[1000.0, 0.0, 0.0, 0.0], [0.0, 60.0, -5.0, 1.0]])
    targets = torch.tensor([0, 1])
    adv = torch.tensor([1.0, -1.0])
    for temperature in (1.0, 0.7, 1e-2, 1e-3, 1e-6, 1e300):
        params = RowParams(tau=0.0, temperature=temperature)
        weights = torch.ones(2)
        out = torch.empty_like(z)
        res = rows.token_pass(
            z,
            targets,
            adv,
            None,
            params,
            tokens_per_advantage=1,
            with_stats=True,
            grad_weights=weights,
            grad_out=out,
        )
        assert torch.isfinite(out).all() and torch.isfinite(res.loss).all(), temperature
        if temperature < 1e10:
            assert torch.all(out[0] == 0), (temperature, out[0])
            assert res.logprobs[0] == 0 and res.loss[0] == 0


def test_data_checks_raise_value_error(rows):
    z = make_logits((4, 11), torch.float32)
    params = RowParams(tau=0.1, temperature=1.0)
    good_t = torch.tensor([1, 2, -100, 10])
    adv = torch.ones(4)
    bad = [
        (dict(targets=torch.tensor([1, 11, 0, 0])), ["targets", "[0, 11)", "11"]),
        (dict(targets=torch.tensor([1, -1, 0, 0])), ["targets", "ignore_index=-100", "-1"]),
        (dict(mask=torch.tensor([1.0, 0.5, 1.0, 0.0])), ["mask", "0/1", "0.5"]),
        (dict(mask=torch.tensor([1, 2, 0, 1], dtype=torch.uint8)), ["mask", "0/1", "2"]),
        (dict(advantages=torch.tensor([1.0, float("nan"), 0.0, 1.0])), ["advantages", "finite"]),
    ]
    for override, words in bad:
        args = dict(targets=good_t, mask=None, advantages=adv)
        args.update(override)
        with pytest.raises(ValueError) as info:
            rows.token_pass(
                z,
                args["targets"],
                args["advantages"],
                args["mask"],
                params,
                tokens_per_advantage=1,
                with_stats=False,
            )
        for word in words:
            assert word in str(info.value), (word, str(info.value))


def test_int32_targets_and_per_sequence_advantages(rows):
    z = make_logits((6, 13), torch.float32, seed=2)
    targets = torch.randint(0, 13, (6,))
    adv_seq = torch.tensor([0.5, -2.0])
    params = RowParams(tau=0.2, temperature=0.9)
    a = rows.token_pass(
        z, targets.int(), adv_seq, None, params, tokens_per_advantage=3, with_stats=False
    )
    b = rows.token_pass(
        z,
        targets,
        adv_seq.repeat_interleave(3),
        None,
        params,
        tokens_per_advantage=1,
        with_stats=False,
    )
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.scale, b.scale)


def test_native_results_do_not_depend_on_thread_count():
    rows = load_backend("cpu")
    z, targets, adv, mask = case((64, 5000), torch.float32)
    params = RowParams(tau=0.1, temperature=0.7)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, previous)):
            torch.set_num_threads(threads)
            out = rows.token_pass(
                z,
                targets,
                adv,
                mask,
                params,
                tokens_per_advantage=1,
                with_stats=True,
                grad_weights=torch.ones(64),
                grad_out=torch.empty_like(z),
            )
            grad = rows.row_grad(
                z,
                targets,
                out.row_max,
                out.sum_exp,
                torch.ones(64),
                out.scale,
                params,
                torch.empty_like(z),
            )
            results.append((out.loss, out.entropy, out.sum_exp, grad))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_native_argument_checks():
    module = cpu_rows.require()
    z = torch.randn(3, 10)
    targets = torch.tensor([1, 2, 3])
    v = torch.zeros(3)
    out = torch.empty_like(z)
    bad_calls = [
        lambda: module.row_grad(z[0], targets, v, v, v, v, 1.0, 1.0, 0.0, out),  # 1-D
        lambda: module.row_grad(z.t(), targets, v, v, v, v, 1.0, 1.0, 0.0, out),
        lambda: module.row_grad(z, targets[:2], v, v, v, v, 1.0, 1.0, 0.0, out),
        lambda: module.row_grad(z, targets + 10, v, v, v + 1, v + 1, 1.0, 1.0, 0.0, out),
        lambda: module.row_grad(z, targets, v.double(), v, v, v, 1.0, 1.0, 0.0, out),
        lambda: module.row_grad(z, targets, v, v, v, v, 1.0, 1.0, 0.0, out.double()),
        lambda: module.row_grad(z, targets, v, v, v, v, 1.0, 1.0, 0.0, out[:, :5]),
        lambda: module.token_pass(
            z, targets.short(), v, None, 1, 0.1, 1.0, 1.0, 0.0, -100, False, None, None
        ),
        lambda: module.token_pass(
            z, targets, v, None, 2, 0.1, 1.0, 1.0, 0.0, -100, False, None, None
        ),
    ]
    # A shifted view of the logits is neither in place nor separate.
    storage = torch.zeros(40)
    logits_view, out_view = storage[:30].view(3, 10), storage[5:35].view(3, 10)
    bad_calls.append(
        lambda: module.row_grad(logits_view, targets, v, v, v, v, 1.0, 1.0, 0.0, out_view)
    )
    for call in bad_calls:
        with pytest.raises((RuntimeError, ValueError)):
            call()


def test_empty_batch(rows):
    z = torch.empty(0, 17)
    empty_i = torch.empty(0, dtype=torch.long)
    params = RowParams(tau=0.1, temperature=1.0)
    out = rows.token_pass(
        z, empty_i, torch.empty(0), None, params, tokens_per_advantage=1, with_stats=True
    )
    assert out.loss.shape == out.entropy.shape == (0,)
    grad = rows.row_grad(
        z, empty_i, out.row_max, out.sum_exp, out.loss, out.scale, params, torch.empty_like(z)
    )
    assert grad.shape == (0, 17)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autotune_candidates_give_the_same_results(monkeypatch, dtype):
    """GFT_KERNELS_AUTOTUNE picks the fastest candidate configuration once per key; every
    candidate computes the same thing as the default."""
    from gft_kernels.backends import triton as triton_backend
    from gft_kernels.backends.triton import autotune, launch

    rows = OnDevice(load_backend("triton"), TRITON_DEVICE)
    z, targets, adv, mask = case((5, 300), dtype, seed=11)
    params = RowParams(tau=0.2, temperature=0.8)
    want = rows.token_pass(z, targets, adv, mask, params, tokens_per_advantage=1, with_stats=True)
    candidates = autotune.candidate_configs(dtype, softcap=False)
    assert candidates[0] == launch.launch_config(dtype)
    for pick, chosen in enumerate(candidates):
        monkeypatch.setattr(autotune, "_TUNED", {})
        monkeypatch.setattr(autotune, "autotune_enabled", lambda device: True)
        monkeypatch.setattr(autotune, "candidate_configs", lambda *a: candidates)
        seen = []

        def time_launch(launch, seen=seen, pick=pick):
            seen.append(launch[2]["BLOCK_V"])
            return 0.0 if len(seen) - 1 == pick else 1.0

        monkeypatch.setattr(triton_backend, "_time_launch", time_launch)
        got = rows.token_pass(
            z, targets, adv, mask, params, tokens_per_advantage=1, with_stats=True
        )
        assert seen == [c.block_v for c in candidates]
        assert list(autotune._TUNED.values()) == [chosen]
        for name in ("loss", "logprobs", "probs", "entropy", "sum_exp"):
            torch.testing.assert_close(
                getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6
            )
        rows.token_pass(z, targets, adv, mask, params, tokens_per_advantage=1, with_stats=True)
        assert len(seen) == len(candidates), "the choice is remembered, not timed again"
