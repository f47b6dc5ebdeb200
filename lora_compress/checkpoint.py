"""Reading dense checkpoints and writing/reading compressed folders, with safetensors only.

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
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from .errors import LoraCompressError
from .layers import LowRankLinear

MANIFEST = "lora_compress.json"
WEIGHTS = "model.safetensors"
ADAPTERS = "adapters.safetensors"
INDEX = "model.safetensors.index.json"
FORMAT_VERSION = 1
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
              "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
              "generation_config.json", "chat_template.jinja")
_INTEGER_DTYPES = ("I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "F8_E4M3", "F8_E5M2", "BOOL")


@dataclass(frozen=True)
class Source:
    """Where a dense checkpoint lives: a folder, and a GGUF file name inside it if any."""

    folder: Path
    name: str  # what the user typed (folder path or Hub id), recorded in manifests
    gguf_file: str | None = None


def resolve_source(model: str, gguf_file: str | None = None) -> Source:
    """A local checkpoint folder, or a Hub id fetched through transformers' cache.

    Raises:
        LoraCompressError: the folder is missing and the name cannot be fetched.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return Source(path.resolve(), model, gguf_file)
    if path.exists():
        raise LoraCompressError(f"{model} is a file, not a checkpoint folder; pass the folder that holds config.json")
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise LoraCompressError(f"model folder {model} does not exist; pass a checkpoint folder or a Hub id")
    return Source(_fetch_from_hub(model, gguf_file), model, gguf_file)


def _fetch_from_hub(repo_id: str, gguf_file: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.model", "*.jinja"] + ([gguf_file] if gguf_file else ["*.safetensors"])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:  # the hub raises many types; all mean "not available here"
        raise LoraCompressError(f"model folder {repo_id} does not exist and the Hub could not provide it "
                                f"({type(error).__name__}); pass a local checkpoint folder") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: one file, or the shards its index names.

    Raises:
        LoraCompressError: no config.json, no weights, or an index naming a missing shard.
    """
    if not (folder / "config.json").is_file():
        gguf = next(iter(sorted(folder.glob("*.gguf"))), None)
        hint = f" (or --gguf-file {gguf.name} to read the GGUF file there)" if gguf else ""
        raise LoraCompressError(f"{folder} has no config.json; pass a Hugging Face checkpoint folder{hint}")
    if (folder / INDEX).is_file():
        index = _read_json(folder / INDEX)
        shards = sorted(set(index.get("weight_map", {}).values()))
        for shard in shards:
            if not (folder / shard).is_file():
                raise LoraCompressError(f"{INDEX} in {folder} names shard {shard}, which is missing; "
                                        f"copy the complete checkpoint")
        return [folder / s for s in shards]
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    raise LoraCompressError(f"{folder} has no {WEIGHTS} or {INDEX}; only safetensors checkpoints are read "
                            f"(convert .bin files with transformers' save_pretrained(safe_serialization=True))")


def check_weight_files(files: list[Path]) -> None:
    """Open every file's header and reject corrupt files and integer/quantised 2-D weights."""
    for file in files:
        try:
            with safe_open(file, "pt") as handle:
                for key in handle.keys():
                    tensor_slice = handle.get_slice(key)
                    if len(tensor_slice.get_shape()) == 2 and key.endswith("weight") \
                            and tensor_slice.get_dtype() in _INTEGER_DTYPES:
                        raise LoraCompressError(
                            f"{key} in {file.name} is stored as {tensor_slice.get_dtype()} (quantised); "
                            f"dequantise the checkpoint to float16/bfloat16/float32 first")
        except LoraCompressError:
            raise
        except Exception as error:
            raise LoraCompressError(f"{file} is not a readable safetensors file ({error}); "
                                    f"download or copy it again") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise LoraCompressError(f"{path} is not valid JSON ({error}); restore the file") from None


def model_class(config) -> type:
    """The transformers class named first in config.architectures (AutoModel if none)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def load_dense(source: Source, dtype: torch.dtype | str = "auto") -> nn.Module:
    """Build the dense model of a checkpoint folder (safetensors or GGUF), in eval mode.

    Raises:
        LoraCompressError: the folder is not a valid checkpoint (see weight_files/check_weight_files).
    """
    from transformers import AutoConfig

    if source.gguf_file:
        return _load_gguf(source)
    check_weight_files(weight_files(source.folder))
    config = AutoConfig.from_pretrained(source.folder)
    try:
        model = model_class(config).from_pretrained(source.folder, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise LoraCompressError(f"transformers could not load {source.folder} ({error}); "
                                f"check the checkpoint matches its config.json") from None
    return model.eval()


def _load_gguf(source: Source) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if not (source.folder / source.gguf_file).is_file():
        raise LoraCompressError(f"{source.gguf_file} is not in {source.folder}; pass --gguf-file with a file there")
    model = AutoModelForCausalLM.from_pretrained(source.folder, gguf_file=source.gguf_file, dtype=torch.float32)
    model.hf_quantizer = None  # GGUF weights arrive dequantised to float32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval()


def load_tokenizer(source: Source):
    """The checkpoint's tokenizer, or None when the folder has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
    except (OSError, ValueError, TypeError):
        return None


def check_output_folder(out: Path, force: bool = False) -> None:
    """Refuse an existing non-empty output folder (or a file there) unless ``force``.

    Raises:
        LoraCompressError: ``out`` exists and ``force`` is False.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise LoraCompressError(f"output folder {out} already exists; choose another --out or pass --force")


@contextmanager
def atomic_folder(out: Path, force: bool = False):
    """Yield a temporary folder beside ``out``; rename it to ``out`` only if the block succeeds.

    Raises:
        LoraCompressError: ``out`` exists (see check_output_folder), or it cannot be written.
    """
    out = Path(out)
    check_output_folder(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as error:
        raise LoraCompressError(f"cannot write to {out.parent} ({error.strerror}); choose a writable --out") from None
    try:
        yield tmp
        _honour_umask(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except OSError as error:
        raise LoraCompressError(f"writing {out} failed ({error.strerror}); free space or choose another --out") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _honour_umask(folder: Path) -> None:
    """mkdtemp makes a 0700 folder; give the result the modes a plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def copy_side_files(source: Source, model: nn.Module, tokenizer, folder: Path) -> None:
    """Config and tokenizer files into ``folder`` (from the GGUF when the source is one)."""
    model.config.save_pretrained(folder)
    copied = False
    for name in SIDE_FILES:
        if (source.folder / name).is_file() and not source.gguf_file:
            shutil.copy2(source.folder / name, folder / name)
            copied = True
    if not copied and tokenizer is not None:
        tokenizer.save_pretrained(folder)


def factored_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """Every LowRankLinear in the model, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<module>.lora_A`` / ``<module>.lora_B`` of every factored module, contiguous copies."""
    tensors = {}
    for name, module in factored_modules(model).items():
        tensors[f"{name}.lora_A"] = module.lora_A.detach().contiguous()
        tensors[f"{name}.lora_B"] = module.lora_B.detach().contiguous()
    return tensors


def write_compressed(folder: Path, model: nn.Module, manifest: dict) -> None:
    """Weights, adapters and manifest of a compressed model into ``folder``."""
    metadata = {"format": "pt", "lora_compress_format": str(FORMAT_VERSION)}
    save_model(model, str(folder / WEIGHTS), metadata=metadata)
    save_file(adapter_tensors(model), str(folder / ADAPTERS), metadata=metadata)
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
    manifest = _read_json(folder / MANIFEST)
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
    _install_factored(model, manifest["layers"], dtype)
    files = weight_files(folder)
    check_weight_files(files)
    _load_weights(model, files)
    return model.eval()


def _load_weights(model: nn.Module, paths: list[Path]) -> None:
    """Load one file or every shard; a name no file provides, or one the model lacks, is an error."""
    from safetensors.torch import load_model

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


def _install_factored(model: nn.Module, layers: dict, dtype: torch.dtype) -> None:
    """Swap in empty LowRankLinear modules at the ranks the manifest records."""
    from .patch import replace_module

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
    from .layers import dense_weight
    from .patch import replace_module

    path = Path(path)
    path = path / ADAPTERS if path.is_dir() else path
    if not path.is_file():
        raise LoraCompressError(f"{path} does not exist; pass an adapters.safetensors file or its folder")
    check_weight_files([path])
    tensors = load_file(str(path))
    modules = dict(model.named_modules())
    for name in sorted({key.rsplit(".", 1)[0] for key in tensors}):
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
