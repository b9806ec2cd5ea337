"""One NaN rule on every backend and through every entry point.

A NaN in any input that reaches a token carrying loss (a logit of its row, its hidden
state, a weight row, a bias entry) makes the loss NaN: never a finite loss while a
gradient holds NaN, never a silently dropped row. A NaN in a row that carries no loss
(masked, ignored, zero advantage) changes nothing. A row without NaN whose max is not
finite (all -inf, or holding +inf) still carries no loss and no gradient.
"""

from __future__ import annotations

import pytest
import torch

from gft_kernels import gft_loss
from gft_kernels.backends import RowParams, check_backend, load_backend
from gft_kernels.backends.base import PartialStats
from gft_kernels.backends.token_terms import combine_partials, token_terms
from tests.helpers import BACKENDS, backend_variant, device_for, reference_fp64, run_entry

NAN = float("nan")
INF = float("inf")

# The CPU kernel's scalar loops (CPUs without AVX2) and the Triton pass that splits each
# row's columns across programs (few rows on a large GPU) decide the rule on their own.
ROW_BACKENDS = BACKENDS + ("cpu-scalar", "triton-split")
LOGITS_ENTRIES = ("gft_loss", "gft_loss-stats")
HEAD_ENTRIES = ("fused", "fused-stats", "fused-full")
# (dtype, logit_softcap, temperature): every combination for the logits-level loss; for the
# fused head, a set that still meets each dtype, the soft-cap and T != 1, and the Triton
# pass against fixed references (16-bit, soft-capped, T != 1).
NUMERICS = [
    (dtype, cap, temperature)
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    for cap in (None, 30.0)
    for temperature in (1.0, 0.7)
] + [(torch.float32, 100.0, 1.0), (torch.bfloat16, 100.0, 0.7)]  # large caps: another tanh path
HEAD_NUMERICS = [
    (torch.float32, None, 1.0),
    (torch.float32, 30.0, 0.7),
    (torch.bfloat16, 30.0, 0.7),
    (torch.float16, None, 0.7),
]
B, T, V, H = 2, 3, 130, 8
LOSS_TOKEN = (0, 0)  # valid, unmasked, advantage != 0
DROPPED = {"masked": (1, 2), "ignored": (0, 1), "zero-advantage": (1, 0)}


def _id(value) -> str:
    return str(value).replace("torch.", "")


def numerics_params(cases):
    return [pytest.param(*c, id="-".join(f"{n}{_id(v)}" for n, v in zip("dct", c))) for c in cases]


# The split Triton pass differs from the unsplit one only in how the segments are combined
# (token_terms): two sets of numerics cover it, and the interpreter is slow.
SPLIT_NUMERICS = [(torch.float32, None, 1.0), (torch.bfloat16, 30.0, 0.7)]


def row_params(cases=NUMERICS):
    """``(backend, dtype, cap, temperature)`` over ROW_BACKENDS x ``cases``."""
    return [
        pytest.param(b, *c, id="-".join([b] + [f"{n}{_id(v)}" for n, v in zip("dct", c)]))
        for b in ROW_BACKENDS
        for c in cases
        if b != "triton-split" or c in SPLIT_NUMERICS
    ]


ROW_ARGS = ("backend", "dtype", "cap", "temperature")


def tokens(device):
    """Targets, per-token advantages and mask with one token of each kind in DROPPED."""
    gen = torch.Generator().manual_seed(1)
    targets = torch.randint(0, V, (B, T), generator=gen)
    targets[DROPPED["ignored"]] = -100
    adv = torch.rand(B, T, generator=gen, dtype=torch.float64).add(0.5).float()
    adv[1, 1] = -adv[1, 1]
    adv[DROPPED["zero-advantage"]] = 0.0
    mask = torch.ones(B, T)
    mask[DROPPED["masked"]] = 0.0
    return targets.to(device), adv.to(device), mask.to(device)


def logits_case(dtype, device):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 3
    return logits.to(dtype).to(device)


def head_case(dtype, device):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.7
    bias = torch.randn(V, generator=gen, dtype=torch.float64)
    return {k: v.to(dtype).to(device) for k, v in dict(h=hidden, w=weight, b=bias).items()}


def run(entry, backend, leaves, targets, adv, mask, cap, temperature):
    """``(loss, {leaf: grad})`` of one entry point (token-mean), the backward included."""
    loss, grads, _ = run_entry(
        entry, backend, leaves, targets, adv, mask, logit_softcap=cap, temperature=temperature
    )
    return loss, grads


def reference(leaves, targets, adv, mask, cap, temperature):
    """The fp64 reference loss of the same inputs (soft-cap applied to the logits)."""
    if "z" in leaves:
        z = leaves["z"].detach().cpu().double()
    else:
        h, w, b = (leaves[k].detach().cpu().double() for k in "hwb")
        z = h @ w.T + b
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return reference_fp64(z, targets.cpu(), adv.cpu(), mask.cpu(), temperature=temperature)


def assert_no_silent_nan(loss, grads):
    """The rule's floor: a finite loss never comes with a non-finite gradient."""
    if bool(torch.isfinite(loss).all()):
        for name, grad in grads.items():
            assert torch.isfinite(grad).all(), f"finite loss {loss} but d{name} holds NaN/inf"


def loss_tolerance(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-4)


# --- a NaN that reaches a token carrying loss --------------------------------------------


def poison_row(z, targets, where):
    """NaN in the loss-carrying token's row, away from its target: one entry, every
    entry, or next to a +inf."""
    row = z[LOSS_TOKEN]
    cols = [c for c in range(V) if c != int(targets[LOSS_TOKEN])][:2]
    if where == "one":
        row[cols[0]] = NAN
    elif where == "all":
        row.fill_(NAN)
    else:  # with +inf: still NaN, not the "row holding +inf" case
        row[cols[0]] = INF
        row[cols[1]] = NAN


@pytest.mark.parametrize("entry", LOGITS_ENTRIES)
@pytest.mark.parametrize("where", ["one", "all", "with-inf"])
@pytest.mark.parametrize(ROW_ARGS, row_params())
def test_nan_logit_of_loss_token_gives_nan_loss(backend, entry, where, dtype, cap, temperature):
    dev = device_for(backend.split("-")[0])
    targets, adv, mask = tokens(dev)
    z = logits_case(dtype, dev)
    poison_row(z, targets, where)
    with backend_variant(backend) as name:
        loss, grads = run(entry, name, {"z": z}, targets, adv, mask, cap, temperature)
    assert torch.isnan(reference({"z": z}, targets, adv, mask, cap, temperature))
    assert torch.isnan(loss), f"{backend}: loss {loss} for a NaN logit of a loss-carrying token"
    assert_no_silent_nan(loss, grads)


@pytest.mark.parametrize(ROW_ARGS, row_params(NUMERICS[::3]))
def test_nan_stays_in_its_token(backend, dtype, cap, temperature):
    """Per-token losses ('none'): the NaN token's loss is NaN, every other one is exactly
    what it is without the NaN, and only the NaN row's gradient holds NaN."""
    dev = device_for(backend.split("-")[0])
    targets, adv, mask = tokens(dev)
    clean = logits_case(dtype, dev)
    dirty = clean.clone()
    poison_row(dirty, targets, "one")
    kw = dict(logit_softcap=cap, temperature=temperature, loss_agg_mode="none")
    results = []
    with backend_variant(backend) as name:
        for z in (clean, dirty):
            x = z.clone().requires_grad_(True)
            loss = gft_loss(x, targets, adv, mask, backend=name, **kw)
            loss.sum().backward()
            results.append((loss.detach().cpu(), x.grad.cpu()))
    (loss_c, grad_c), (loss_d, grad_d) = results
    others = torch.ones(B, T, dtype=torch.bool)
    others[LOSS_TOKEN] = False
    assert torch.isnan(loss_d[LOSS_TOKEN])
    assert torch.equal(loss_d[others], loss_c[others])
    assert torch.equal(grad_d[others], grad_c[others])
    assert torch.isnan(grad_d[LOSS_TOKEN]).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", HEAD_ENTRIES)
@pytest.mark.parametrize("what", ["hidden", "weight", "bias"])
@pytest.mark.parametrize(("dtype", "cap", "temperature"), numerics_params(HEAD_NUMERICS))
def test_nan_in_head_input_gives_nan_loss(backend, entry, what, dtype, cap, temperature):
    """A NaN hidden state of a loss-carrying token reaches every logit of its row; a NaN in
    a weight row or bias entry reaches one logit of every row."""
    dev = device_for(backend)
    targets, adv, mask = tokens(dev)
    leaves = head_case(dtype, dev)
    if what == "hidden":
        leaves["h"][LOSS_TOKEN + (3,)] = NAN
    elif what == "weight":
        leaves["w"][5, 2] = NAN
    else:
        leaves["b"][7] = NAN
    loss, grads = run(entry, backend, leaves, targets, adv, mask, cap, temperature)
    assert torch.isnan(reference(leaves, targets, adv, mask, cap, temperature))
    assert torch.isnan(loss), f"{backend}/{entry}: loss {loss} for a NaN {what}"
    assert_no_silent_nan(loss, grads)


# --- a NaN in a row that carries no loss --------------------------------------------------


@pytest.mark.parametrize("entry", LOGITS_ENTRIES)
@pytest.mark.parametrize("dropped", list(DROPPED))
@pytest.mark.parametrize(ROW_ARGS, row_params())
def test_nan_logits_without_loss_change_nothing(backend, entry, dropped, dtype, cap, temperature):
    dev = device_for(backend.split("-")[0])
    targets, adv, mask = tokens(dev)
    clean = logits_case(dtype, dev)
    dirty = clean.clone()
    dirty[DROPPED[dropped]] = NAN
    with backend_variant(backend) as name:
        want = run(entry, name, {"z": clean}, targets, adv, mask, cap, temperature)
        got = run(entry, name, {"z": dirty}, targets, adv, mask, cap, temperature)
    assert torch.isfinite(got[0]), f"{backend}: NaN in a {dropped} row reached the loss"
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1]["z"], want[1]["z"])
    ref = reference({"z": clean}, targets, adv, mask, cap, temperature)
    torch.testing.assert_close(got[0].double(), ref, **loss_tolerance(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", HEAD_ENTRIES)
@pytest.mark.parametrize("dropped", list(DROPPED))
@pytest.mark.parametrize(("dtype", "cap", "temperature"), numerics_params(HEAD_NUMERICS))
def test_nan_hidden_without_loss_changes_nothing(backend, entry, dropped, dtype, cap, temperature):
    """Dropped before the first matmul (the default), or kept (``compact_tokens=False``,
    stats): a NaN hidden state of a token that carries no loss changes nothing."""
    dev = device_for(backend)
    targets, adv, mask = tokens(dev)
    clean = head_case(dtype, dev)
    dirty = dict(clean, h=clean["h"].clone())
    dirty["h"][DROPPED[dropped]] = NAN
    want = run(entry, backend, clean, targets, adv, mask, cap, temperature)
    got = run(entry, backend, dirty, targets, adv, mask, cap, temperature)
    assert torch.isfinite(got[0]), f"{backend}: NaN hidden of a {dropped} token reached the loss"
    assert torch.equal(got[0], want[0])
    for name in "wb":
        assert torch.equal(got[1][name], want[1][name]), name
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[DROPPED[dropped]] = False
    assert torch.equal(got[1]["h"][keep], want[1]["h"][keep])
    assert torch.all(got[1]["h"][DROPPED[dropped]] == 0)
    ref = reference(clean, targets, adv, mask, cap, temperature)
    torch.testing.assert_close(got[0].double(), ref, **loss_tolerance(dtype))


# --- rows without NaN whose max is not finite: still no loss -----------------------------


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rows_without_finite_max_still_carry_no_loss(backend, temperature):
    """All -inf, or a +inf entry (no soft-cap: it would map +inf to cap), with no NaN:
    loss 0 and gradient 0 for those rows, as before."""
    dev = device_for(backend.split("-")[0])
    targets, adv, mask = tokens(dev)
    clean = logits_case(torch.float32, dev)
    dirty = clean.clone()
    dirty[0, 0] = -INF
    dirty[0, 2, 5] = INF
    kw = dict(temperature=temperature, loss_agg_mode="none")
    with backend_variant(backend) as name:
        x = dirty.clone().requires_grad_(True)
        loss = gft_loss(x, targets, adv, mask, backend=name, **kw)
        loss.sum().backward()
        y = clean.clone().requires_grad_(True)
        want = gft_loss(y, targets, adv, mask, backend=name, **kw)
        want.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    assert torch.all(loss[0, [0, 2]] == 0) and torch.all(x.grad[0, [0, 2]] == 0)
    rest = torch.ones(B, T, dtype=torch.bool)
    rest[0, [0, 2]] = False
    assert torch.equal(loss[rest], want[rest]) and torch.equal(x.grad[rest], y.grad[rest])


# --- vocab-parallel: blocks of columns combined, then token_terms -------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_blocks_follow_the_rules(backend):
    """Rows split into column blocks (vocab-parallel ranks, or the column segments of one
    row) and combined exactly: a NaN in any block gives a NaN loss, a row without NaN whose
    max is not finite none, and the DCR boundary is decided as in the unsplit pass."""
    dev = device_for(backend)
    rows = load_backend(check_backend(backend, dev, torch.float32))
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(6, 20, generator=gen) * 2
    targets = torch.tensor([3, 2, 15, 1, 0, 9])
    z[1, 17] = NAN  # target in the first block, NaN in the second
    z[2, 4] = INF  # +inf in the first block, target in the second
    z[3] = -INF
    z[4] = 1.5  # uniform: q = 1/20 = tau
    z[5, :8] = NAN  # a whole block of NaN
    adv = torch.tensor([1.0, -1.0, 2.0, 0.5, 1.0, 1.0])
    params = RowParams(tau=0.05, temperature=0.7)
    blocks = (slice(0, 8), slice(8, 20))
    parts = []
    for cols in blocks:
        local = targets - cols.start
        local = torch.where((local >= 0) & (local < cols.stop - cols.start), local, -1)
        parts.append(
            rows.partial_stats(z[:, cols].to(dev), local.to(dev), params, with_entropy=True)
        )
    stacked = PartialStats(
        *(torch.stack([getattr(p, f).cpu() for p in parts], -1) for f in vars(parts[0]))
    )
    row_max, sum_exp, sum_exp_1, weighted, target_logit = combine_partials(
        stacked,
        params,
        reduce_max=lambda x: x.amax(-1, keepdim=True),
        reduce_sum=lambda s: s.sum(-1),
    )
    valid = torch.ones(6, dtype=torch.bool)
    loss, logprobs, probs, entropy, scale = token_terms(
        row_max.squeeze(-1), sum_exp, sum_exp_1, weighted, target_logit, valid, adv, params
    )
    assert torch.isnan(loss[[1, 5]]).all(), loss
    assert torch.all(loss[[2, 3]] == 0) and torch.all(scale[[2, 3]] == 0), loss
    want = rows.token_pass(
        z.to(dev),
        targets.to(dev),
        adv.to(dev),
        None,
        params,
        tokens_per_advantage=1,
        with_stats=True,
    )
    for name, got in dict(loss=loss, logprobs=logprobs, probs=probs, entropy=entropy).items():
        ref = getattr(want, name).cpu()
        torch.testing.assert_close(got[[0, 4]], ref[[0, 4]], rtol=2e-6, atol=2e-6)
        assert torch.equal(torch.isnan(got), torch.isnan(ref)), name
    assert probs[4] == torch.tensor(0.05, dtype=torch.float32) and scale[4] == probs[4]
    ref = reference_fp64(
        z[[0, 4]].double(),
        targets[[0, 4]],
        adv[[0, 4]],
        None,
        tau=0.05,
        temperature=0.7,
        loss_agg_mode="none",
    )
    torch.testing.assert_close(loss[[0, 4]].double(), ref, rtol=1e-5, atol=1e-6)
