"""The compressed folder: written by ``compress``/``heal``, read back by :func:`load`.

A compressed folder is self-contained::

    DIR/
      config.json, tokenizer files      copied from the source
      model.safetensors                 untouched tensors + <module>.lora_A / <module>.lora_B
      adapters.safetensors              just the factors, for apply_adapters() on the original
      lora_compress.json                the manifest: format, per-layer shapes and ranks, settings

Nothing is ever unpickled: weights are read with safetensors, the architecture is built by
transformers from config.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from ..core.experts import expert_of, tie_shared_factors_, unfuse_experts_
from ..core.layers import LowRankLinear, dense_weight
from ..core.patch import replace_module
from ..errors import LoraCompressError
from .checkpoint import WEIGHTS, check_weight_files, model_class, read_json, weight_files

MANIFEST = "lora_compress.json"
ADAPTERS = "adapters.safetensors"
FORMAT_VERSION = 1
METADATA = {"format": "pt", "lora_compress_format": str(FORMAT_VERSION)}  # of every weights file


def factored_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """Every LowRankLinear in the model, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<module>.lora_A`` / ``<module>.lora_B`` of every factored module, contiguous copies; a factor
    shared by several modules (a basis shared across experts) is copied for each, so that the file
    stands alone."""
    tensors, seen = {}, set()
    for name, module in factored_modules(model).items():
        for factor in ("lora_A", "lora_B"):
            tensor = getattr(module, factor).detach()
            tensors[f"{name}.{factor}"] = tensor.clone() if id(getattr(module, factor)) in seen else tensor.contiguous()
            seen.add(id(getattr(module, factor)))
    return tensors


def write_compressed(folder: Path, model: nn.Module, manifest: dict) -> None:
    """Weights, adapters and manifest of a compressed model into ``folder``."""
    save_model(model, str(folder / WEIGHTS), metadata=METADATA)
    save_file(adapter_tensors(model), str(folder / ADAPTERS), metadata=METADATA)
    write_manifest(folder, manifest)


def write_manifest(folder: Path, manifest: dict) -> None:
    """``lora_compress.json`` as indented JSON."""
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: Path) -> dict:
    """The manifest of a compressed folder.

    Raises:
        LoraCompressError: the folder is not a lora-compress output.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise LoraCompressError(f"{folder} has no {MANIFEST}; pass a folder written by `lora-compress compress`")
    manifest = read_json(folder / MANIFEST)
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise LoraCompressError(f"{folder} was written by a newer lora-compress (format "
                                f"{manifest['format_version']}); upgrade lora-compress")
    return manifest


def load(folder: str | os.PathLike) -> nn.Module:
    """Rebuild a compressed model from its folder alone, bit-identical to the one saved.

    Example:
        >>> model = load("out/minilm-50")
        >>> model(**batch).last_hidden_state

    Raises:
        LoraCompressError: the folder is not a compressed model or its files are damaged.
    """
    from transformers import AutoConfig

    folder = Path(folder)
    manifest = read_manifest(folder)
    config = AutoConfig.from_pretrained(folder)
    dtype = getattr(torch, manifest["dtype"])
    model = model_class(config)._from_config(config, dtype=dtype)
    _split_experts(model, manifest.get("experts", {}), folder)
    _install_factored(model, manifest["layers"], dtype)
    tie_shared_factors_(model, manifest["layers"])
    files = weight_files(folder)
    check_weight_files(files)
    _load_weights(model, files)
    return model.eval()


def _load_weights(model: nn.Module, paths: list[Path]) -> None:
    """Load one file or every shard; a name no file provides, or one the model lacks, is an error."""
    missing, unexpected = None, set()
    for path in paths:
        try:
            shard_missing, shard_unexpected = load_model(model, str(path), strict=False)
        except RuntimeError as error:  # shapes differ from the manifest's ranks
            raise LoraCompressError(f"{path} does not match its manifest ({str(error).splitlines()[0]}); "
                                    f"compress the model again") from None
        missing = set(shard_missing) if missing is None else missing & set(shard_missing)
        unexpected |= set(shard_unexpected)
    if missing or unexpected:
        problem = f"missing {sorted(missing)[0]}" if missing else f"unexpected {sorted(unexpected)[0]}"
        raise LoraCompressError(f"{paths[0].parent} does not match its manifest ({problem}); "
                                f"compress the model again")


def _split_experts(model: nn.Module, experts: dict, folder: Path) -> None:
    """Split the fused experts modules the manifest names into one module per expert (core/experts.py)."""
    split = unfuse_experts_(model, set(experts))
    for name, layout in experts.items():
        if name not in split or split[name].layout.manifest() != layout:
            raise LoraCompressError(f"{folder} holds the experts {name} as {layout['class']} with "
                                    f"{layout['num_experts']} experts, which this model does not build; "
                                    f"load it with the transformers version that wrote it")


def _install_factored(model: nn.Module, layers: dict, dtype: torch.dtype) -> None:
    """Swap in empty LowRankLinear modules at the ranks the manifest records."""
    for name, layer in layers.items():
        if layer.get("rank") is None:
            continue
        out_features, in_features = layer["shape"]
        module = LowRankLinear(in_features, out_features, layer["rank"], bias=layer["bias"], dtype=dtype)
        replace_module(model, name, module)


def apply_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Replace each module named in an adapters file by its factors (bias kept from the module).

    Args:
        model: the original dense model, as loaded from its checkpoint.
        path: an ``adapters.safetensors`` file, or a compressed folder holding one.

    Returns:
        The same model, patched in place.

    Example:
        >>> model = AutoModel.from_pretrained("base")
        >>> apply_adapters(model, "out/base-50")

    Raises:
        LoraCompressError: the file names modules the model lacks, or shapes differ.
    """
    path = Path(path)
    path = path / ADAPTERS if path.is_dir() else path
    if not path.is_file():
        raise LoraCompressError(f"{path} does not exist; pass an adapters.safetensors file or its folder")
    check_weight_files([path])
    tensors = load_file(str(path))
    names = {key.rsplit(".", 1)[0] for key in tensors}
    unfuse_experts_(model, {found[0] for found in (expert_of(model, n) for n in names) if found})  # experts' factors
    modules = dict(model.named_modules())
    for name in sorted(names):
        if name not in modules or not hasattr(modules[name], "weight"):
            raise LoraCompressError(f"adapter module {name} is not in this model; apply it to the model it was made from")
        B, A = tensors[f"{name}.lora_B"], tensors[f"{name}.lora_A"]
        weight = dense_weight(modules[name])
        if (B.shape[0], A.shape[1]) != tuple(weight.shape):
            raise LoraCompressError(f"adapter {name} is {B.shape[0]}×{A.shape[1]} but the model's layer is "
                                    f"{weight.shape[0]}×{weight.shape[1]}; apply it to the model it was made from")
        bias = getattr(modules[name], "bias", None)
        replace_module(model, name, LowRankLinear.from_factors(B.to(weight.dtype), A.to(weight.dtype), bias))
    return model


def weight_bytes(folder: Path) -> int:
    """Bytes of the weight files (``*.safetensors`` / ``*.gguf``, adapters excluded) in a folder."""
    return sum(f.stat().st_size for f in Path(folder).iterdir()
               if f.suffix in (".safetensors", ".gguf") and f.name != ADAPTERS)
