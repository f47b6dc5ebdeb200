"""Plain dense checkpoints from a compressed folder (B·A multiplied back) or a PEFT LoRA adapter (merged).

The result loads with ``AutoModel*.from_pretrained(out)`` and no lora-compress installed.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..storage.card import Card, manifest_settings, write_card
from ..storage.checkpoint import Source, copy_side_files, load_dense, load_tokenizer, resolve_source
from ..storage.compressed import MANIFEST, factored_modules, load, read_manifest, tensor_bytes
from ..storage.output import atomic_folder, check_output_folder, holds_outputs
from ..storage.space import reserve
from ..core.experts import fuse_experts_
from ..storage.remote_code import auto_class
from ..core.patch import replace_module
from ..errors import LoraCompressError
from .peft_format import ADAPTER_CONFIG, merge_adapter_, read_adapter_config


@holds_outputs()
def export_dense(folder: str | Path, out: str | Path, *, base: str | None = None, gguf_file: str | None = None,
                 force: bool = False,
                 command: str | None = None) -> Path:
    """Write a plain transformers checkpoint of the original architecture to ``out``.

    ``folder`` is a compressed folder (B·A multiplied back into each factored layer) or a PEFT LoRA
    adapter folder (merged into ``base``, or into the base its config names). The result loads
    with ``AutoModel*.from_pretrained(out)`` and no lora-compress installed.

    Example:
        >>> export_dense("out/smollm2-50", "out/smollm2-50-plain")
        >>> AutoModelForCausalLM.from_pretrained("out/smollm2-50-plain")

    Raises:
        LoraCompressError: ``folder`` is neither kind or is damaged, its base lacks the adapter's modules,
            ``out`` exists or is being written by another run, the disk has too little space.
    """
    folder = Path(folder)
    check_output_folder(Path(out), force, inputs=(folder, base))
    if (folder / MANIFEST).is_file():
        model, source, card = _dense_from_compressed(folder, command)
    elif (folder / ADAPTER_CONFIG).is_file():
        model, source, card = _dense_from_adapter(folder, base, gguf_file, command)
    else:
        raise LoraCompressError(f"{folder} holds neither {MANIFEST} nor {ADAPTER_CONFIG}; pass a folder written by "
                                f"`lora-compress compress` or a PEFT LoRA adapter folder")
    with atomic_folder(Path(out), force, inputs=(folder, base)) as tmp:
        reserve(tmp, tensor_bytes(model))
        model.save_pretrained(tmp)
        copy_side_files(source, model, load_tokenizer(source), tmp)
        write_card(tmp, replace(card, auto_class=auto_class(type(model).__name__)), load_path=str(out))
    return Path(out)


def _dense_from_compressed(folder: Path, command: str | None):
    manifest = read_manifest(folder)
    model = densify_(load(folder), {name for name, layer in manifest.layers.items() if layer.conv1d})
    card = Card("dense", manifest.base_model, f"the compressed folder `{folder}` ({manifest.method}) with "
                f"each layer's B·A multiplied back into a dense weight", command or f"export_dense({str(folder)!r})",
                {**manifest_settings(manifest), "compressed with": manifest.command})
    return model, Source(folder, str(folder)), card


def _dense_from_adapter(folder: Path, base: str | None, gguf_file: str | None, command: str | None):
    config = read_adapter_config(folder)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise LoraCompressError(f"{folder / ADAPTER_CONFIG} names no base model; pass --base BASE")
    source = resolve_source(base, gguf_file)
    model = merge_adapter_(load_dense(source), folder)
    card = Card("dense", source.name, f"the PEFT LoRA adapter `{folder}` merged into the base weights",
                command or f"export_dense({str(folder)!r}, base={base!r})", {"adapter": str(folder)})
    return model, source, card


@torch.no_grad()
def densify_(model: nn.Module, conv1d: set[str] = frozenset()) -> nn.Module:
    """Replace every LowRankLinear by the original layer type holding B·A (Conv1D for ``conv1d`` names),
    and split experts by their fused module again (core/experts.py)."""
    from transformers.pytorch_utils import Conv1D

    for name, module in factored_modules(model).items():
        weight = (module.lora_B.float() @ module.lora_A.float()).to(module.lora_A.dtype)  # (out, in)
        if name in conv1d:
            dense = Conv1D(module.out_features, module.in_features).to(weight)
            dense.weight.copy_(weight.T)  # Conv1D stores (in, out)
        else:
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None).to(weight)
            dense.weight.copy_(weight)
        if module.bias is not None:
            dense.bias.copy_(module.bias)
        replace_module(model, name, dense)
    fuse_experts_(model)
    return model
