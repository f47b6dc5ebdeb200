"""``shared-basis``: one A (or B) for a layer's experts, against per-expert SVD at equal parameters."""
from __future__ import annotations

import pytest
import torch

from helpers import dense, inputs_for, outputs, saved_tensors
from lora_compress import (CompressConfig, HealConfig, LoraCompressError, SharedBasisConfig, compress, compress_, heal,
                           load)
from lora_compress.methods.config import RunConfig
from lora_compress.core.counting import targeted_params
from lora_compress.core.shared_basis import equal_params_rank, shared_factors, shared_params, shared_spectrum
from lora_compress.methods.shared_basis import basis_errors, factor_shared_experts


def _experts(kind: str, experts: int = 8, shape=(48, 32), seed: int = 0) -> torch.Tensor:
    """(E, out, in): independent random experts, or experts grown from one MLP (each its own 20% drift)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(experts, *shape, generator=generator)
    if kind == "random":
        return noise
    return torch.randn(*shape, generator=generator) + 0.2 * noise


def _error(weights: torch.Tensor, factors) -> float:
    return float(sum((W - f.B @ f.A).pow(2).sum() for W, f in zip(weights, factors)))


@pytest.mark.parametrize("side", ["input", "output"])
def test_a_shared_basis_of_full_width_is_exact_and_its_error_is_the_spectrum_tail(side):
    weights = _experts("random")
    width = weights.shape[2] if side == "input" else weights.shape[1]
    exact = shared_factors(weights, width, side)
    assert _error(weights, exact) < 1e-6 * float(weights.pow(2).sum())
    rank = 6
    factors = shared_factors(weights, rank, side)
    tail = float(shared_spectrum(weights, side)[rank:].sum())
    assert abs(_error(weights, factors) - tail) < 1e-4 * tail
    shared = "A" if side == "input" else "B"
    assert all(getattr(f, shared) is getattr(factors[0], shared) for f in factors)


@pytest.mark.parametrize("side", ["input", "output"])
def test_the_equal_parameter_rank_spends_no_more_than_per_expert_factors(side):
    experts, shape = 8, (48, 32)
    for rank in (1, 4, 9, 16):
        shared = equal_params_rank(experts, shape, rank, side)
        assert shared_params(experts, shape, shared, side) <= experts * rank * sum(shape)
        assert shared_params(experts, shape, shared + 1, side) > experts * rank * sum(shape) or shared == min(shape)


def test_experts_grown_from_one_mlp_keep_more_on_a_shared_basis_than_apart():
    weights = _experts("upcycled")
    errors = basis_errors(weights, 8)
    assert errors["per-expert"][0] > 0, "per-expert rank 8 should lose something"
    assert errors["input"][0] < 0.8 * errors["per-expert"][0]
    factors = factor_shared_experts(weights, 8, SharedBasisConfig())
    assert _error(weights, factors) == pytest.approx(min(e for e, _ in errors.values()), rel=1e-4)


def test_independent_random_experts_stay_apart_under_auto():
    weights = _experts("random")
    errors = basis_errors(weights, 8)
    assert errors["per-expert"][0] < min(errors["input"][0], errors["output"][0])
    factors = factor_shared_experts(weights, 8, SharedBasisConfig())
    assert factors[0].A is not factors[1].A and factors[0].B is not factors[1].B


def test_an_unknown_side_is_refused():
    with pytest.raises(LoraCompressError, match="side 'left' is unknown; choose one of auto, input, output"):
        SharedBasisConfig(side="left")


def test_the_method_ties_one_tensor_across_experts_and_reloads_bit_identical(tiny_models, tmp_path):
    config = CompressConfig(ratio=0.5, method=SharedBasisConfig(side="input"))
    model = dense(tiny_models["mixtral"])
    report = compress_(model, config, progress=False)
    experts = model.model.layers[0].mlp.experts
    assert all(m.lora_A is experts.gate_up_proj[0].lora_A for m in experts.gate_up_proj)
    assert report.params == targeted_params(model, [layer.name for layer in report.layers])
    assert report.params <= 0.5 * report.dense_params
    compress(str(tiny_models["mixtral"]), tmp_path / "out", config, progress=False)
    loaded = load(tmp_path / "out")
    down = loaded.model.layers[1].mlp.experts.down_proj
    assert down[3].lora_A is down[0].lora_A
    inputs = inputs_for(model)
    assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))
    assert "model.layers.0.mlp.experts.gate_up_proj.1.lora_A" not in saved_tensors(tmp_path / "out")


def test_streamed_shared_basis_writes_the_in_memory_tensors(tiny_models, tmp_path):
    config = CompressConfig(ratio=0.5, method=SharedBasisConfig(side="output"))
    compress(str(tiny_models["qwen3_moe"]), tmp_path / "memory", config, progress=False)
    compress(str(tiny_models["qwen3_moe"]), tmp_path / "stream", config, RunConfig(stream=True), progress=False)
    memory, streamed = saved_tensors(tmp_path / "memory"), saved_tensors(tmp_path / "stream")
    assert memory.keys() == streamed.keys()
    assert all(torch.equal(memory[key], streamed[key]) for key in memory)


def test_an_energy_rule_is_refused_as_the_method_spends_a_parameter_count(tiny_models):
    with pytest.raises(LoraCompressError, match="^method shared-basis spends the parameters of a rank per expert; pass rank or ratio, not energy"):
        compress_(dense(tiny_models["mixtral"]), CompressConfig(energy=0.9, method="shared-basis"), progress=False)


def test_heal_refuses_a_shared_basis_with_one_line(tiny_models, text_file, tmp_path):
    compress(str(tiny_models["mixtral"]), tmp_path / "out", CompressConfig(ratio=0.5, method="shared-basis",
                                                                            options=SharedBasisConfig(side="input")),
             progress=False)
    with pytest.raises(LoraCompressError, match="shares one basis across experts"):
        heal(tmp_path / "out", text_file, tmp_path / "healed", HealConfig(steps=1))
