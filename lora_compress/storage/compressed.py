"""The compressed folder: written by ``compress``/``heal``, read back by :func:`load` or by transformers alone.

A compressed folder is self-contained::

    DIR/
      config.json, modeling_lora_compressed.py   the base's config with model_type "lora_compressed", and the
                                                 code transformers runs for it (remote_code.py)
      tokenizer files                            copied from the source
      model.safetensors                          untouched tensors + <module>.lora_A / <module>.lora_B, each
                                                 stored once, in the checkpoint's dtype
      adapters.safetensors                       only with --adapters: just the factors
      lora_compress.json                         the manifest: format, per-layer shapes and ranks, settings

Nothing is ever unpickled: weights are read with safetensors, the architecture is built by
transformers from config.json.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from ..core.experts import expert_of, tie_shared_factors_, unfuse_experts_
from ..core.layers import LowRankLinear, dense_weight
from ..core.patch import replace_module
from ..errors import LoraCompressError, LoraCompressWarning
from .checkpoint import WEIGHTS, check_weight_files, read_config, weight_files
from .manifest import ADAPTERS, FORMAT_VERSION, MANIFEST, METADATA, LayerEntry, Manifest, read_manifest, write_manifest
from .remote_code import base_config, is_remote_config, remote_entries, write_remote_code
from .shards import output_files, write_adapters
from .space import reserve

__all__ = ["ADAPTERS", "FORMAT_VERSION", "MANIFEST", "METADATA", "adapter_tensors", "apply_adapters",
           "factored_modules", "finish_compressed", "load", "read_manifest", "save_weights", "weight_bytes",
           "write_compressed", "write_manifest"]


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


def write_compressed(folder: Path, model: nn.Module, manifest: Manifest, *, adapters: bool = False) -> None:
    """Weights, config, modeling file and manifest of a compressed model into ``folder``.

    ``adapters`` also writes ``adapters.safetensors`` (the factors a second time, on their own).
    """
    save_weights(folder, model)
    finish_compressed(folder, model.config, manifest, adapters=adapters)


def save_weights(folder: Path, model: nn.Module) -> None:
    """``model.safetensors``: every tensor of the model once (tied ones under one name), in its dtype.

    Raises:
        LoraCompressError: the device has too little space for them; nothing is written then.
    """
    reserve(folder, tensor_bytes(model))
    save_model(model, str(folder / WEIGHTS), metadata=METADATA)


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers, each tied tensor once: about its weights file."""
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def finish_compressed(folder: Path, config, manifest: Manifest, *, adapters: bool = False) -> None:
    """Everything but the weights (already in ``folder``): config.json and the modeling file for
    transformers, the manifest, and ``adapters.safetensors`` when asked (read back from the weights).

    Args:
        config: the base model's transformers config.
    """
    write_remote_code(folder, config.to_dict(), manifest.model_class, manifest.layer_table(), manifest.experts)
    write_manifest(folder, manifest)
    if adapters:
        write_adapters(folder)


def load(folder: str | os.PathLike) -> nn.Module:
    """Rebuild a compressed model from its folder alone, bit-identical to the one saved.

    Example:
        >>> model = load("out/minilm-50")
        >>> model(**batch).last_hidden_state

    Raises:
        LoraCompressError: the folder is not a compressed model or its files are damaged.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    config = folder_config(folder, manifest)
    dtype = getattr(torch, manifest.dtype)
    model = _manifest_class(folder, manifest)._from_config(config, dtype=dtype)
    _split_experts(model, manifest.experts, folder)
    _install_factored(model, manifest.layers, dtype)
    tie_shared_factors_(model, manifest.layer_table())
    files = weight_files(folder)
    check_weight_files(files)
    _load_weights(model, files)
    _check_finite(model, folder)
    return model.eval()


def _manifest_class(folder: Path, manifest: Manifest) -> type:
    """The transformers class the manifest names (the class the model was compressed as)."""
    import transformers

    found = getattr(transformers, manifest.model_class, None)
    if not isinstance(found, type) or not hasattr(found, "_from_config"):
        raise LoraCompressError(f"{folder / MANIFEST} names model_class {manifest.model_class!r}, which is no model "
                                f"class of transformers {transformers.__version__}; upgrade transformers, or compress "
                                f"the model again if the manifest is damaged")
    return found


def folder_config(folder: Path, manifest: Manifest):
    """The base model's transformers config, from config.json in either format (see manifest.py).

    Raises:
        LoraCompressError: config.json is damaged, or lists other factored layers than the manifest.
    """
    from transformers import AutoConfig

    config = read_config(folder)
    if is_remote_config(config):
        _check_remote_entries(folder, config, manifest)
        return base_config(config, manifest.model_class)
    warnings.warn(f"{folder} is in format 1, which transformers alone loads with random factored layers; "
                  f"`lora-compress export {folder} --upgrade --out NEW` rewrites it in format {FORMAT_VERSION}",
                  LoraCompressWarning, stacklevel=3)
    return AutoConfig.from_pretrained(folder)


def _check_remote_entries(folder: Path, config: dict, manifest: Manifest) -> None:
    """config.json's factored layers (what transformers alone builds) are the manifest's."""
    for key, expected in remote_entries(manifest.layer_table(), manifest.experts).items():
        found = config.get(key) or {}
        if found != expected:
            names = sorted({*found, *expected}) if isinstance(found, dict) else []
            differs = next((n for n in names if found.get(n) != expected.get(n)), key)
            raise LoraCompressError(f"config.json in {folder} lists other {key} than {MANIFEST} (at {differs}); the "
                                    f"folder is damaged: compress the model again")


def _check_finite(model: nn.Module, folder: Path) -> None:
    """Every stored factor is finite: a NaN there would make every figure and export NaN, silently."""
    for name, module in factored_modules(model).items():
        for factor in ("lora_A", "lora_B"):
            if not bool(torch.isfinite(getattr(module, factor)).all()):
                raise LoraCompressError(f"{name}.{factor} in {folder} holds NaN or inf; the folder is damaged: "
                                        f"compress the model again")


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


def _install_factored(model: nn.Module, layers: dict[str, LayerEntry], dtype: torch.dtype) -> None:
    """Swap in empty LowRankLinear modules at the ranks the manifest records."""
    for name, layer in layers.items():
        if not layer.factored:
            continue
        out_features, in_features = layer.shape
        module = LowRankLinear(in_features, out_features, layer.rank, bias=layer.bias, dtype=dtype)
        replace_module(model, name, module)


def apply_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Replace each module named in an adapters file by its factors (bias kept from the module).

    Args:
        model: the original dense model, as loaded from its checkpoint.
        path: an ``adapters.safetensors`` file, or a compressed folder (its adapters file, else the
            factors in its weights).

    Returns:
        The same model, patched in place.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("base")
        >>> apply_adapters(model, "out/base-50")

    Raises:
        LoraCompressError: the file names modules the model lacks, or shapes differ.
    """
    tensors = factor_tensors(Path(path))
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


def factor_tensors(path: Path) -> dict[str, torch.Tensor]:
    """``<module>.lora_A`` / ``.lora_B`` of an adapters file, or of a compressed folder (its adapters file
    when it has one, else read out of its weights, one tensor at a time).

    Raises:
        LoraCompressError: no such file or folder, or unreadable weights.
    """
    if path.is_dir() and not (path / ADAPTERS).is_file():
        check_weight_files(weight_files(path))
        files = {key: file for key, file in output_files(path).items() if key.endswith((".lora_A", ".lora_B"))}
        tensors = {}
        for key, file in files.items():
            with safe_open(file, "pt") as handle:
                tensors[key] = handle.get_tensor(key)
        return tensors
    path = path / ADAPTERS if path.is_dir() else path
    if not path.is_file():
        raise LoraCompressError(f"{path} does not exist; pass an adapters.safetensors file or its folder")
    check_weight_files([path])
    return load_file(str(path))


def weight_bytes(folder: Path) -> int:
    """Bytes of the weight files (``*.safetensors`` / ``*.gguf``, adapters excluded) in a folder."""
    return sum(f.stat().st_size for f in Path(folder).iterdir()
               if f.suffix in (".safetensors", ".gguf") and f.name != ADAPTERS)
