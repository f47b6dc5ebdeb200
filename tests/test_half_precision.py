"""Half-precision checkpoints: computed in float32 where bfloat16 has no fast kernels, written back in bfloat16,
the same in memory and streamed."""
from __future__ import annotations

import pytest
import torch

from helpers import dense, saved_tensors, small_calibration
from lora_compress import CompressConfig, compress
from lora_compress.calibrate.block_source import ResidentBlocks

BUDGET = CompressConfig(budget=0.8)


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
        compress(str(bf16_llama), tmp_path / str(stream), BUDGET, small_calibration(text_file, stream=stream), progress=False)
    in_memory, streamed = saved_tensors(tmp_path / "False"), saved_tensors(tmp_path / "True")
    assert any(key.endswith("lora_A") for key in in_memory)
    assert {t.dtype for t in in_memory.values() if t.is_floating_point()} == {torch.bfloat16}
    assert in_memory.keys() == streamed.keys() and all(torch.equal(in_memory[k], streamed[k]) for k in in_memory)
