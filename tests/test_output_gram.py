"""Output-space whitening: a wide layer (out ≤ in) whitened from its output Gram W·C·Wᵀ, which the hooks sum
without the bias, needs no ridge and gets the factors its input Gram gives."""
from __future__ import annotations

import pytest
import torch

from lora_compress.core.whitening import Whitening


def test_output_space_whitening_needs_no_ridge_for_a_singular_gram():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(8, 24, generator=g, dtype=torch.float64)  # out ≤ in: the output route
    X = torch.randn(6, 24, generator=g, dtype=torch.float64)  # 6 tokens: XᵀX has rank 6
    factors = Whitening(W, X.T @ X).factors(4)
    error = torch.linalg.norm((W - factors.B @ factors.A) @ X.T)
    optimum = torch.linalg.svdvals(W @ X.T)[4:].pow(2).sum().sqrt()
    assert torch.isfinite(factors.A).all() and float(error) == pytest.approx(float(optimum), rel=1e-6)


def test_a_wide_layer_whitened_from_its_output_gram_gets_the_factors_of_its_input_gram():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(6, 20, generator=g, dtype=torch.float64)
    X = torch.randn(50, 20, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 20, dtype=torch.float64)
    F = torch.randn(6, 6, generator=g, dtype=torch.float64)
    F = F @ F.T
    from_inputs = Whitening(W, X.T @ X, weights=F, damping=0.1).factors(3)
    from_outputs = Whitening(W, output_gram=W @ X.T @ X @ W.T, weights=F, damping=0.1).factors(3)
    torch.testing.assert_close(from_outputs.B @ from_outputs.A, from_inputs.B @ from_inputs.A, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(from_outputs.singular_values, from_inputs.singular_values, rtol=1e-6, atol=1e-9)


def test_hooks_sum_a_wide_layer_s_output_gram_without_its_bias():
    from lora_compress.calibrate.collectors import InputGram, OutputGram, StatisticsHooks, collectors_for

    wide, tall = torch.nn.Linear(12, 4), torch.nn.Linear(4, 9)
    modules = {"wide": wide, "tall": tall}
    x = torch.randn(3, 5, 12)
    hooks = StatisticsHooks(modules, collectors_for(modules, (InputGram(), OutputGram())))
    with torch.no_grad():
        tall(wide(x))
    hooks.remove()
    stats = hooks.statistics(15)
    flat = x.reshape(-1, 12)
    expected = wide.weight @ flat.T @ flat @ wide.weight.T  # W·C·Wᵀ: the bias is left out
    torch.testing.assert_close(stats["wide"]["output_gram"].float(), expected.detach(), rtol=1e-4, atol=1e-4)
    assert "gram" not in stats["wide"] and stats["tall"]["gram"].shape == (4, 4)  # the tall layer: its input side
