"""Calibrated compression at scale: memory known before compute, half-precision checkpoints, the time split,
the head's loss a block at a time, the output-space whitening, and what pass 1 parks on disk."""
from __future__ import annotations

import json
import sys

import psutil
import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F

from helpers import dense, saved_tensors
from lora_compress import CompressConfig, LoraCompressError, LoraCompressWarning, compress
from lora_compress.methods.config import RunConfig
from lora_compress.calibrate import head_loss, spill
from lora_compress.calibrate.block_source import ResidentBlocks
from lora_compress.calibrate.spill import Spill
from lora_compress.cli import main
from lora_compress.core.whitening import Whitening
from lora_compress.jobs.memory import parse_size
from lora_compress.storage.compressed import MANIFEST

def _config() -> CompressConfig:
    return CompressConfig(budget=0.8)


def _run(text_file, **extra) -> RunConfig:
    return RunConfig(calib=str(text_file), calib_samples=6, calib_len=16, **extra)  # two calibration batches: 4 + 2


def test_too_little_memory_for_any_path_is_one_line_before_compute(tiny_models, text_file, tmp_path):
    result = CliRunner().invoke(main, ["compress", str(tiny_models["llama"]), "--budget", "0.8", "--calib",
                                       str(text_file), "--calib-samples", "6", "--calib-len", "16", "--memory-limit",
                                       "10M", "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: compressing needs about ")
    assert "--memory-limit 0.0 GiB" in lines[0] and "fewer --calib-samples" in lines[0]
    assert "--stream" not in lines[0], "streaming was tried: its estimate does not fit either"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_when_only_streaming_fits_it_streams_and_says_so(tiny_models, text_file, tmp_path, monkeypatch):
    from lora_compress.jobs import memory

    found = memory.MemoryEstimate(in_memory=10 << 30, streamed=1 << 30, parts={"checkpoint": 1})
    monkeypatch.setattr(memory, "estimate", lambda *args: found)
    with pytest.warns(LoraCompressWarning, match="streaming block by block instead"):
        compress(str(tiny_models["llama"]), tmp_path / "auto", _config(), _run(text_file, memory_limit="4G"), progress=False)
    compress(str(tiny_models["llama"]), tmp_path / "stream", _config(), _run(text_file, stream=True), progress=False)
    auto, streamed = saved_tensors(tmp_path / "auto"), saved_tensors(tmp_path / "stream")
    assert auto.keys() == streamed.keys() and all(torch.equal(auto[k], streamed[k]) for k in auto)


def test_memory_sizes_parse_and_a_bad_one_is_refused():
    assert parse_size("20G") == 20 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1.5g") == 3 << 29
    with pytest.raises(LoraCompressError, match="^memory_limit 'lots' is not a size; pass e.g. 20G"):
        parse_size("lots")


@pytest.fixture(scope="module")
def bf16_llama(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16") / "llama"
    dense(tiny_models["llama"]).to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_models["llama"] / name).read_bytes())
    return folder


def test_half_precision_is_computed_in_float32_where_it_has_no_fast_kernels(monkeypatch):
    from lora_compress.core import precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: False)
    assert precision.compute_dtype(torch.bfloat16, cpu) == torch.float32
    assert precision.compute_dtype(torch.float16, cpu) == torch.float32
    assert precision.compute_dtype(torch.float32, cpu) == torch.float32
    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: True)
    assert precision.compute_dtype(torch.bfloat16, cpu) == torch.bfloat16


@pytest.mark.parametrize("fast", [False, True], ids=["bf16-slow", "bf16-fast"])
def test_a_bf16_checkpoint_is_written_in_bf16_the_same_in_memory_and_streamed(bf16_llama, text_file, tmp_path,
                                                                               monkeypatch, fast):
    from lora_compress.calibrate import block_source

    compute = torch.bfloat16 if fast else torch.float32
    monkeypatch.setattr(block_source, "compute_dtype", lambda storage, device: compute)
    assert ResidentBlocks(dense(bf16_llama)).dtype == compute
    for stream in (False, True):
        compress(str(bf16_llama), tmp_path / str(stream), _config(), _run(text_file, stream=stream), progress=False)
    in_memory, streamed = saved_tensors(tmp_path / "False"), saved_tensors(tmp_path / "True")
    assert any(key.endswith("lora_A") for key in in_memory)
    assert {t.dtype for t in in_memory.values() if t.is_floating_point()} == {torch.bfloat16}
    assert in_memory.keys() == streamed.keys() and all(torch.equal(in_memory[k], streamed[k]) for k in in_memory)


def test_the_report_splits_the_time_by_stage(tiny_models, text_file, tmp_path):
    report = compress(str(tiny_models["llama"]), tmp_path / "out", _config(), _run(text_file), progress=False)
    stages = report.calibration["seconds_by_stage"]
    assert {"forward", "backward", "statistics", "costs", "factoring"} <= set(stages)
    assert all(seconds >= 0 for seconds in stages.values())
    assert sum(stages.values()) <= report.calibration["seconds"] + 0.5
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["calibration"]["seconds_by_stage"] == stages


def test_the_head_loss_a_block_of_the_vocabulary_at_a_time_is_cross_entropy(monkeypatch):
    monkeypatch.setattr(head_loss, "VOCAB_BLOCK", 7)  # 50 words in 8 blocks
    monkeypatch.setattr(head_loss, "BLOCK_ELEMENTS", 7 * 3)  # 3 rows at a time
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(12, 50)
    features = torch.randn(2, 9, 12, generator=g, requires_grad=True)  # (B, T, C)
    ids = torch.randint(0, 50, (2, 9), generator=g)
    loss = head_loss.next_token_loss(features, head, ids)
    loss.backward()
    got = features.grad.clone()
    features.grad = None
    expected = F.cross_entropy(head(features[:, :-1]).flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(got, features.grad, rtol=1e-4, atol=1e-6)


def test_output_space_whitening_needs_no_ridge_for_a_singular_gram():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(8, 24, generator=g, dtype=torch.float64)  # out ≤ in: the output route
    X = torch.randn(6, 24, generator=g, dtype=torch.float64)  # 6 tokens: XᵀX has rank 6
    factors = Whitening(W, X.T @ X).factors(4)
    error = torch.linalg.norm((W - factors.B @ factors.A) @ X.T)
    optimum = torch.linalg.svdvals(W @ X.T)[4:].pow(2).sum().sqrt()
    assert torch.isfinite(factors.A).all() and float(error) == pytest.approx(float(optimum), rel=1e-6)


def test_spill_round_trips_on_disk_and_in_memory(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    for to_disk in (False, True):
        store = Spill(to_disk, tmp_path)
        store.put("x", tensors)
        if to_disk:
            assert len(list(store.folder.iterdir())) == 1
        back = store.take("x")
        assert all(torch.equal(back[k], tensors[k]) for k in tensors)
        store.close()
    assert not list(tmp_path.iterdir())  # the folder goes with it


def test_spilling_to_disk_gives_the_factors_kept_in_memory(tiny_models, text_file, tmp_path, monkeypatch):
    compress(str(tiny_models["llama"]), tmp_path / "kept", _config(), _run(text_file), progress=False)
    monkeypatch.setattr("lora_compress.pipelines.calibrated.SPILL_BYTES", 0)
    compress(str(tiny_models["llama"]), tmp_path / "spilled", _config(), _run(text_file), progress=False)
    kept, spilled = saved_tensors(tmp_path / "kept"), saved_tensors(tmp_path / "spilled")
    assert kept.keys() == spilled.keys() and all(torch.equal(kept[k], spilled[k]) for k in kept)
    assert spill.SPILL_BYTES > 0


def test_interrupting_a_streamed_run_leaves_no_output(tiny_models, text_file, tmp_path, monkeypatch):
    from lora_compress.pipelines.fit_pass import FitPass

    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args)
        raise KeyboardInterrupt

    monkeypatch.setattr(FitPass, "_closed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compress(str(tiny_models["llama"]), tmp_path / "out", _config(), _run(text_file, stream=True), progress=False)
    assert len(calls) == 1, "the interruption reached the fit pass's first block"
    assert not list(tmp_path.iterdir())


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


def test_the_head_loss_draws_its_labels_from_the_model_a_block_at_a_time(monkeypatch):
    monkeypatch.setattr(head_loss, "VOCAB_BLOCK", 7)
    monkeypatch.setattr(head_loss, "BLOCK_ELEMENTS", 7 * 3)
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(12, 50, bias=False)
    features = torch.randn(2, 9, 12, generator=g, requires_grad=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 12, generator=g))  # seeded here: not the global RNG's state
        sure = head(features).argmax(-1)  # (2, 9): made near-certain by scaling the head up
        head.weight.mul_(200)
    ids = torch.randint(0, 50, (2, 9), generator=g)  # the text disagrees
    drawn = head_loss.next_token_loss(features, head, ids, torch.Generator().manual_seed(1))
    drawn.backward()
    expected = F.cross_entropy(head(features[:, :-1]).flatten(0, 1), sure[:, :-1].flatten(), reduction="sum")
    assert drawn.item() == pytest.approx(expected.item(), abs=1e-3)
    text = head_loss.next_token_loss(features, head, ids)
    assert text.item() > drawn.item() + 100  # the text's labels are far less likely


def _mapped_checkpoint_tensor(folder, name: str = "weights.safetensors"):
    """A 4 MiB float32 tensor whose memory is a private mapping of a .safetensors file, as the loader maps it."""
    import mmap

    from safetensors.torch import save_file

    path = folder / name
    original = torch.arange(1 << 20, dtype=torch.float32)
    save_file({"w": original}, path)
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    header = 8 + int.from_bytes(mapped[:8], "little")
    tensor = torch.frombuffer(mapped, dtype=torch.float32, offset=header, count=original.numel())
    return path, mapped, tensor, original


def _resident(path) -> int:
    return sum(m.rss for m in psutil.Process().memory_maps(grouped=True) if m.path == str(path))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on file mappings: Linux")
def test_a_dropped_weight_gives_its_checkpoint_pages_back_and_reads_the_file_again(tmp_path):
    from lora_compress.core.pages import release_checkpoint_pages, releasing_checkpoint_pages

    path, mapped, tensor, original = _mapped_checkpoint_tensor(tmp_path)
    float(tensor.sum())  # fault every page in
    before = _resident(path)
    assert release_checkpoint_pages(tensor) == 0  # a Python caller's model: its weights may have been written to
    with releasing_checkpoint_pages():
        released = release_checkpoint_pages(tensor)
    assert released >= (4 << 20) - 2 * mmap_page() and _resident(path) <= before - released + mmap_page()
    assert torch.equal(tensor, original)  # a read after all faults the file's bytes in again
    with releasing_checkpoint_pages():
        assert release_checkpoint_pages(original.clone()) == 0  # ordinary memory is left alone
    del tensor
    mapped.close()


def mmap_page() -> int:
    import mmap

    return mmap.PAGESIZE


def test_a_replaced_weight_gives_its_pages_back_only_once_no_tied_layer_reads_them(monkeypatch):
    import lora_compress.core.patch as patch
    from lora_compress.core.svd import Factors

    released = []
    monkeypatch.setattr(patch, "release_checkpoint_pages", lambda tensor: released.append(tensor) or 0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False),
                                torch.nn.Linear(8, 8, bias=False))
    model[1].weight = model[0].weight  # tied
    shared, own = model[0].weight, model[2].weight
    factors = Factors(torch.ones(8, 2), torch.ones(2, 8), torch.ones(8), 1.0)
    patch.factor_module_(model, "0", factors)
    assert released == []  # layer 1 still reads the tied weight
    patch.factor_module_(model, "1", factors)
    patch.factor_module_(model, "2", factors)
    assert [t is shared for t in released] == [True, False] and released[1] is own
