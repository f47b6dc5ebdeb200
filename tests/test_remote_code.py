"""transformers alone loads a compressed folder as what it is (trust_remote_code), and refuses it without."""
import json
import os
import subprocess
import sys
import warnings

import pytest
from lora_compress.cli import main
from click.testing import CliRunner
import torch

import lora_compress as lc
from lora_compress.core.counting import total_params
from lora_compress.storage.compressed import MANIFEST
from lora_compress.storage.checkpoint import COMPRESSED_WEIGHTS, WEIGHTS
from lora_compress.storage.remote_code import MODEL_TYPE, MODELING, auto_class

from helpers import dense, inputs_for, load_with_plain_transformers, outputs, rel_error, run

AUTO = {"llama": "AutoModelForCausalLM", "gpt2": "AutoModelForCausalLM", "bert": "AutoModel"}

@pytest.mark.slow
def test_transformers_alone_loads_the_folder_as_lc_load_does(tiny_model, tmp_path):
    out, name = tmp_path / "out", tiny_model.name
    lc.compress(str(tiny_model), out, lc.CompressConfig(ratio=0.5), progress=False)
    model = lc.load(out)
    inputs = inputs_for(model)
    expected = outputs(model, inputs)
    assert rel_error(expected, outputs(dense(tiny_model), inputs)) > 1e-3, "the compressed model must differ"
    facts, seen = load_with_plain_transformers(out, AUTO[name], inputs, tmp_path)
    assert "no file named model.safetensors" in facts["refusal"], "without trust_remote_code transformers must refuse"
    assert rel_error(seen, expected) <= 1e-6
    assert facts["params"] == total_params(model) < total_params(dense(tiny_model)), "the savings stay"
    assert facts["class"].startswith("LoraCompressed")
    assert not any(module.startswith("lora_compress") for module in facts["modules"])
    assert any(module.endswith(".modeling_lora_compressed") for module in facts["modules"])
    if AUTO[name] == "AutoModelForCausalLM":
        assert facts["generated"] == inputs["input_ids"].shape[1] + 4


def test_config_names_its_own_model_type_and_the_modeling_file(tiny_models, tmp_path):
    out = tmp_path / "out"
    lc.compress(str(tiny_models["gpt2"]), out, lc.CompressConfig(rank=4), progress=False)
    config = json.loads((out / "config.json").read_text())
    manifest = json.loads((out / MANIFEST).read_text())
    assert config["model_type"] == config["base_model_type"] == "gpt2", "AutoTokenizer reads it with no flag"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lora_compressed.LoraCompressedGPT2LMHeadModel"
    factored = {name: layer for name, layer in manifest["layers"].items() if layer["rank"] is not None}
    assert config["lora_layers"] == {name: [*layer["shape"], layer["rank"], layer["bias"]]
                                     for name, layer in factored.items()}
    modeling = (out / MODELING).read_text()
    imports = [line for line in modeling.splitlines() if line.startswith(("import ", "from "))]
    assert all(line.split()[1].split(".")[0] in ("torch", "transformers") for line in imports), imports
    assert "from transformers import GPT2Config, GPT2LMHeadModel" in modeling


def test_the_auto_class_follows_the_models_task():
    assert auto_class("LlamaForCausalLM") == "AutoModelForCausalLM"
    assert auto_class("BertModel") == "AutoModel"
    assert auto_class("BertForMaskedLM") == "AutoModelForMaskedLM"
    assert auto_class("BertForSequenceClassification") == "AutoModelForSequenceClassification"


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_card_snippets_use_the_auto_class_of_the_task(tiny_models, tmp_path, name):
    out = tmp_path / "out"
    lc.compress(str(tiny_models[name]), out, lc.CompressConfig(rank=4), progress=False)
    card = (out / "README.md").read_text()
    assert f'{AUTO[name]}.from_pretrained("{out}", trust_remote_code=True)' in card
    assert (name == "llama") == ("AutoModelForCausalLM" in card)
    assert ("lm_eval --model hf" in card) == (name == "llama")
    assert "![rank and parameters kept per layer](report/ranks.png)" in card, "plots by default, in the card too"
    plain = tmp_path / "plain"
    lc.export_dense(out, plain)
    assert f'{AUTO[name]}.from_pretrained("{plain}")' in (plain / "README.md").read_text()


def _as_format_1(folder, base):
    """What lora-compress wrote before format 2: the base's own config.json, no modeling file."""
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "format_version": 1}))
    (folder / "config.json").write_text((base / "config.json").read_text())
    (folder / MODELING).unlink()
    (folder / COMPRESSED_WEIGHTS).rename(folder / WEIGHTS)


def _as_format_2(folder):
    """What lora-compress wrote in format 2: model_type "lora_compressed", the weights as model.safetensors."""
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "format_version": 2}))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": MODEL_TYPE}))
    (folder / COMPRESSED_WEIGHTS).rename(folder / WEIGHTS)


PLAIN_TOKENIZER = """
import sys
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
open(sys.argv[2], "w").write(" ".join(map(str, tokenizer("Alice was beginning to get very tired")["input_ids"])))
"""


def _plain_tokenizer(folder, tmp_path) -> tuple[subprocess.CompletedProcess, str | None]:
    """``AutoTokenizer.from_pretrained(folder)``, no flag, in a clean process with stdin closed: (result, ids)."""
    ids = tmp_path / f"ids-{folder.name}.txt"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", PLAIN_TOKENIZER, str(folder), str(ids)], cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    return result, ids.read_text() if ids.is_file() else None


def test_transformers_loads_the_folders_tokenizer_with_no_flag_and_no_prompt(tiny_models, tmp_path):
    out = tmp_path / "out"
    lc.compress(str(tiny_models["llama"]), out, lc.CompressConfig(ratio=0.5), progress=False)
    result, ids = _plain_tokenizer(out, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "", f"nothing on stdout, no question asked: {result.stdout[:500]!r}"
    assert result.stderr == "", f"no warning: {result.stderr[:500]!r}"
    assert ids == _plain_tokenizer(tiny_models["llama"], tmp_path)[1], "the base's tokenizer, as it is"


def test_format_2_folders_load_warn_and_upgrade_to_a_silent_tokenizer(tiny_models, tmp_path):
    out, new = tmp_path / "old", tmp_path / "new"
    lc.compress(str(tiny_models["llama"]), out, lc.CompressConfig(ratio=0.5), progress=False)
    expected = lc.load(out)
    _as_format_2(out)
    result, _ = _plain_tokenizer(out, tmp_path)
    assert "Do you wish to run the custom code?" in result.stdout, "format 2: the prompt this format fixes"
    inputs = inputs_for(expected)
    with pytest.warns(lc.LoraCompressWarning, match="format 2.*export .* --upgrade --out NEW"):
        assert torch.equal(outputs(lc.load(out), inputs), outputs(expected, inputs))
    result = CliRunner().invoke(main, ["export", str(out), "--upgrade", "--out", str(new)])
    assert result.exit_code == 0, result.output
    assert (new / COMPRESSED_WEIGHTS).is_file() and not (new / WEIGHTS).exists()
    assert json.loads((new / MANIFEST).read_text())["format_version"] == 3
    result, _ = _plain_tokenizer(new, tmp_path)
    assert result.returncode == 0 and result.stdout == result.stderr == "", result.stdout + result.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(outputs(lc.load(new), inputs), outputs(expected, inputs))


def test_folders_of_format_1_still_load_and_say_how_to_upgrade(tiny_models, tmp_path):
    out, new = tmp_path / "old", tmp_path / "new"
    lc.compress(str(tiny_models["llama"]), out, lc.CompressConfig(ratio=0.5), progress=False)
    expected = lc.load(out)
    _as_format_1(out, tiny_models["llama"])
    inputs = inputs_for(expected)
    with pytest.warns(lc.LoraCompressWarning, match="format 1.*export .* --upgrade --out NEW"):
        old = lc.load(out)
    assert torch.equal(outputs(old, inputs), outputs(expected, inputs))
    result = run("export", str(out), "--upgrade", "--out", str(new))
    assert result.exit_code == 0, result.output
    assert json.loads((new / "config.json").read_text())["model_type"] == "llama"
    assert json.loads((new / MANIFEST).read_text())["format_version"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(outputs(lc.load(new), inputs), outputs(expected, inputs))


def test_export_takes_exactly_one_format(tiny_models, tmp_path):
    out = tmp_path / "out"
    lc.compress(str(tiny_models["llama"]), out, lc.CompressConfig(rank=4), progress=False)
    result = run("export", str(out), "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "give exactly one of --dense or --upgrade" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("method", [lc.SvdConfig(), lc.SharedBasisConfig(side="input")], ids=["per-expert", "shared"])
def test_transformers_alone_loads_a_compressed_mixture_of_experts(tiny_models, tmp_path, method):
    out = tmp_path / "out"
    lc.compress(str(tiny_models["mixtral"]), out, lc.CompressConfig(ratio=0.5, method=method), progress=False)
    shared = json.loads((out / "config.json").read_text())["lora_shared"]
    assert bool(shared) == isinstance(method, lc.SharedBasisConfig)
    model = lc.load(out)
    inputs = inputs_for(model)
    expected = outputs(model, inputs)
    assert rel_error(expected, outputs(dense(tiny_models["mixtral"]), inputs)) > 1e-3, "the compressed model must differ"
    facts, seen = load_with_plain_transformers(out, "AutoModelForCausalLM", inputs, tmp_path)
    assert rel_error(seen, expected) <= 1e-6
    assert facts["params"] == total_params(model) < total_params(dense(tiny_models["mixtral"])), "the savings stay"
