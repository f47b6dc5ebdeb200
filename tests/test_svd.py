"""The SVD math: factor shapes, exactness, truncation error, rank rules."""
import math

import pytest
import torch

from lora_compress.core.svd import (break_even_rank, energy_kept, factorize, rank_for_energy, rank_for_ratio,
                               truncated_svd)


def test_rank_two_weight_gives_factors_of_rank_two_and_the_same_output():
    torch.manual_seed(0)
    W = torch.randn(10, 2) @ torch.randn(2, 10)  # (10, 10), rank 2
    x = torch.randn(4, 10)
    f = factorize(W, 2)
    assert f.B.shape == (10, 2) and f.A.shape == (2, 10)
    assert torch.allclose(x @ f.A.T @ f.B.T, x @ W.T, atol=1e-4)
    assert f.energy_kept == pytest.approx(1.0, abs=1e-6)


def test_error_falls_as_rank_rises_and_matches_eckart_young():
    torch.manual_seed(0)
    W = torch.randn(48, 32)
    errors = []
    for rank in (1, 4, 8, 16, 32):
        f = factorize(W, rank, solver="full")
        error = torch.linalg.norm(W - f.B @ f.A) / torch.linalg.norm(W)
        assert float(error) == pytest.approx(math.sqrt(1 - f.energy_kept), abs=1e-4)
        errors.append(float(error))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-5


@pytest.mark.parametrize("rank", [0, -1, 11])
def test_rank_outside_one_to_min_dim_raises(rank):
    with pytest.raises(ValueError, match="outside 1..10"):
        factorize(torch.randn(10, 12), rank)


def test_factors_come_back_in_the_weight_dtype():
    f = factorize(torch.randn(16, 8, dtype=torch.bfloat16), 4)
    assert f.B.dtype == f.A.dtype == torch.bfloat16


def test_rank_for_ratio_keeps_that_fraction_of_parameters():
    assert rank_for_ratio(576, 576, 0.8) == math.floor(0.8 * 576 * 576 / 1152)
    assert rank_for_ratio(1536, 576, 0.5) * (1536 + 576) <= 0.5 * 1536 * 576


def test_break_even_rank_is_the_largest_rank_that_saves_parameters():
    for m, n in [(10, 10), (576, 1536), (7, 3)]:
        r = break_even_rank(m, n)
        assert r * (m + n) < m * n <= (r + 1) * (m + n)


def test_rank_for_energy_is_the_smallest_rank_reaching_it():
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.5])
    for energy in (0.1, 0.6, 0.9, 0.99, 1.0):
        r = rank_for_energy(sigma, energy)
        assert energy_kept(sigma, r) >= energy - 1e-9
        assert r == 1 or energy_kept(sigma, r - 1) < energy


@pytest.mark.parametrize("outlier_boost", [1, 4, 10])
def test_randomized_svd_stays_within_one_percent_on_a_flat_spectrum_with_outliers(outlier_boost):
    """LLM-like: σ_i ∝ i^-0.3 with four outlier directions. The bf16 Gram used to cost 1.2% at a 10× boost."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(384, 384, generator=g))
    V, _ = torch.linalg.qr(torch.randn(1024, 384, generator=g))
    sigma = torch.arange(1, 385).float().pow(-0.3)
    sigma[:4] *= outlier_boost
    W = (U * sigma) @ V.T
    full, fast = factorize(W, 96, solver="full"), factorize(W, 96, solver="randomized")
    assert float(torch.linalg.norm(W - fast.B @ fast.A)) <= 1.01 * float(torch.linalg.norm(W - full.B @ full.A))


def test_randomized_svd_matches_full_truncation_error_on_a_decaying_spectrum():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(200, 100))
    V, _ = torch.linalg.qr(torch.randn(150, 100))
    W = U @ torch.diag(torch.logspace(0, -3, 100)) @ V.T  # (200, 150)
    full = factorize(W, 20, solver="full")
    fast = factorize(W, 20, solver="randomized")
    err_full = torch.linalg.norm(W - full.B @ full.A)
    err_fast = torch.linalg.norm(W - fast.B @ fast.A)
    assert float(err_fast) <= float(err_full) * 1.01
    assert truncated_svd(W, 20, solver="randomized")[3].pow(2).sum() == pytest.approx(float(W.pow(2).sum()), rel=1e-4)
