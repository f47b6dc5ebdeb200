"""The randomized SVD against the full one: stated tolerance, seeding, and what ``auto`` picks."""
from __future__ import annotations

import pytest
import torch

from lora_compress.core import svd as svdmath


def _with_spectrum(m, n, singular_values, seed=0):
    generator = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(singular_values), generator=generator))[0]
    V = torch.linalg.qr(torch.randn(n, len(singular_values), generator=generator))[0]
    return (U * singular_values) @ V.T  # (m, n)


def _error(matrix, rank, svd):
    U, S, Vh, _ = svdmath.truncated_svd(matrix, rank, solver=svd)
    return float(torch.linalg.norm(matrix - (U * S) @ Vh))


@pytest.mark.parametrize("decay", [0.999, 0.99, 0.9])  # flat (LLM-like) to fast-decaying spectra
@pytest.mark.parametrize("shape", [(200, 600), (600, 200)])
def test_randomized_truncation_error_is_within_tolerance_of_full(shape, decay):
    matrix = _with_spectrum(*shape, decay ** torch.arange(200, dtype=torch.float32))
    full, randomized = _error(matrix, 40, "full"), _error(matrix, 40, "randomized")
    assert full > 0
    assert randomized <= (1 + svdmath.RANDOMIZED_TOLERANCE) * full + 1e-6 * float(torch.linalg.norm(matrix))


def test_randomized_energy_accounts_for_every_singular_value():
    matrix = torch.randn(100, 300, generator=torch.Generator().manual_seed(1))
    *_, estimates = svdmath.truncated_svd(matrix, 20, solver="randomized")
    assert torch.isclose(estimates.pow(2).sum(), matrix.pow(2).sum(), rtol=1e-4)


def test_randomized_svd_is_seeded():
    matrix = torch.randn(120, 300, generator=torch.Generator().manual_seed(2))
    first, again = (svdmath.factorize(matrix, 16, solver="randomized", seed=5) for _ in range(2))
    other = svdmath.factorize(matrix, 16, solver="randomized", seed=6)
    assert torch.equal(first.B, again.B) and torch.equal(first.A, again.A)
    assert not torch.equal(first.A, other.A)


def test_auto_picks_randomized_only_well_below_the_smaller_dimension():
    assert svdmath.choose_svd((576, 1536), 128) == "randomized"
    assert svdmath.choose_svd((192, 576), 128) == "gram"
    assert svdmath.choose_svd((4096, 4096), 3000) == "gram"


@pytest.mark.parametrize("shape", [(120, 300), (300, 120)])
def test_gram_solver_matches_the_full_svd(shape):
    matrix = _with_spectrum(*shape, 0.97 ** torch.arange(120, dtype=torch.float32))
    U, S, Vh, S_all = svdmath.truncated_svd(matrix, 30, solver="gram")
    full = svdmath.truncated_svd(matrix, 30, solver="full")
    assert torch.allclose(S, full[1], rtol=1e-4)
    assert torch.allclose(U.T @ U, torch.eye(30), atol=1e-4)
    assert _error(matrix, 30, "gram") == pytest.approx(_error(matrix, 30, "full"), rel=1e-4)
    assert torch.isclose(S_all.pow(2).sum(), matrix.pow(2).sum(), rtol=1e-4)


def test_gram_solver_falls_back_to_the_full_svd_where_its_rounding_would_show():
    matrix = _with_spectrum(100, 200, torch.cat([torch.ones(20), torch.full((20,), 1e-5)]))
    assert svdmath._gram_eigh_svd(matrix, 20, matrix.pow(2).sum()) is None  # error 1e-5·σ₁: below float32 Gram's reach
    assert _error(matrix, 20, "gram") == pytest.approx(_error(matrix, 20, "full"), rel=1e-3, abs=1e-6)


@pytest.mark.real
def test_randomized_matches_full_within_tolerance_on_smollm2(smollm2_dir):
    from safetensors import safe_open

    with safe_open(smollm2_dir / "model.safetensors", "pt") as handle:
        keys = [k for k in handle.keys() if k.startswith("model.layers.7.") and k.endswith("proj.weight")]
        weights = [handle.get_tensor(k).float() for k in keys]
    assert len(weights) == 7
    for weight in weights:
        assert _error(weight, 64, "randomized") <= (1 + svdmath.RANDOMIZED_TOLERANCE) * _error(weight, 64, "full")
