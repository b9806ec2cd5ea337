"""Native CPU row kernels (``csrc/gft_cpu.cpp``) against fp64 PyTorch references.

The extension must build here: a build failure fails the module fixture instead of
skipping, so a broken compiler setup cannot pass silently.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterator, Tuple

import pytest
import torch

from gft_kernels.cpu import native

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(1, 1), (3, 2), (5, 37), (4, 4099), (2, 70000)]
TEMPERATURES = [1.0, 0.7]


@pytest.fixture(scope="module")
def ext():
    """The compiled module (built once per session; the compile is cached on disk)."""
    return native.require()


@pytest.fixture(params=["simd", "scalar"])
def path(request, ext) -> Iterator[str]:
    """Run a test through the SIMD inner loops and again through the scalar ones."""
    previous = ext.set_simd_enabled(request.param == "simd")
    try:
        yield request.param
    finally:
        ext.set_simd_enabled(previous)


def make_logits(shape: Tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=gen, dtype=torch.float64) * 4.0
    return z.to(dtype)


def ref_stats(z: torch.Tensor, temperature: float):
    """fp64 (lse_t, lse_1, entropy) of the values actually stored in ``z``."""
    z64 = z.double()
    scaled = z64 / temperature
    logp = torch.log_softmax(scaled, dim=-1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    return torch.logsumexp(scaled, -1), torch.logsumexp(z64, -1), entropy


def ref_grad(z, targets, lse_t, coef, temperature):
    """fp64 ``coef * (exp(z / T - lse_t) - onehot(targets))``."""
    g = torch.exp(z.double() / temperature - lse_t.double()[:, None])
    g[torch.arange(z.shape[0]), targets] -= 1.0
    return g * coef.double()[:, None]


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def stats_tol(dtype: torch.dtype) -> dict:
    # Statistics accumulate in fp32 for every non-fp64 input (the inputs are exact there).
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-5)


def assert_grad_close(out: torch.Tensor, ref: torch.Tensor, coef: torch.Tensor) -> None:
    """``out`` within ~2 ulps of the fp64 reference rounded to ``out.dtype``.

    Besides the relative bound, each row allows an absolute error of a few fp32 ulps of
    ``|coef|``: the target entry ``coef * (p - 1)`` cancels when ``p`` is close to 1.
    """
    if out.dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13 * coef.abs().max().item())
        return
    info = torch.finfo(out.dtype)
    # fp32 exp is ~2 ulp, and lse_t enters x = z / T - lse_t with its own rounding.
    rtol = 3e-5 if out.dtype == torch.float32 else 2 * info.eps
    want = ref.to(out.dtype).double()
    got = out.double()
    bound = rtol * want.abs() + 1e-6 * coef.double().abs()[:, None] + 1e-30
    excess = (got - want).abs() - bound
    worst = excess.argmax()
    assert (excess <= 0).all(), (
        f"max excess {excess.max().item():.3g} at {divmod(worst.item(), out.shape[1])}: "
        f"got {got.flatten()[worst].item()!r}, want {want.flatten()[worst].item()!r}"
    )


# ---------------------------------------------------------------------------------------
# row_stats
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_row_stats_matches_fp64(ext, path, dtype, shape, temperature):
    z = make_logits(shape, dtype)
    lse_t, lse_1, entropy = native.row_stats(z, temperature, True)
    ref = ref_stats(z, temperature)
    for got, want in zip((lse_t, lse_1, entropy), ref):
        assert got.dtype == stat_dtype(dtype) and got.shape == (shape[0],)
        torch.testing.assert_close(got.double(), want, **stats_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_stats_without_entropy(ext, path, dtype):
    z = make_logits((3, 100), dtype)
    lse_t, lse_1, entropy = native.row_stats(z, 0.7, False)
    assert entropy is None
    ref = ref_stats(z, 0.7)
    torch.testing.assert_close(lse_t.double(), ref[0], **stats_tol(dtype))
    torch.testing.assert_close(lse_1.double(), ref[1], **stats_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_row_stats_running_max_rescale(ext, path, dtype, temperature):
    """Rows whose max grows block after block (rescaling) or sits in the first block."""
    n_cols = 9000  # several 2048-element blocks plus a ragged tail
    base = torch.linspace(-30.0, 30.0, n_cols, dtype=torch.float64)
    rows = [base, base.flip(0), base.sin() * 20.0 + base, torch.full((n_cols,), 1000.0) + base]
    z = torch.stack(rows).to(dtype)
    got = native.row_stats(z, temperature, True)
    for g, want in zip(got, ref_stats(z, temperature)):
        # The +1000 row: fp32 lse at ~1000 has an ulp of 6e-5.
        torch.testing.assert_close(g.double(), want, rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_row_stats_negative_infinity(ext, path, dtype, temperature):
    """-inf logits (masked vocabulary) add nothing: finite lse and entropy, no NaN."""
    z = make_logits((4, 5000), dtype)
    z[0, 3] = -math.inf
    z[1, :4500] = -math.inf  # the first blocks are all -inf: the running max starts at -inf
    z[2, ::2] = -math.inf
    z[3, 4999] = -math.inf  # in the ragged tail
    lse_t, lse_1, entropy = native.row_stats(z, temperature, True)
    for t in (lse_t, lse_1, entropy):
        assert torch.isfinite(t).all()
    for g, want in zip((lse_t, lse_1, entropy), ref_stats(z, temperature)):
        torch.testing.assert_close(g.double(), want, **stats_tol(dtype))


def test_row_stats_all_negative_infinity_row(ext, path):
    """A row with no finite logit is shifted by 0: lse = -inf rather than NaN."""
    z = torch.full((2, 50), -math.inf)
    z[1] = 0.0
    lse_t, lse_1, _ = native.row_stats(z, 0.7, True)
    assert lse_t[0] == -math.inf and lse_1[0] == -math.inf
    torch.testing.assert_close(lse_1[1].item(), math.log(50), rtol=1e-6, atol=1e-6)


def test_row_stats_nan_propagates(ext, path):
    z = make_logits((2, 3000), torch.float32)
    z[0, 2500] = math.nan
    lse_t, lse_1, entropy = native.row_stats(z, 0.7, True)
    assert lse_t[0].isnan() and lse_1[0].isnan() and entropy[0].isnan()
    assert torch.isfinite(lse_t[1]) and torch.isfinite(entropy[1])


def test_row_stats_strided_rows(ext, path):
    """Rows need not be adjacent: a column slice keeps a row stride larger than V."""
    wide = make_logits((3, 700), torch.float32)
    z = wide[:, 5:605]
    assert not z.is_contiguous() and z.stride(1) == 1
    got = native.row_stats(z, 0.7, True)
    for g, want in zip(got, ref_stats(z, 0.7)):
        torch.testing.assert_close(g.double(), want, rtol=2e-6, atol=2e-5)


# ---------------------------------------------------------------------------------------
# row_grad
# ---------------------------------------------------------------------------------------


def grad_inputs(shape, dtype, seed=1):
    z = make_logits(shape, dtype, seed)
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, shape[1], (shape[0],), generator=gen)
    coef = torch.randn(shape[0], generator=gen, dtype=torch.float64).to(stat_dtype(dtype))
    return z, targets, coef


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_row_grad_matches_fp64(ext, path, dtype, shape, temperature):
    z, targets, coef = grad_inputs(shape, dtype)
    lse_t = ref_stats(z, temperature)[0].to(stat_dtype(dtype))
    z_before = z.clone()
    out = torch.empty_like(z)
    result = native.row_grad(z, targets, lse_t, coef, temperature, out)
    assert result is out or result.data_ptr() == out.data_ptr()
    assert torch.equal(z, z_before), "logits modified although out is a separate tensor"
    assert_grad_close(out, ref_grad(z, targets, lse_t, coef, temperature), coef)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_stats_then_grad_end_to_end(ext, path, dtype, temperature):
    """row_grad fed by the native row_stats: each gradient row sums to ~0."""
    z, targets, coef = grad_inputs((4, 4099), dtype)
    lse_t, _, _ = native.row_stats(z, temperature, False)
    out = native.row_grad(z, targets, lse_t, coef, temperature, torch.empty_like(z))
    ref = ref_grad(z, targets, ref_stats(z, temperature)[0], coef, temperature)
    assert_grad_close(out, ref, coef)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_row_grad_in_place_equals_out_of_place(ext, path, dtype, temperature):
    z, targets, coef = grad_inputs((4, 4099), dtype)
    lse_t = ref_stats(z, temperature)[0].to(stat_dtype(dtype))
    separate = native.row_grad(z, targets, lse_t, coef, temperature, torch.empty_like(z))
    in_place = z.clone()
    result = native.row_grad(in_place, targets, lse_t, coef, temperature, in_place)
    assert result.data_ptr() == in_place.data_ptr()
    assert torch.equal(in_place, separate)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_grad_zero_coef_rows_are_exact_zeros(ext, path, dtype):
    z, targets, coef = grad_inputs((5, 3001), dtype)
    coef[1] = 0.0
    coef[3] = -0.0
    lse_t = ref_stats(z, 1.0)[0].to(stat_dtype(dtype))
    z[1] = math.nan  # a zero-coefficient row is written, not read: NaN must not leak
    out = torch.full_like(z, 7.0)
    native.row_grad(z, targets, lse_t, coef, 1.0, out)
    for row in (1, 3):
        assert torch.equal(out[row], torch.zeros_like(out[row]))
    assert (out[0] != 0).any() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_row_grad_negative_infinity(ext, path, dtype, temperature):
    """A -inf logit has zero probability: a target at -inf gets exactly -coef."""
    z, targets, coef = grad_inputs((3, 4099), dtype)
    z[0, (targets[0] + 1) % 4099] = -math.inf  # a non-target
    z[1, targets[1]] = -math.inf  # the target itself
    z[2, 4096:] = -math.inf  # the ragged tail
    lse_t, _, entropy = native.row_stats(z, temperature, True)
    assert torch.isfinite(lse_t).all() and torch.isfinite(entropy).all()
    out = native.row_grad(z, targets, lse_t, coef, temperature, torch.empty_like(z))
    assert torch.isfinite(out).all()
    assert out[0, (targets[0] + 1) % 4099] == 0
    assert out[1, targets[1]] == -coef[1].to(dtype)
    assert_grad_close(out, ref_grad(z, targets, lse_t, coef, temperature), coef)


def test_results_do_not_depend_on_thread_count(ext):
    z, targets, coef = grad_inputs((6, 5000), torch.float32)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, previous)):
            torch.set_num_threads(threads)
            stats = native.row_stats(z, 0.7, True)
            grad = native.row_grad(z, targets, stats[0], coef, 0.7, torch.empty_like(z))
            results.append((*stats, grad))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------


def test_argument_checks(ext):
    z, targets, coef = grad_inputs((3, 10), torch.float32)
    lse_t = torch.zeros(3)
    out = torch.empty_like(z)
    bad_calls = [
        lambda: native.row_stats(z[0], 1.0, True),  # 1-D
        lambda: native.row_stats(z.t(), 1.0, True),  # last dim not contiguous
        lambda: native.row_stats(z.to(torch.int32), 1.0, True),
        lambda: native.row_stats(z, 0.0, True),
        lambda: native.row_grad(z, targets.int(), lse_t, coef, 1.0, out),
        lambda: native.row_grad(z, targets[:2], lse_t, coef, 1.0, out),
        lambda: native.row_grad(z, targets + 10, lse_t, coef, 1.0, out),  # out of range
        lambda: native.row_grad(z, -targets - 1, lse_t, coef, 1.0, out),
        lambda: native.row_grad(z, targets, lse_t.double(), coef, 1.0, out),
        lambda: native.row_grad(z, targets, lse_t, coef, 1.0, out.double()),
        lambda: native.row_grad(z, targets, lse_t, coef, 1.0, out[:, :5]),
    ]
    # A shifted view of the logits is neither in place nor separate.
    storage = torch.zeros(40)
    logits_view, out_view = storage[:30].view(3, 10), storage[5:35].view(3, 10)
    bad_calls.append(lambda: native.row_grad(logits_view, targets, lse_t, coef, 1.0, out_view))
    for call in bad_calls:
        with pytest.raises(RuntimeError):
            call()


def test_empty_batch(ext):
    z = torch.empty(0, 17)
    lse_t, lse_1, entropy = native.row_stats(z, 1.0, True)
    assert lse_t.shape == lse_1.shape == entropy.shape == (0,)
    out = torch.empty_like(z)
    empty_i = torch.empty(0, dtype=torch.long)
    assert native.row_grad(z, empty_i, lse_t, lse_t, 1.0, out).shape == (0, 17)


# ---------------------------------------------------------------------------------------
# Fallback when the build fails
# ---------------------------------------------------------------------------------------


@pytest.fixture
def fresh_loader(ext, monkeypatch):
    """Forget the cached build for one test; monkeypatch restores the real module after."""
    for name in ("_module", "_error", "_warned", "_build_seconds"):
        monkeypatch.setattr(native, name, getattr(native, name))
    native._reset_for_tests()
    return monkeypatch


def _fallback_warnings(records) -> list:
    return [
        w
        for w in records
        if issubclass(w.category, RuntimeWarning) and "native CPU kernel" in str(w.message)
    ]


def test_fallback_warns_once_when_build_fails(fresh_loader):
    import torch.utils.cpp_extension as cpp_extension

    calls = []

    def failing_load(*args, **kwargs):
        calls.append(kwargs.get("name"))
        raise RuntimeError("Error building extension 'gft_kernels_cpu': c++: not found")

    fresh_loader.setattr(cpp_extension, "load", failing_load)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        assert native.is_available() is False
        assert native.is_available() is False
    found = _fallback_warnings(records)
    assert len(found) == 1, [str(w.message) for w in records]
    message = str(found[0].message)
    assert "could not be built" in message and "torch backend" in message
    assert "c++: not found" in message
    assert len(calls) == 1, "a failed build must be cached, not retried on every call"
    with pytest.raises(RuntimeError, match="could not be built"):
        native.require()


def test_fallback_env_var_disables_build(fresh_loader):
    fresh_loader.setenv(native.DISABLE_ENV, "1")
    with pytest.warns(RuntimeWarning, match=f"disabled by {native.DISABLE_ENV}"):
        assert native.is_available() is False
    with pytest.raises(RuntimeError, match=native.DISABLE_ENV):
        native.require()
    with pytest.raises(RuntimeError):
        native.row_stats(torch.zeros(1, 3), 1.0, False)


def test_reset_rebuilds_after_failure(fresh_loader):
    fresh_loader.setenv(native.DISABLE_ENV, "1")
    with pytest.warns(RuntimeWarning):
        assert not native.is_available()
    fresh_loader.delenv(native.DISABLE_ENV)
    native._reset_for_tests()
    assert native.is_available()  # the on-disk build cache makes this a load, not a compile
    assert native.require().simd_path() in ("avx2", "scalar")
