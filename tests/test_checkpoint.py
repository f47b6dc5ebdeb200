"""Saving, reloading and applying adapters; bad checkpoints get one-line errors and no output."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_compress as lc
from lora_compress.storage.checkpoint import COMPRESSED_WEIGHTS, INDEX, WEIGHTS
from lora_compress.storage.compressed import ADAPTERS, MANIFEST
from lora_compress.storage.remote_code import MODELING

from helpers import dense, inputs_for, outputs, rel_error


@pytest.fixture
def round_trip(tiny_model, tmp_path):
    """(dense folder, compressed folder, the in-memory compressed model's outputs, inputs), made per
    test; apart from the session's ``compressed`` (ratio 0.3): this one is compared with the in-memory model."""
    out = tmp_path / "out"
    model = dense(tiny_model)
    inputs = inputs_for(model)
    lc.compress_(model, lc.CompressConfig(ratio=0.5), progress=False)
    lc.compress(str(tiny_model), out, lc.CompressConfig(ratio=0.5), progress=False)
    return tiny_model, out, outputs(model, inputs), inputs


def test_reload_is_bit_identical_to_the_model_right_after_compression(round_trip):
    _, out, expected, inputs = round_trip
    assert torch.equal(outputs(lc.load(out), inputs), expected)


def test_output_folder_is_self_contained_and_stores_the_factors_once(round_trip):
    _, out, _, _ = round_trip
    names = {p.name for p in out.iterdir()}
    assert {"config.json", MODELING, COMPRESSED_WEIGHTS, MANIFEST, "tokenizer.json"} <= names
    assert WEIGHTS not in names, "a dense class must find no model.safetensors in a compressed folder"
    assert ADAPTERS not in names, "the factors are in the weights file; adapters.safetensors only with --adapters"
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format_version"] == 3 and manifest["settings"]["ratio"] == 0.5
    assert {"torch", "transformers", "safetensors", "lora_compress"} <= set(manifest["versions"])
    layer = next(iter(manifest["layers"].values()))
    assert layer["rank"] >= 1 and len(layer["shape"]) == 2
    keys = load_file(out / COMPRESSED_WEIGHTS).keys()
    assert any(k.endswith(".lora_A") for k in keys) and any(k.endswith(".lora_B") for k in keys)


def test_the_folders_factors_applied_onto_the_base_give_the_same_outputs(round_trip):
    base, out, expected, inputs = round_trip
    model = lc.apply_adapters(dense(base), out)
    assert rel_error(outputs(model, inputs), expected) < 1e-6


def test_adapters_file_on_request_holds_the_same_factors(tiny_models, tmp_path):
    out = tmp_path / "out"
    lc.compress(str(tiny_models["llama"]), out, lc.CompressConfig(ratio=0.5), progress=False, adapters=True)
    adapters, weights = load_file(out / ADAPTERS), load_file(out / COMPRESSED_WEIGHTS)
    assert adapters and all(key.endswith((".lora_A", ".lora_B")) for key in adapters)
    assert all(torch.equal(adapters[key], weights[key]) for key in adapters)
    reference = lc.apply_adapters(dense(tiny_models["llama"]), out)
    model = lc.apply_adapters(dense(tiny_models["llama"]), out / ADAPTERS)
    inputs = inputs_for(model)
    assert torch.equal(outputs(model, inputs), outputs(reference, inputs))


def test_adapters_onto_another_architecture_raise(tiny_models, tmp_path):
    out = tmp_path / "out"
    lc.compress(str(tiny_models["bert"]), out, lc.CompressConfig(rank=2), progress=False)
    with pytest.raises(lc.LoraCompressError, match="is not in this model"):
        lc.apply_adapters(dense(tiny_models["llama"]), out)


def _bad(tiny_models, tmp_path, damage):
    """A copy of the tiny Llama damaged by ``damage(folder)``."""
    folder = tmp_path / "bad"
    shutil.copytree(tiny_models["llama"], folder)
    damage(folder)
    return folder


def _truncate(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def _shard_missing(folder):
    tensors = load_file(folder / WEIGHTS)
    (folder / WEIGHTS).unlink()
    save_file(tensors, folder / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(tensors)}
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _integer_weights(folder):
    tensors = load_file(folder / WEIGHTS)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 32, dtype=torch.int8)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def _nan_weights(folder):
    tensors = load_file(folder / WEIGHTS)
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "config.json").unlink(), "has no config.json"),
    (lambda f: (f / WEIGHTS).unlink(), "has no model.safetensors"),
    (_truncate, "is not a readable safetensors file"),
    (lambda f: (f / WEIGHTS).write_bytes(b"not a safetensors file at all"), "is not a readable safetensors file"),
    (_shard_missing, "names shard model-00002-of-00002.safetensors, which is missing"),
    (_integer_weights, "is stored as I8"),
    (_nan_weights, "contains NaN or inf"),
])
def test_bad_checkpoints_raise_one_line_and_write_nothing(tiny_models, tmp_path, damage, message):
    folder = _bad(tiny_models, tmp_path, damage)
    with pytest.raises(lc.LoraCompressError, match=message) as error:
        lc.compress(str(folder), tmp_path / "out", lc.CompressConfig(rank=2), progress=False)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad"], "no temporary folder may be left behind"


def test_missing_model_folder_raises(tmp_path):
    with pytest.raises(lc.LoraCompressError, match="does not exist"):
        lc.compress(str(tmp_path / "nowhere"), tmp_path / "out", lc.CompressConfig(rank=2))


def test_existing_output_folder_is_refused_unless_forced(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(lc.LoraCompressError, match="already exists; choose another --out or pass --force"):
        lc.compress(str(tiny_models["bert"]), out, lc.CompressConfig(rank=2), progress=False)
    assert (out / "keep.txt").exists()
    lc.compress(str(tiny_models["bert"]), out, lc.CompressConfig(rank=2), force=True, progress=False)
    assert (out / MANIFEST).exists() and not (out / "keep.txt").exists()


def test_sharded_checkpoint_loads_like_the_single_file(tiny_models, tmp_path):
    folder = tmp_path / "sharded"
    model = dense(tiny_models["llama"])
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    shutil.copy(tiny_models["llama"] / "tokenizer.json", folder)
    assert (folder / INDEX).exists()
    inputs = inputs_for(model)
    assert torch.equal(outputs(dense(folder), inputs), outputs(model, inputs))


def test_load_refuses_a_folder_that_is_not_compressed(tiny_models):
    with pytest.raises(lc.LoraCompressError, match="has no lora_compress.json"):
        lc.load(tiny_models["llama"])
