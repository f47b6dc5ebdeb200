"""Smaller on disk: each tensor stored once, in the checkpoint's dtype, so bytes follow parameters."""
import pytest
import torch
from safetensors import safe_open

import lora_compress as lc
from lora_compress.core.counting import total_params
from lora_compress.storage.compressed import weight_bytes
from lora_compress.storage.shards import output_files

from helpers import dense

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored(folder) -> dict[str, tuple[str, int]]:
    """Tensor name → (safetensors dtype, bytes) of every weights file of a folder, from the headers."""
    tensors = {}
    for key, path in output_files(folder).items():
        with safe_open(path, "pt") as handle:
            piece = handle.get_slice(key)
            dtype = piece.get_dtype()
            tensors[key] = dtype, torch.Size(piece.get_shape()).numel() * DTYPES[dtype].itemsize
    return tensors


@pytest.fixture(scope="module")
def half_llama(tmp_path_factory):
    """A wider tiny Llama (hidden 128) saved in float16, with a tokenizer."""
    from conftest import _tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("half") / "llama-fp16"
    vocab = _tiny_tokenizer(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "stream"])
def test_factors_and_untouched_tensors_keep_the_checkpoints_dtype_and_are_stored_once(half_llama, tmp_path, stream):
    out = tmp_path / "out"
    lc.compress(str(half_llama), out, lc.CompressConfig(ratio=0.5), lc.RunConfig(stream=stream), progress=False)
    tensors = stored(out)
    assert {dtype for dtype, _ in tensors.values()} == {"F16"}
    assert sum(key.endswith(".lora_A") for key in tensors) == 14 and not (out / "adapters.safetensors").exists()
    params = total_params(lc.load(out)), total_params(dense(half_llama))
    assert sum(size for _, size in tensors.values()) == params[0] * 2, "every parameter once, 2 bytes each"
    assert params[0] < 0.8 * params[1]


def test_folder_weight_bytes_follow_the_parameters_kept(half_llama, tmp_path):
    out = tmp_path / "out"
    lc.compress(str(half_llama), out, lc.CompressConfig(ratio=0.5), progress=False)
    kept = total_params(lc.load(out)) / total_params(dense(half_llama))
    assert weight_bytes(out) <= (kept + 0.01) * weight_bytes(half_llama)
    assert weight_bytes(out) < 0.8 * weight_bytes(half_llama)
