"""compress_ on tiny Llama, BERT and GPT-2 (Conv1D) models."""
import pytest
import torch

from lora_compress import CompressConfig, LoraCompressError, LowRankLinear, compress_
from lora_compress.core.layers import is_conv1d
from lora_compress.core.targets import find_targets

from helpers import dense, inputs_for, outputs, rel_error


def test_full_rank_reproduces_outputs(tiny_model):
    model = dense(tiny_model)
    inputs = inputs_for(model)
    before = outputs(model, inputs)
    report = compress_(model, CompressConfig(energy=1.0, factor_all=True), progress=False)
    assert all(layer.rank is not None for layer in report.layers)
    assert rel_error(outputs(model, inputs), before) < 1e-4


def test_output_error_falls_as_rank_rises(tiny_model):
    reference = dense(tiny_model)
    inputs = inputs_for(reference)
    before = outputs(reference, inputs)
    errors = []
    for rank in (1, 4, 8, 16):
        model = dense(tiny_model)
        compress_(model, CompressConfig(rank=rank, factor_all=True), progress=False)
        errors.append(rel_error(outputs(model, inputs), before))
    assert errors[0] > 1e-2, "rank 1 should really change the model"
    assert errors == sorted(errors, reverse=True)


def test_ratio_keeps_that_fraction_of_targeted_parameters(tiny_model):
    model = dense(tiny_model)
    report = compress_(model, CompressConfig(ratio=0.5), progress=False)
    assert 0.4 < report.params / report.dense_params <= 0.5
    factored = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(factored) == len(report.layers)


def test_a_rank_that_saves_nothing_leaves_the_layer_dense(tiny_models):
    model = dense(tiny_models["llama"])
    report = compress_(model, CompressConfig(rank=16, include=("self_attn",)), progress=False)  # break-even ≤ 15 there
    assert all(layer.rank is None and "break-even" in layer.note for layer in report.layers)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_lm_head_and_tied_embeddings_are_left_alone(tiny_models):
    model = dense(tiny_models["llama"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    compress_(model, CompressConfig(ratio=0.5), progress=False)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_gpt2_conv1d_layers_are_targeted_and_factored(tiny_models):
    model = dense(tiny_models["gpt2"])
    names = [n for n, m in find_targets(model).items() if is_conv1d(m)]
    assert "transformer.h.0.attn.c_attn" in names
    compress_(model, CompressConfig(rank=4), progress=False)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LowRankLinear) and layer.lora_B.shape == (96, 4) and layer.lora_A.shape == (4, 32)


def test_include_and_exclude_select_modules_by_regex(tiny_models):
    model = dense(tiny_models["llama"])
    report = compress_(model, CompressConfig(rank=2, include=("mlp",), exclude=("down_proj",)), progress=False)
    assert {layer.name.rsplit(".", 1)[-1] for layer in report.layers} == {"gate_proj", "up_proj"}


@pytest.mark.parametrize("option", ["include", "exclude"])
def test_a_pattern_matching_no_module_raises(tiny_models, option):
    with pytest.raises(LoraCompressError, match=f"--{option} 'nothing_here' matches no linear module"):
        compress_(dense(tiny_models["llama"]), CompressConfig(rank=2, **{option: ("nothing_here",)}))


def test_rank_above_a_layers_min_dimension_raises(tiny_models):
    with pytest.raises(LoraCompressError, match="^rank 33 is larger than"):
        compress_(dense(tiny_models["llama"]), CompressConfig(rank=33))


def test_nan_in_a_weight_raises_naming_the_layer(tiny_models):
    model = dense(tiny_models["bert"])
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[0, 0] = float("nan")
    with pytest.raises(LoraCompressError, match=r"encoder.layer.1.output.dense.weight contains NaN"):
        compress_(model, CompressConfig(rank=2), progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of"), ({"rank": 2, "ratio": 0.5}, "exactly one of"),
    ({"rank": 0}, "positive"), ({"ratio": 1.5}, r"outside \(0, 1\]"), ({"energy": 0.0}, r"outside \(0, 1\]"),
])
def test_bad_rank_options_raise(kwargs, message):
    with pytest.raises(LoraCompressError, match=message):
        CompressConfig(**kwargs)


def test_dtype_is_kept(tiny_models):
    model = dense(tiny_models["llama"]).to(torch.bfloat16)
    compress_(model, CompressConfig(rank=4), progress=False)
    assert model.model.layers[0].mlp.up_proj.lora_A.dtype == torch.bfloat16


def test_speed_rule_leaves_layers_dense_above_max_keep(tiny_model):
    report = compress_(dense(tiny_model), CompressConfig(ratio=0.95), progress=False)
    assert all(layer.rank is None and "max_keep 0.9" in layer.note for layer in report.layers)
    report = compress_(dense(tiny_model), CompressConfig(ratio=0.95, max_keep=1.0), progress=False)
    assert all(layer.rank is not None for layer in report.layers)


@pytest.mark.parametrize("max_keep", [0.0, 1.5])
def test_max_keep_outside_unit_interval_is_refused(max_keep):
    with pytest.raises(LoraCompressError, match="^max_keep"):
        CompressConfig(ratio=0.5, max_keep=max_keep)
