"""Mixture-of-experts models (tiny Mixtral, Qwen2-MoE, Qwen3-MoE): each expert's matrices as targets."""
from __future__ import annotations

from dataclasses import replace
import json

import torch
from click.testing import CliRunner

from helpers import dense, inputs_for, outputs, rel_error, saved_tensors
from lora_compress import CompressConfig, LowRankLinear, apply_adapters, compress, compress_, export_dense, load
from lora_compress.methods.config import RunConfig
from lora_compress.cli import main
from lora_compress.core.experts import FactoredExperts, fuse_experts_, unfuse_experts_
from lora_compress.core.svd import factorize
from lora_compress.core.targets import find_targets
from lora_compress.storage.compressed import MANIFEST


def _experts(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith("mlp.experts")}


def test_split_experts_route_as_the_fused_module_and_fuse_back_bit_for_bit(moe_model):
    model = dense(moe_model)
    inputs = inputs_for(model)
    before, state = outputs(model, inputs), {k: v.clone() for k, v in model.state_dict().items()}
    split = unfuse_experts_(model)
    assert split and all(isinstance(m, FactoredExperts) for m in _experts(model).values())
    assert torch.allclose(outputs(model, inputs), before, rtol=0, atol=1e-6)
    fuse_experts_(model)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_every_experts_matrix_is_a_target_and_routers_are_not(moe_model):
    model = dense(moe_model)
    compress_(model, CompressConfig(ratio=0.5), progress=False)
    experts = next(iter(_experts(model).values()))
    assert isinstance(experts, FactoredExperts)
    assert all(isinstance(m, LowRankLinear) for m in experts.expert_modules().values())
    assert not any(isinstance(m, LowRankLinear) for n, m in model.named_modules() if n.endswith(("gate", "_gate")))


def test_full_rank_reproduces_outputs(moe_model):
    model = dense(moe_model)
    inputs = inputs_for(model)
    before = outputs(model, inputs)
    report = compress_(model, CompressConfig(energy=1.0, factor_all=True), progress=False)
    assert any("experts" in layer.name for layer in report.layers)
    assert all(layer.rank is not None for layer in report.layers)
    assert rel_error(outputs(model, inputs), before) < 1e-5


def test_output_error_falls_as_expert_rank_rises(moe_model):
    reference = dense(moe_model)
    inputs = inputs_for(reference)
    before = outputs(reference, inputs)
    errors = []
    for rank in (1, 4, 8, 16):
        model = dense(moe_model)
        compress_(model, CompressConfig(rank=rank, factor_all=True, include=("experts",)), progress=False)
        errors.append(rel_error(outputs(model, inputs), before))
    assert errors[0] > 1e-3, "rank 1 experts should really change the model (experts add little to random logits)"
    assert errors == sorted(errors, reverse=True)


def test_saved_experts_reload_bit_identical(moe_model, tmp_path):
    model = dense(moe_model)
    compress_(model, CompressConfig(ratio=0.5), progress=False)
    compress(str(moe_model), tmp_path / "out", CompressConfig(ratio=0.5), progress=False)
    loaded = load(tmp_path / "out")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    inputs = inputs_for(model)
    assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    layout = manifest["experts"]["model.layers.0.mlp.experts"]
    assert layout["num_experts"] == len(next(iter(_experts(model).values())).down_proj)
    assert set(layout["projections"]) == {"gate_up_proj", "down_proj"}
    assert manifest["layers"]["model.layers.0.mlp.experts.down_proj.1"]["rank"] is not None


def test_streamed_experts_are_the_in_memory_tensors(moe_model, tmp_path):
    compress(str(moe_model), tmp_path / "memory", CompressConfig(ratio=0.5), progress=False)
    compress(str(moe_model), tmp_path / "stream", CompressConfig(ratio=0.5), RunConfig(stream=True), progress=False)
    memory, streamed = saved_tensors(tmp_path / "memory"), saved_tensors(tmp_path / "stream")
    assert memory.keys() == streamed.keys()
    assert "model.layers.1.mlp.experts.gate_up_proj.2.lora_A" in memory
    assert all(torch.equal(memory[key], streamed[key]) for key in memory)  # bitwise


def test_experts_left_out_stay_fused_in_the_folder(tiny_models, tmp_path):
    config = CompressConfig(ratio=0.5, exclude=("experts",))
    compress(str(tiny_models["mixtral"]), tmp_path / "out", config, progress=False)
    tensors = saved_tensors(tmp_path / "out")
    assert tensors["model.layers.0.mlp.experts.gate_up_proj"].dim() == 3
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["experts"] == {}
    compress(str(tiny_models["mixtral"]), tmp_path / "stream", config, RunConfig(stream=True), progress=False)
    assert saved_tensors(tmp_path / "stream").keys() == tensors.keys()


def test_dense_export_fuses_the_experts_back_for_transformers(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    compress(str(tiny_models["mixtral"]), tmp_path / "out", CompressConfig(ratio=0.5), progress=False)
    export_dense(tmp_path / "out", tmp_path / "plain")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert not any(isinstance(m, FactoredExperts) for m in plain.modules())
    inputs = inputs_for(plain)
    original = outputs(dense(tiny_models["mixtral"]), inputs)
    exported, compressed = outputs(plain, inputs), outputs(load(tmp_path / "out"), inputs)
    assert rel_error(compressed, original) > 1e-2, "the compressed model should really differ from the dense one"
    assert rel_error(exported, compressed) < 1e-5


def test_adapters_put_expert_factors_onto_the_original_checkpoint(tiny_models, tmp_path):
    compress(str(tiny_models["qwen3_moe"]), tmp_path / "out", CompressConfig(ratio=0.5), progress=False)
    model = apply_adapters(dense(tiny_models["qwen3_moe"]), tmp_path / "out")
    inputs = inputs_for(model)
    assert torch.allclose(outputs(model, inputs), outputs(load(tmp_path / "out"), inputs), rtol=0, atol=1e-6)


def test_a_budget_spends_parameters_on_experts_at_ranks_of_their_own(tiny_models, text_file):
    model = dense(tiny_models["mixtral"])
    tokens = torch.randint(2, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    report = compress_(model, CompressConfig(budget=0.6), RunConfig(calib=str(text_file)), progress=False,
                       tokens=tokens)
    experts = [layer for layer in report.layers if ".experts." in layer.name]
    assert sum(layer.params for layer in experts) > 0.5 * report.params
    assert len({layer.rank for layer in experts}) > 2, "experts should get ranks of their own"
    assert 0.55 < report.params / report.dense_params <= 0.6


def test_an_expert_routed_few_tokens_is_factored_from_its_weights(tiny_models, text_file):
    model = dense(tiny_models["qwen3_moe"])
    tokens = torch.randint(2, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    config = CompressConfig(ratio=0.5, method="whiten", expert_min_tokens=20)
    report = compress_(model, config, RunConfig(calib=str(text_file)), progress=False, tokens=tokens)
    sparse = report.calibration["sparse_experts"]["tokens"]
    assert sparse and all(count < 20 for count in sparse.values())
    assert len(sparse) < sum(".experts." in layer.name for layer in report.layers), "some experts got enough tokens"
    name = next(iter(sparse))
    layer = next(layer for layer in report.layers if layer.name == name)
    assert "factored from its weight spectrum" in layer.note
    weight = dense(tiny_models["qwen3_moe"])
    unfuse_experts_(weight)
    plain = factorize(weight.get_submodule(name).weight, layer.rank, solver="full")
    factored = model.get_submodule(name)
    torch.testing.assert_close(factored.lora_B @ factored.lora_A, plain.B @ plain.A, rtol=1e-4, atol=1e-6)


def test_an_include_pattern_naming_a_router_whole_opts_it_in(tiny_models):
    model = dense(tiny_models["qwen2_moe"])
    unfuse_experts_(model)
    assert not any(name.endswith("shared_expert_gate") for name in find_targets(model))
    opted = find_targets(model, include=(r"model\.layers\.0\.mlp\.shared_expert_gate",))
    assert list(opted) == ["model.layers.0.mlp.shared_expert_gate"]
    assert not any(name.endswith("shared_expert_gate") for name in find_targets(model, include=("mlp",)))


def test_inspect_lists_experts_beside_linear_layers_and_says_what_is_left_dense(tiny_models):
    result = CliRunner().invoke(main, ["inspect", str(tiny_models["qwen2_moe"])])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.split()[:3] == ["model.layers.0.mlp.experts.gate_up_proj", "experts", "4"] for line in lines)
    assert any(line.startswith("model.layers.0.mlp.shared_expert.gate_proj") for line in lines)
    left = lines[lines.index("left dense:"):]
    assert any(line.startswith("model.layers.0.mlp.gate ") and "routes tokens to the 4 experts" in line
               for line in left)
    assert any(line.startswith("model.layers.1.mlp.shared_expert_gate") for line in left)


def test_unsupported_fused_experts_are_named_as_left_dense():
    from lora_compress.core.left_out import unsupported_experts

    class Experts(torch.nn.Module):  # 3-D experts outside transformers' experts interface
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(4, 8, 8))

    model = torch.nn.Sequential()
    model.add_module("experts", Experts())
    assert "not supported" in unsupported_experts(model)["experts.w"]


def test_streamed_calibration_of_experts_gives_the_in_memory_factors(tiny_models, text_file, tmp_path):
    config = CompressConfig(budget=0.6, expert_min_tokens=8)
    run = RunConfig(calib=str(text_file), calib_samples=6, calib_len=16)
    compress(str(tiny_models["mixtral"]), tmp_path / "memory", config, run, progress=False)
    compress(str(tiny_models["mixtral"]), tmp_path / "stream", config, replace(run, stream=True), progress=False)
    memory, streamed = saved_tensors(tmp_path / "memory"), saved_tensors(tmp_path / "stream")
    assert memory.keys() == streamed.keys()
    assert any(".experts.gate_up_proj." in key and key.endswith("lora_A") for key in memory)
    for key in memory:
        torch.testing.assert_close(streamed[key], memory[key], rtol=1e-5, atol=1e-6)
    layers = [json.loads((tmp_path / name / MANIFEST).read_text())["layers"] for name in ("memory", "stream")]
    assert layers[0] == layers[1]


def test_cli_expert_min_tokens_reaches_the_report(tiny_models, text_file, tmp_path):
    result = CliRunner().invoke(main, ["compress", str(tiny_models["qwen3_moe"]), "--out", str(tmp_path / "out"),
                                       "--ratio", "0.6", "--method", "whiten", "--calib", str(text_file),
                                       "--calib-samples", "4", "--calib-len", "16", "--expert-min-tokens", "1000",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "experts routed fewer than 1000 calibration tokens, factored from their weight spectrum" in report


def test_heal_trains_the_experts_factors_and_the_healed_folder_reloads(tiny_models, text_file, tmp_path):
    from lora_compress import HealConfig, heal

    compress(str(tiny_models["mixtral"]), tmp_path / "out", CompressConfig(ratio=0.5), progress=False)
    heal(tmp_path / "out", text_file, tmp_path / "healed", HealConfig(steps=2, calib_len=16, lr=1e-2), progress=False)
    name = "model.layers.0.mlp.experts.gate_up_proj.1.lora_B"
    before, after = saved_tensors(tmp_path / "out")[name], saved_tensors(tmp_path / "healed")[name]
    assert not torch.equal(before, after)
    assert isinstance(load(tmp_path / "healed").model.layers[0].mlp.experts, FactoredExperts)


def test_evaluate_counts_the_experts_among_the_targeted_parameters(tiny_models, text_file, tmp_path):
    from lora_compress import evaluate_folder

    compress(str(tiny_models["mixtral"]), tmp_path / "out", CompressConfig(ratio=0.5), progress=False)
    figures = evaluate_folder(str(tiny_models["mixtral"]), tmp_path / "out", text_file, progress=False)
    params = figures["params"]
    assert figures["drift"]["logits_rel_error"] > 1e-3, "the compressed model should really differ"
    assert params["dense_targeted"] == 43_008  # attention 6,144 + experts 36,864, as inspect lists them
    assert 0.45 < params["ratio_targeted"] <= 0.5
