"""Blocks called differently (sliding-window and full-attention layers): every block gets its own call."""
from __future__ import annotations

from dataclasses import replace
import torch

from helpers import dense, saved_tensors
from lora_compress import CompressConfig
from lora_compress.methods.config import RunConfig
from lora_compress.calibrate.blocks import block_calls, block_hidden, call_block, find_blocks, returns_tuple
from lora_compress.jobs.compress import compress
from lora_compress.storage.compressed import read_manifest


def _blocks(model) -> list[torch.nn.Module]:
    return [block for _, block in find_blocks(model)]


def _block_by_block(model, calls) -> torch.Tensor:
    """The last block's output, running the blocks one at a time on the recorded calls."""
    hidden = block_hidden(calls[0])
    for block, calls_of_block in zip(_blocks(model), calls):
        hidden = [call_block(block, call, h) for call, h in zip(calls_of_block, hidden)]
    return torch.cat(hidden)


@torch.no_grad()
def test_recorded_calls_reproduce_the_models_own_forward(tiny_models):
    model = dense(tiny_models["gemma2"])
    tokens = torch.randint(0, model.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(1))
    blocks = _blocks(model)
    calls = block_calls(model, blocks, tokens, returns_tuple(model, blocks[0], tokens))
    assert len(calls) == len(blocks) == 4 and all(len(c) == len(calls[0]) for c in calls)
    expected = model.model(input_ids=tokens, use_cache=False).last_hidden_state
    torch.testing.assert_close(model.model.norm(_block_by_block(model, calls)), expected)
    first_call_everywhere = [calls[0]] * len(blocks)  # the full-attention layers would get a sliding mask
    assert not torch.allclose(model.model.norm(_block_by_block(model, first_call_everywhere)), expected, atol=1e-3)


def test_sequential_compression_of_mixed_attention_streams_like_in_memory(tiny_models, text_file, tmp_path):
    config = CompressConfig(method="sequential", budget=0.7)
    run = RunConfig(calib=str(text_file), calib_samples=6, calib_len=16)
    compress(str(tiny_models["gemma2"]), tmp_path / "memory", config, run, progress=False)
    compress(str(tiny_models["gemma2"]), tmp_path / "stream", config, replace(run, stream=True), progress=False)
    assert read_manifest(tmp_path / "memory").layers == read_manifest(tmp_path / "stream").layers
    memory, streamed = saved_tensors(tmp_path / "memory"), saved_tensors(tmp_path / "stream")
    assert memory.keys() == streamed.keys() and any(k.endswith("lora_A") for k in memory)
    for key in memory:
        torch.testing.assert_close(streamed[key], memory[key], rtol=1e-5, atol=1e-6)
