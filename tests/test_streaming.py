"""Streaming (one tensor at a time) and torchrun compression against the in-memory path."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lora_compress import CompressConfig, LoraCompressError, load
from lora_compress import streaming
from lora_compress.checkpoint import ADAPTERS, INDEX, MANIFEST, WEIGHTS, load_dense, resolve_source
from lora_compress.pipeline import compress


def _tensors(folder):
    files = streaming.output_files(folder)
    return {key: load_file(path)[key] for key, path in files.items()}


def _manifest(folder):
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest.pop("command")
    return manifest


def _sharded_copy(source, folder):
    """The same checkpoint saved as several shards with an index."""
    load_dense(resolve_source(str(source))).save_pretrained(folder, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    return folder


def test_streaming_writes_the_same_tensors_and_manifest_as_in_memory(tiny_model, tmp_path):
    config = CompressConfig(ratio=0.5)
    compress(str(tiny_model), tmp_path / "memory", config, progress=False)
    compress(str(tiny_model), tmp_path / "stream", config, progress=False, stream=True)
    memory, streamed = _tensors(tmp_path / "memory"), _tensors(tmp_path / "stream")
    assert set(memory) == set(streamed)
    assert any(key.endswith("lora_A") for key in memory)
    assert all(torch.equal(memory[key], streamed[key]) for key in memory)  # bitwise
    assert _manifest(tmp_path / "memory") == _manifest(tmp_path / "stream")
    adapters = [load_file(tmp_path / name / ADAPTERS) for name in ("memory", "stream")]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_sharded_input_gives_sharded_output_that_loads_like_in_memory(tiny_models, tmp_path, monkeypatch):
    source = _sharded_copy(tiny_models["llama"], tmp_path / "sharded")
    assert (source / INDEX).exists()
    monkeypatch.setattr(streaming, "MAX_SHARD_BYTES", 10_000)
    compress(str(source), tmp_path / "stream", CompressConfig(rank=4), progress=False, stream=True)
    compress(str(tiny_models["llama"]), tmp_path / "memory", CompressConfig(rank=4), progress=False)
    assert (tmp_path / "stream" / INDEX).exists() and not (tmp_path / "stream" / WEIGHTS).exists()
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        streamed, memory = load(tmp_path / "stream")(ids).logits, load(tmp_path / "memory")(ids).logits
    assert torch.equal(streamed, memory)  # tied lm_head restored from the embedding alike


def test_shard_changed_while_reading_is_detected(tiny_models, tmp_path):
    source = shutil.copytree(tiny_models["llama"], tmp_path / "src")
    config = CompressConfig(ratio=0.5)
    plan = streaming.plan(resolve_source(str(source)), config)
    with open(source / WEIGHTS, "ab") as handle:
        handle.write(b"\0" * 8)
    with pytest.raises(LoraCompressError, match="changed on disk while compressing"):
        streaming.compress_streaming(plan, config, tmp_path / "out", progress=False)


def test_disk_full_leaves_no_output_folder(tiny_models, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(streaming, "save_file", full)
    with pytest.raises(LoraCompressError, match="free space or choose another --out"):
        compress(str(tiny_models["llama"]), tmp_path / "out", CompressConfig(ratio=0.5), progress=False, stream=True)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_one_clear_error(tiny_models, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LoraCompressError, match="choose a writable --out"):
        compress(str(tiny_models["llama"]), blocker / "out", CompressConfig(ratio=0.5), progress=False, stream=True)


def test_stream_refuses_calibrated_methods(tiny_models, tmp_path, text_file):
    config = CompressConfig(ratio=0.5, method="whiten", calib=str(text_file))
    with pytest.raises(LoraCompressError, match="plain SVD only"):
        compress(str(tiny_models["llama"]), tmp_path / "out", config, progress=False, stream=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_cuda_is_one_clear_error():
    with pytest.raises(LoraCompressError, match="CUDA is not available here.*--device cpu"):
        CompressConfig(ratio=0.5, device="cuda")


def _torchrun(processes, model, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--no-python",
               shutil.which("lora-compress") or "lora-compress", "compress", str(model), "--out", str(out),
               "--ratio", "0.5", "--quiet", *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)


def test_two_torchrun_processes_write_what_one_process_writes(tiny_models, tmp_path):
    run = _torchrun(2, tiny_models["gpt2"], tmp_path / "two")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("wrote") == 1  # only rank 0 prints
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun runs each process on one thread; same BLAS path = same bits
    try:
        compress(str(tiny_models["gpt2"]), tmp_path / "one", CompressConfig(ratio=0.5), progress=False, stream=True)
    finally:
        torch.set_num_threads(threads)
    one, two = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    assert all(torch.equal(one[key], two[key]) for key in one)
    assert _manifest(tmp_path / "one")["layers"] == _manifest(tmp_path / "two")["layers"]


def test_more_processes_than_layers_is_refused(tiny_models, tmp_path):
    run = _torchrun(2, tiny_models["llama"], tmp_path / "out", "--include", r"layers\.0\.mlp\.up_proj")
    assert run.returncode != 0
    assert "2 processes but only 1 layers to factor" in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.real
def test_smollm2_streams_to_the_same_tensors_as_in_memory(smollm2_dir, tmp_path):
    config = CompressConfig(ratio=0.5, include=(r"layers\.(0|29)\.",))
    compress(str(smollm2_dir), tmp_path / "memory", config, progress=False)
    compress(str(smollm2_dir), tmp_path / "stream", config, progress=False, stream=True)
    memory, streamed = _tensors(tmp_path / "memory"), _tensors(tmp_path / "stream")
    assert memory.keys() == streamed.keys()
    assert all(torch.equal(memory[key], streamed[key]) for key in memory)
