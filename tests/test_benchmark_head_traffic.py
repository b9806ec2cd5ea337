"""The static model of the fused head (benchmarks.head_traffic) against hand arithmetic."""

import pytest

from benchmarks import head_traffic as model


def test_chunks_follow_the_one_gib_budget_in_equal_parts():
    # 1 GiB / (151936 x 2 bytes) = 3533 tokens: 16384 tokens take 5 chunks of 3277.
    assert model.chunk_tokens(16384, 151936) == 3277
    assert model.chunk_tokens(100, 1000) == 100


def test_compute_bound_ratios_are_the_product_counts():
    """At H = 4096 every GEMM-sized pass is compute-bound on an H200: the blockwise head
    runs 4 products against the bare 3 (2 + 2 kept for none skipped), the deterministic
    mode 5, and with every tile skipped 2."""
    n, h, v = 16384, 4096, 151936
    gemm = model.total(model.bare_gemms(n, h, v), model.H200)
    assert gemm == pytest.approx(3 * 2.0 * n * v * h / 989e12)
    ratio = lambda **kw: model.total(model.blockwise(n, h, v, **kw), model.H200) / gemm  # noqa: E731
    assert ratio(kept=1.0) == pytest.approx(4 / 3, rel=1e-3)
    assert ratio(kept=1.0, deterministic=True) == pytest.approx(5 / 3, rel=1e-3)
    assert ratio(kept=0.0) == pytest.approx(2 / 3, rel=1e-3)


def test_chunked_adds_the_row_pass_traffic():
    """The chunked head's extra over its GEMMs is its row pass: read and write N x V bf16
    at the HBM bandwidth (the GEMMs being compute-bound at this shape)."""
    n, h, v = 16384, 4096, 151936
    row_pass = 2 * n * v * 2 / model.H200.hbm_bytes_per_s
    extra = model.total(model.chunked(n, h, v), model.H200) - model.total(
        model.bare_gemms(n, h, v), model.H200
    )
    assert extra == pytest.approx(row_pass, rel=1e-6)


def test_traffic_per_token_and_atomics_by_hand():
    n, h, v = 1024, 1536, 151936
    (stats, grad) = model.blockwise(n, h, v)
    assert stats.hbm_bytes == (n * h + v * h) * 2
    pairs = (n // 64) * -(-v // 128)
    assert grad.l2_atomic_bytes == pairs * (64 + 128) * h * 4 * 2
    assert model.blockwise(n, h, v, deterministic=True)[-1].l2_atomic_bytes == 0


def test_tables_print():
    assert "| 1536 |" in model.traffic_table()
    table = model.time_table(model.H200)
    assert table.count("\n| blockwise") == 4 and "| chunked |" in table
