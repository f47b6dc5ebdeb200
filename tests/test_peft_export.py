"""Extracting fine-tunes as PEFT LoRA adapters, dense export, and model cards."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import dense, inputs_for, outputs, rel_error, run
from safetensors import safe_open
from transformers import AutoTokenizer

from lora_compress import CompressConfig, LoraCompressError, compress, load
from lora_compress.export.dense import export_dense
from lora_compress.export.extract import ExtractConfig, extract
from lora_compress.methods.allocate import LayerCost, allocate

peft = pytest.importorskip("peft")


def make_tuned(base_folder, out, *, rank: int = 3, seed: int = 1, norms: bool = False, biases: bool = False,
               only: str = "", vocab: int | None = None, scale: float = 0.05):
    """A 'fine-tune' of ``base_folder``: a rank-``rank`` delta on every 2-D linear weight (matching ``only``)."""
    model = dense(base_folder)
    if vocab is not None:
        model.resize_token_embeddings(vocab)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if weight is None or weight.dim() != 2 or isinstance(module, torch.nn.Embedding) or only not in name:
                continue
            weight.add_(scale * torch.randn(weight.shape[0], rank, generator=generator)
                        @ torch.randn(rank, weight.shape[1], generator=generator))
            if biases and getattr(module, "bias", None) is not None:
                module.bias.add_(0.05)
        for name, param in model.named_parameters():
            if norms and param.dim() == 1 and ("norm" in name or "ln_f" in name):
                param.add_(0.1)
    model.save_pretrained(out)
    for side in base_folder.iterdir():
        if side.name.startswith(("tokenizer", "special")):
            shutil.copy2(side, out / side.name)
    return out


def peft_model(base_folder, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(dense(base_folder), adapter).eval()


def tuned_vs(base_folder, tuned_folder, candidate) -> float:
    """Relative output error of ``candidate`` against the tuned model, after checking tuned ≠ base."""
    base, tuned = dense(base_folder), dense(tuned_folder)
    inputs = inputs_for(base)
    assert rel_error(outputs(base, inputs), outputs(tuned, inputs)) > 1e-3  # the fine-tune changed something
    return rel_error(outputs(candidate, inputs), outputs(tuned, inputs))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_full_rank_adapter_reproduces_the_tuned_model_in_peft(tiny_models, tmp_path, arch):
    tuned = make_tuned(tiny_models[arch], tmp_path / "tuned", rank=20, biases=True)
    report = extract(str(tiny_models[arch]), str(tuned), tmp_path / "adapter", ExtractConfig(rank=4096), progress=False)
    assert tuned_vs(tiny_models[arch], tuned, peft_model(tiny_models[arch], tmp_path / "adapter")) < 1e-4
    assert report.output_error["svd"]["logits_rel_error" if arch != "bert" else "output_rel_error"] < 1e-4
    assert all("capped" in layer.note for layer in report.layers)


def test_error_falls_as_rank_rises_and_the_true_rank_is_exact(tiny_models, tmp_path):
    base = tiny_models["llama"]
    tuned = make_tuned(base, tmp_path / "tuned", rank=3)
    errors = []
    for rank in (1, 2, 3):
        extract(str(base), str(tuned), tmp_path / f"r{rank}", ExtractConfig(rank=rank), progress=False)
        errors.append(tuned_vs(base, tuned, peft_model(base, tmp_path / f"r{rank}")))
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] > 1e-3 and errors[2] < 1e-4


def test_adapter_files_follow_peft_naming(tiny_models, tmp_path):
    extract(str(tiny_models["llama"]), str(make_tuned(tiny_models["llama"], tmp_path / "tuned")),
            tmp_path / "adapter", ExtractConfig(rank=2), progress=False)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 2, 2)
    assert config["fan_in_fan_out"] is False and config["rank_pattern"] == {}
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        assert handle.get_slice(key).get_shape() == [2, 32]
    assert len(config["target_modules"]) == 14  # 2 blocks × 7 linear layers


def test_conv1d_layers_set_fan_in_fan_out_and_keep_linear_orientation(tiny_models, tmp_path):
    base = tiny_models["gpt2"]
    tuned = make_tuned(base, tmp_path / "tuned", rank=3)
    extract(str(base), str(tuned), tmp_path / "adapter", ExtractConfig(rank=3), progress=False)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as handle:
        assert handle.get_slice("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight").get_shape() == [3, 32]
        assert handle.get_slice("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight").get_shape() == [96, 3]
    assert tuned_vs(base, tuned, peft_model(base, tmp_path / "adapter")) < 1e-4


def test_energy_gives_per_layer_ranks_with_consistent_patterns(tiny_models, tmp_path):
    base = tiny_models["llama"]
    tuned = make_tuned(base, tmp_path / "tuned", rank=1)
    tuned = make_tuned(tuned, tmp_path / "tuned2", rank=4, seed=2, only="mlp")  # mlp deltas: rank 5, attention: rank 1
    report = extract(str(base), str(tuned), tmp_path / "adapter", ExtractConfig(energy=0.999999), progress=False)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {layer.rank for layer in report.layers} == {1, 5}
    assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]
    assert tuned_vs(base, tuned, peft_model(base, tmp_path / "adapter")) < 1e-4


def test_budget_spends_on_the_largest_singular_values_per_parameter():
    costs = {"big": LayerCost.from_spectrum((4, 4), torch.tensor([100.0, 1.0])),  # σ² of each delta
             "small": LayerCost.from_spectrum((4, 4), torch.tensor([9.0, 4.0]))}
    assert allocate(costs, 0.5, adapters=True) == {"big": 1, "small": 1}  # 16 of 32 parameters
    assert allocate(costs, 0.25, adapters=True) == {"big": 1, "small": 0}  # extract's budget: compress's allocator


def test_budget_keeps_adapter_within_the_budget(tiny_models, tmp_path):
    base = tiny_models["llama"]
    tuned = make_tuned(base, tmp_path / "tuned", rank=8)
    report = extract(str(base), str(tuned), tmp_path / "adapter", ExtractConfig(budget=0.2), progress=False)
    assert 0.15 * report.dense_params < report.params <= 0.2 * report.dense_params
    assert tuned_vs(base, tuned, peft_model(base, tmp_path / "adapter")) == pytest.approx(
        report.output_error["svd"]["logits_rel_error"], rel=0.5, abs=1e-4)


def test_changed_norms_are_saved_whole_through_modules_to_save(tiny_models, tmp_path):
    base = tiny_models["llama"]
    tuned = make_tuned(base, tmp_path / "tuned", norms=True)
    report = extract(str(base), str(tuned), tmp_path / "adapter", ExtractConfig(rank=3), progress=False)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "model.norm" in config["modules_to_save"] and report.saved_whole == config["modules_to_save"]
    assert tuned_vs(base, tuned, peft_model(base, tmp_path / "adapter")) < 1e-4


def test_unchanged_layers_get_no_adapter(tiny_models, tmp_path):
    base = tiny_models["llama"]
    tuned = make_tuned(base, tmp_path / "tuned", only="self_attn.v_proj")
    report = extract(str(base), str(tuned), tmp_path / "adapter", ExtractConfig(rank=3), progress=False)
    assert [layer.name for layer in report.layers] == ["model.layers.0.self_attn.v_proj",
                                                       "model.layers.1.self_attn.v_proj"]
    assert len(report.unchanged) == 12


def test_calibration_reports_both_variants_and_keeps_the_better(tiny_models, tmp_path, text_file):
    base = tiny_models["llama"]
    tuned = make_tuned(base, tmp_path / "tuned", rank=6, scale=0.01)
    config = ExtractConfig(rank=2, calib_samples=8, calib_len=16)
    report = extract(str(base), str(tuned), tmp_path / "adapter", config, calib=text_file, progress=False)
    errors = {v: report.output_error[v]["logits_rel_error"] for v in ("svd", "whiten")}
    assert report.method == min(errors, key=errors.get)
    assert "held-out tokens" in report.check_inputs
    tokenizer = AutoTokenizer.from_pretrained(base)
    text = {"input_ids": tokenizer(text_file.read_text()[-600:], return_tensors="pt")["input_ids"]}
    want = outputs(dense(tuned), text)
    assert rel_error(outputs(peft_model(base, tmp_path / "adapter"), text), want) < rel_error(outputs(dense(base), text), want)


@pytest.mark.parametrize("change, message", [
    ("same", "identical"), ("other_arch", "base is a LlamaForCausalLM but tuned is a GPT2LMHeadModel"),
    ("vocab", "vocabulary differs")])
def test_bad_pairs_raise_one_line_errors(tiny_models, tmp_path, change, message):
    base = tiny_models["llama"]
    tuned = {"same": lambda: base, "other_arch": lambda: tiny_models["gpt2"],
             "vocab": lambda: make_tuned(base, tmp_path / "tuned", vocab=80)}[change]()
    with pytest.raises(LoraCompressError, match=message):
        extract(str(base), str(tuned), tmp_path / "adapter", ExtractConfig(rank=2), progress=False)
    assert not (tmp_path / "adapter").exists()


def test_existing_output_folder_raises(tiny_models, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "x").write_text("keep")
    with pytest.raises(LoraCompressError, match="already exists"):
        extract(str(tiny_models["llama"]), str(tiny_models["llama"]), tmp_path / "adapter", ExtractConfig(rank=2))


@pytest.mark.parametrize("kwargs, message", [
    ({}, r"^give exactly one of (--)?rank, (--)?energy, (--)?budget \(got none\)"),
    ({"rank": 2, "energy": 0.9}, r"^give exactly one of .*\(got (--)?rank, (--)?energy\)"),
    ({"rank": 0}, r"^(--)?rank 0 must be a positive integer"),
    ({"budget": 1.5}, r"^(--)?budget 1\.5 is outside \(0, 1\]"),
])
def test_bad_rank_options_raise(kwargs, message):
    with pytest.raises(LoraCompressError, match=message):
        ExtractConfig(**kwargs)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dense_export_of_a_compressed_folder_loads_with_transformers_alone(tiny_models, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    compress(str(tiny_models[arch]), tmp_path / "small", CompressConfig(ratio=0.5), progress=False)
    export_dense(tmp_path / "small", tmp_path / "plain")
    assert not (tmp_path / "plain" / "lora_compress.json").exists()
    assert (tmp_path / "plain" / "tokenizer.json").is_file() and (tmp_path / "plain" / "README.md").is_file()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    compressed = load(tmp_path / "small")
    inputs = inputs_for(plain)
    assert type(plain).__name__ == type(dense(tiny_models[arch])).__name__
    assert rel_error(outputs(plain, inputs), outputs(compressed, inputs)) < 1e-5


def test_dense_export_of_an_adapter_matches_peft_merge(tiny_models, tmp_path):
    base = tiny_models["gpt2"]
    tuned = make_tuned(base, tmp_path / "tuned", rank=4, norms=True, biases=True)
    extract(str(base), str(tuned), tmp_path / "adapter", ExtractConfig(rank=2), progress=False)
    export_dense(tmp_path / "adapter", tmp_path / "plain")
    merged = peft_model(base, tmp_path / "adapter").merge_and_unload()
    inputs = inputs_for(merged)
    assert rel_error(outputs(dense(tmp_path / "plain"), inputs), outputs(merged, inputs)) < 1e-5


def test_dense_export_of_an_adapter_naming_missing_modules_raises(tiny_models, tmp_path):
    base = tiny_models["llama"]
    extract(str(base), str(make_tuned(base, tmp_path / "tuned")), tmp_path / "adapter", ExtractConfig(rank=2),
            progress=False)
    path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "target_modules": ["transformer.h.0.attn.c_attn"]}))
    with pytest.raises(LoraCompressError, match="not in the base model"):
        export_dense(tmp_path / "adapter", tmp_path / "plain")
    with pytest.raises(LoraCompressError, match="not in the base model"):  # the right config, the wrong base
        path.write_text(json.dumps(config))
        export_dense(tmp_path / "adapter", tmp_path / "plain", base=str(tiny_models["gpt2"]))
    assert not (tmp_path / "plain").exists()


def test_export_of_a_plain_folder_raises(tiny_models, tmp_path):
    with pytest.raises(LoraCompressError, match="neither"):
        export_dense(tiny_models["llama"], tmp_path / "plain")


def test_every_output_folder_gets_a_model_card(tiny_models, tmp_path):
    base = tiny_models["llama"]
    compress(str(base), tmp_path / "small", CompressConfig(ratio=0.5), progress=False, command="lora-compress compress X")
    extract(str(base), str(make_tuned(base, tmp_path / "tuned")), tmp_path / "adapter", ExtractConfig(rank=2),
            progress=False, command="lora-compress extract Y")
    export_dense(tmp_path / "small", tmp_path / "plain", command="lora-compress export Z")
    for folder, command, loader in (("small", "compress X", "lc.load"), ("adapter", "extract Y", "PeftModel"),
                                    ("plain", "export Z", "from_pretrained")):
        card = (tmp_path / folder / "README.md").read_text()
        assert f"lora-compress {command}" in card and loader in card and f"`{base}`" in card
    assert "logits_rel_error vs tuned" in (tmp_path / "adapter" / "README.md").read_text()


def test_cli_extract_and_export(tiny_models, tmp_path):
    base = tiny_models["llama"]
    tuned = make_tuned(base, tmp_path / "tuned")
    result = run("extract", "--base", base, "--tuned", tuned, "--out", tmp_path / "adapter", "--rank", "99", "--quiet")
    assert result.exit_code == 0, result.output
    assert "capped at the smaller dimension" in result.output and "base + adapter (svd)" in result.output
    result = run("export", tmp_path / "adapter", "--dense", "--out", tmp_path / "plain")
    assert result.exit_code == 0, result.output
    assert tuned_vs(base, tuned, dense(tmp_path / "plain")) < 1e-4


def test_cli_extract_of_identical_models_exits_2_with_one_line(tiny_models, tmp_path):
    base = str(tiny_models["bert"])
    result = run("extract", "--base", base, "--tuned", base, "--out", str(tmp_path / "a"),
                 "--rank", "2")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "nothing to extract" in result.output


@pytest.mark.real
def test_real_finetune_extracts_at_full_rank_exactly(tmp_path):
    from make_finetune import FINETUNE, SMOLLM2

    if not FINETUNE.exists():
        pytest.skip(f"{FINETUNE} missing: run python scripts/make_finetune.py")
    report = extract(str(SMOLLM2), str(FINETUNE), tmp_path / "adapter", ExtractConfig(rank=4096), progress=False)
    assert report.output_error["svd"]["logits_rel_error"] < 1e-4
    assert tuned_vs(SMOLLM2, FINETUNE, peft_model(SMOLLM2, tmp_path / "adapter")) < 1e-4
