"""Small shared test helpers: loading tiny models and comparing their outputs."""
from __future__ import annotations

import torch

from safetensors.torch import load_file

from lora_compress.storage.checkpoint import load_dense, resolve_source
from lora_compress.storage.shards import output_files


def dense(folder):
    """The dense model of a checkpoint folder, in eval mode."""
    return load_dense(resolve_source(str(folder)))


def inputs_for(model, batch: int = 2, length: int = 12) -> dict:
    """Fixed random token ids valid for the model's vocabulary."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
    return {"input_ids": ids}


@torch.no_grad()
def outputs(model, inputs) -> torch.Tensor:
    """Logits for LMs, last hidden states for encoders."""
    result = model(**inputs)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor a compressed folder holds, across its shards."""
    return {key: load_file(path)[key] for key, path in output_files(folder).items()}
