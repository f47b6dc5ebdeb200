"""Streaming (a tensor, or with calibration a block, at a time) and torchrun against the in-memory path."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import dense, inputs_for, outputs, rel_error, run, saved_tensors
from lora_compress import CompressConfig, LoraCompressError, load
from lora_compress.methods.config import RunConfig, resolve
from lora_compress.jobs.compress import compress
from lora_compress.storage import shards, tensorfile
from lora_compress.storage.checkpoint import (COMPRESSED_INDEX, COMPRESSED_WEIGHTS, INDEX, WEIGHTS, load_dense,
                                             resolve_source)
from lora_compress.storage.compressed import ADAPTERS, MANIFEST
from lora_compress.stream.block_loader import BlockLoader
from lora_compress.pipelines.calibrated import compress_calibrated
from lora_compress.stream.lazy import open_lazily
from lora_compress.pipelines.tensorwise import compress_tensorwise


def _manifest(folder):
    """The manifest but for what differs by design between an in-memory and a streamed run."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest.pop("command")
    manifest["run"].pop("stream")
    return manifest


def _sharded_copy(source, folder):
    """The same checkpoint saved as several shards with an index."""
    load_dense(resolve_source(str(source))).save_pretrained(folder, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    return folder


def test_streaming_writes_the_same_tensors_and_manifest_as_in_memory(tiny_model, tmp_path):
    config = CompressConfig(ratio=0.5)
    compress(str(tiny_model), tmp_path / "memory", config, progress=False, adapters=True)
    compress(str(tiny_model), tmp_path / "stream", config, RunConfig(stream=True), progress=False, adapters=True)
    memory, streamed = saved_tensors(tmp_path / "memory"), saved_tensors(tmp_path / "stream")
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
    monkeypatch.setattr(shards, "MAX_SHARD_BYTES", 10_000)
    compress(str(source), tmp_path / "stream", CompressConfig(rank=4), RunConfig(stream=True), progress=False)
    compress(str(tiny_models["llama"]), tmp_path / "memory", CompressConfig(rank=4), progress=False)
    stream = tmp_path / "stream"
    assert (stream / COMPRESSED_INDEX).exists() and not (stream / COMPRESSED_WEIGHTS).exists()
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        streamed, memory = load(tmp_path / "stream")(ids).logits, load(tmp_path / "memory")(ids).logits
    assert torch.equal(streamed, memory)  # tied lm_head restored from the embedding alike


def test_shard_changed_while_reading_is_detected(tiny_models, tmp_path):
    source = shutil.copytree(tiny_models["llama"], tmp_path / "src")
    config = CompressConfig(ratio=0.5)
    plan = open_lazily(resolve_source(str(source)), config)
    with open(source / WEIGHTS, "ab") as handle:
        handle.write(b"\0" * 8)
    with pytest.raises(LoraCompressError, match="changed on disk while compressing"):
        compress_tensorwise(plan, resolve(config, RunConfig()), RunConfig(), tmp_path / "out", progress=False)


def test_disk_full_leaves_no_output_folder(tiny_models, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensorfile.TensorFileWriter, "add", full)
    with pytest.raises(LoraCompressError, match="free space or choose another --out"):
        compress(str(tiny_models["llama"]), tmp_path / "out", CompressConfig(ratio=0.5), RunConfig(stream=True), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_one_clear_error(tiny_models, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LoraCompressError, match="choose a writable --out"):
        compress(str(tiny_models["llama"]), blocker / "out", CompressConfig(ratio=0.5), RunConfig(stream=True), progress=False)


CALIBRATED = {"sequential-budget": {"method": "sequential", "budget": 0.7},
              "whiten-ratio": {"method": "whiten", "ratio": 0.5}}


def _calibrated(text_file, option: str, **run) -> tuple[CompressConfig, RunConfig]:
    """6 samples: two calibration batches (4 + 2), so the sums over batches are exercised."""
    return CompressConfig(**CALIBRATED[option]), RunConfig(calib=str(text_file), calib_samples=6, calib_len=16, **run)


@pytest.fixture(scope="module", params=[(m, o) for m in ("llama", "bert") for o in CALIBRATED],
                ids=lambda param: "-".join(param))
def calibrated_pair(request, tiny_models, text_file, tmp_path_factory):
    """(folder with memory/ and stream/, sharded source): one calibrated compression done both ways."""
    model, option = request.param
    root = tmp_path_factory.mktemp(f"{model}-{option}")
    source = _sharded_copy(tiny_models[model], root / "sharded")
    compress(str(source), root / "memory", *_calibrated(text_file, option), progress=False)
    compress(str(source), root / "stream", *_calibrated(text_file, option, stream=True), progress=False)
    return root, source


# Both paths run the same float ops on the same batches in the same order (Grams and Fisher sums in
# float64, the block recomputed as the in-memory forward ran it), so on one machine they agree bit
# for bit (measured: max difference 0 on CPU, float32 and bfloat16). The band allows float32
# rounding only (~1e-6 relative), as a different BLAS thread split or attention kernel could give.
FACTOR_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.slow
def test_streamed_calibration_gives_the_in_memory_factors_ranks_and_manifest(calibrated_pair):
    root, source = calibrated_pair
    assert (source / INDEX).exists()
    memory, streamed = saved_tensors(root / "memory"), saved_tensors(root / "stream")
    assert memory.keys() == streamed.keys()
    assert any(key.endswith("lora_A") for key in memory)
    for key in memory:
        torch.testing.assert_close(streamed[key], memory[key], **FACTOR_TOLERANCE)
    manifests = [_manifest(root / name) for name in ("memory", "stream")]
    for manifest in manifests:
        del manifest["calibration"]["seconds"], manifest["calibration"]["peak_memory_mb"]
        del manifest["calibration"]["seconds_by_stage"]
    assert manifests[0] == manifests[1]
    assert sorted(os.listdir(root / "memory")) == sorted(os.listdir(root / "stream"))


@pytest.mark.slow
def test_streamed_calibrated_output_loads_with_the_in_memory_outputs(calibrated_pair):
    root, source = calibrated_pair
    original = dense(source)
    batch = inputs_for(original)
    reference, memory, streamed = (outputs(model, batch) for model in
                                   (original, load(root / "memory"), load(root / "stream")))
    assert rel_error(memory, reference) > 1e-3  # compression really changed the model
    assert rel_error(streamed, memory) < 1e-5


def test_streamed_calibration_writes_shards_that_load(tiny_models, text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "MAX_SHARD_BYTES", 10_000)
    compress(str(tiny_models["llama"]), tmp_path / "stream", *_calibrated(text_file, "whiten-ratio", stream=True), progress=False)
    compress(str(tiny_models["llama"]), tmp_path / "memory", *_calibrated(text_file, "whiten-ratio"), progress=False)
    stream = tmp_path / "stream"
    assert (stream / COMPRESSED_INDEX).exists() and not (stream / COMPRESSED_WEIGHTS).exists()
    batch = inputs_for(dense(tiny_models["llama"]))
    assert rel_error(outputs(load(tmp_path / "stream"), batch), outputs(load(tmp_path / "memory"), batch)) < 1e-5


def test_streamed_calibration_leaves_every_block_on_the_meta_device(tiny_models, text_file, tmp_path):
    config, run = _calibrated(text_file, "sequential-budget")
    plan = open_lazily(resolve_source(str(tiny_models["llama"])), config)
    tokens = torch.randint(2, 40, (6, 16), generator=torch.Generator().manual_seed(0))
    report = compress_calibrated(BlockLoader(plan), resolve(config, run), tokens, plan.targets, progress=False)
    assert any(layer.rank for layer in report.layers)
    in_memory = [name for name, param in plan.model.named_parameters() if not param.is_meta]
    assert in_memory and not any(name.startswith("model.layers.") for name in in_memory)
    assert all(module.weight.is_meta for module in plan.targets.values())  # swapped-out dense layers too


def _cli_compress(model, out, text_file, *extra):
    return run("compress", str(model), "--out", str(out), "--method", "whiten", "--ratio", "0.5",
               "--calib", str(text_file), "--stream", "--quiet", *extra)


def test_streamed_calibration_of_a_gguf_source_is_one_clear_line(tiny_models, text_file, tmp_path):
    result = _cli_compress(tiny_models["llama"], tmp_path / "out", text_file, "--gguf-file", "model.gguf")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: streaming reads safetensors checkpoints only; drop --stream for a GGUF file"]
    assert not (tmp_path / "out").exists()


@pytest.fixture
def tiny_resnet(tmp_path):
    """An image classifier whose only linear layer is its head (``classifier.1``, a task head): no ModuleList
    holds a linear layer."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_labels=2)
    ResNetForImageClassification(config).save_pretrained(tmp_path / "resnet")
    return tmp_path / "resnet"


def test_streamed_calibration_of_a_model_without_repeated_blocks_is_one_clear_line(tiny_resnet, text_file, tmp_path):
    result = _cli_compress(tiny_resnet, tmp_path / "out", text_file, "--include", r"classifier\.1")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: ResNetForImageClassification has no repeated blocks of linear layers (a ModuleList); calibrated "
        "methods work block by block: use the data-free --method svd"]
    assert not (tmp_path / "out").exists()


def test_calibrated_compression_under_torchrun_asks_for_one_process(tiny_models, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; the check comes before joining a group
    with pytest.raises(LoraCompressError, match="in one process; drop torchrun"):
        compress(str(tiny_models["llama"]), tmp_path / "out", *_calibrated(text_file, "whiten-ratio"), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_cuda_is_one_clear_error():
    with pytest.raises(LoraCompressError, match="^device cuda was asked but CUDA is not available here.*pass cpu"):
        RunConfig(device="cuda")


def _torchrun(processes, model, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--no-python",
               str(Path(sys.executable).with_name("lora-compress")), "compress", str(model), "--out", str(out),
               "--ratio", "0.5", "--quiet", *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)


@pytest.mark.slow
def test_two_torchrun_processes_write_what_one_process_writes(tiny_models, tmp_path):
    run = _torchrun(2, tiny_models["gpt2"], tmp_path / "two")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("wrote") == 1  # only rank 0 prints
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun runs each process on one thread; same BLAS path = same bits
    try:
        compress(str(tiny_models["gpt2"]), tmp_path / "one", CompressConfig(ratio=0.5), RunConfig(stream=True), progress=False)
    finally:
        torch.set_num_threads(threads)
    one, two = saved_tensors(tmp_path / "one"), saved_tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    assert all(torch.equal(one[key], two[key]) for key in one)
    assert _manifest(tmp_path / "one")["layers"] == _manifest(tmp_path / "two")["layers"]


@pytest.mark.slow
def test_more_processes_than_layers_is_refused(tiny_models, tmp_path):
    run = _torchrun(2, tiny_models["llama"], tmp_path / "out", "--include", r"layers\.0\.mlp\.up_proj")
    assert run.returncode != 0
    assert "2 processes but only 1 layers to factor" in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.real
def test_smollm2_streams_to_the_same_tensors_as_in_memory(smollm2_dir, tmp_path):
    config = CompressConfig(ratio=0.5, include=(r"layers\.(0|29)\.",))
    compress(str(smollm2_dir), tmp_path / "memory", config, progress=False)
    compress(str(smollm2_dir), tmp_path / "stream", config, RunConfig(stream=True), progress=False)
    memory, streamed = saved_tensors(tmp_path / "memory"), saved_tensors(tmp_path / "stream")
    assert memory.keys() == streamed.keys()
    assert all(torch.equal(memory[key], streamed[key]) for key in memory)


def test_tensor_file_writer_round_trips_and_reports_a_full_header(tmp_path):
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "empty": torch.zeros(0, 2)}
    writer = tensorfile.TensorFileWriter(tmp_path / "x.safetensors", {"format": "pt"}, header_bytes=512)
    for key, tensor in tensors.items():
        writer.add(key, tensor)
    count = 0
    while writer.fits(f"extra.{count}", torch.ones(1)):
        writer.add(f"extra.{count}", torch.ones(1))
        count += 1
    with pytest.raises(ValueError, match="header region is full"):
        writer.add("one.too.many", torch.ones(1))
    writer.close()
    loaded = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert len(loaded) == len(tensors) + count and count > 0
