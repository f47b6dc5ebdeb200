"""Reading dense checkpoints with safetensors (single file, shards, GGUF, Hub): never a pickle.

    resolve_source(MODEL) → Source(folder, name, gguf_file) → load_dense(source) → nn.Module
"""
from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import LoraCompressError
from .manifest import read_json, refuse_compressed
from .remote_code import MODEL_TYPE, VARIANT

INDEX = "model.safetensors.index.json"
WEIGHTS = "model.safetensors"
COMPRESSED_INDEX = f"model.safetensors.index.{VARIANT}.json"  # a compressed folder's (format 3 on): transformers'
COMPRESSED_WEIGHTS = f"model.{VARIANT}.safetensors"  # variant names, which only the folder's own class asks for
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
              "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
              "generation_config.json", "chat_template.jinja")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")
_INTEGER_DTYPES = ("I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "F8_E4M3", "F8_E5M2", "BOOL")


@dataclass(frozen=True)
class Source:
    """Where a dense checkpoint lives: a folder, and a GGUF file name inside it if any."""

    folder: Path
    name: str  # what the user typed (folder path or Hub id), recorded in manifests
    gguf_file: str | None = None


def resolve_source(model: str, gguf_file: str | None = None) -> Source:
    """A local dense checkpoint folder, or a Hub id fetched through transformers' cache.

    Raises:
        LoraCompressError: the folder is missing and the name cannot be fetched, or it is a compressed
            folder (whose factored layers a dense reader would fill with random weights).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        refuse_compressed(path, model)
        if not gguf_file and (path / "config.json").is_file():
            read_config(path)
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


def read_config(folder: Path) -> dict:
    """A checkpoint folder's config.json: a JSON object naming a model type transformers knows (for a
    compressed folder's, its ``base_model_type``).

    Raises:
        LoraCompressError: the file is not JSON, not an object, names no model type or an unknown one.
    """
    from transformers import CONFIG_MAPPING, __version__

    path = folder / "config.json"
    config = read_json(path)
    if not isinstance(config, dict):
        raise LoraCompressError(f"{path} is not a JSON object; restore it from the checkpoint's source")
    key = "base_model_type" if config.get("model_type") == MODEL_TYPE else "model_type"  # format 2: its own type
    for key in (key, "base_model_type") if key == "model_type" and "base_model_type" in config else (key,):
        if key not in config:
            raise LoraCompressError(f"{path} names no {key}; restore it from the checkpoint's source")
        if not isinstance(config[key], str) or config[key] not in CONFIG_MAPPING:
            raise LoraCompressError(f"{path} has {key} {config[key]!r}, which transformers {__version__} does not "
                                    f"know; upgrade transformers, or restore the file from the checkpoint's source")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: one file, or the shards its index names.

    Raises:
        LoraCompressError: no config.json, no weights, or an index naming a missing shard.
    """
    if not (folder / "config.json").is_file():
        gguf = next(iter(sorted(folder.glob("*.gguf"))), None)
        hint = f" (or --gguf-file {gguf.name} to read the GGUF file there)" if gguf else ""
        raise LoraCompressError(f"{folder} has no config.json; pass a Hugging Face checkpoint folder{hint}")
    for index_name in (INDEX, COMPRESSED_INDEX):
        if (folder / index_name).is_file():
            index = read_json(folder / index_name)
            shards = sorted(set(index.get("weight_map", {}).values()))
            for shard in shards:
                if not (folder / shard).is_file():
                    raise LoraCompressError(f"{index_name} in {folder} names shard {shard}, which is missing; "
                                            f"copy the complete checkpoint")
            return [folder / s for s in shards]
    for name in (WEIGHTS, COMPRESSED_WEIGHTS):
        if (folder / name).is_file():
            return [folder / name]
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
        except MemoryError as error:  # mmap refused: an address-space limit, not a damaged file
            raise LoraCompressError(f"{file} cannot be mapped into memory ({error}); raise the address-space "
                                    f"limit (ulimit -v) or free memory") from None
        except Exception as error:
            raise LoraCompressError(f"{file} is not a readable safetensors file ({error}); "
                                    f"download or copy it again") from None


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
    try:
        config = AutoConfig.from_pretrained(source.folder)
        model, loaded = model_class(config).from_pretrained(source.folder, dtype=dtype, use_safetensors=True,
                                                            output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise LoraCompressError(f"transformers could not load {source.folder} ({_first_line(error)}); "
                                f"check the checkpoint matches its config.json") from None
    if loaded["missing_keys"]:  # transformers would fill them with random weights
        missing = sorted(loaded["missing_keys"])
        more = f" and {len(missing) - 1} more tensors" if len(missing) > 1 else ""
        raise LoraCompressError(f"{source.folder} lacks {missing[0]}{more}; the checkpoint is incomplete or renamed: "
                                f"copy it again from its source")
    return model.eval()


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _load_gguf(source: Source) -> nn.Module:
    from transformers import AutoModelForCausalLM

    path = source.folder / source.gguf_file
    if not path.is_file():
        raise LoraCompressError(f"{source.gguf_file} is not in {source.folder}; pass --gguf-file with a file there")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise LoraCompressError(f"{path} is not a GGUF file (it does not start with the bytes GGUF); pass a "
                                    f".gguf file, or download it again")
    try:
        model = AutoModelForCausalLM.from_pretrained(source.folder, gguf_file=source.gguf_file, dtype=torch.float32)
    except (ValueError, OSError, KeyError, IndexError, TypeError, struct.error) as error:  # parsing foreign bytes
        raise LoraCompressError(f"transformers could not read {path} ({_first_line(error)}); check it is a complete "
                                f"GGUF file of an architecture transformers reads, or download it again") from None
    model.hf_quantizer = None  # GGUF weights arrive dequantised to float32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval()


def load_tokenizer(source: Source):
    """The checkpoint's tokenizer, or None when the folder has none.

    Raises:
        LoraCompressError: the folder has tokenizer files, but they cannot be read.
    """
    from transformers import AutoTokenizer

    try:  # never run a folder's code: a compressed folder's config.json names its modeling file
        return AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file, trust_remote_code=False)
    except Exception as error:  # the tokenizers library raises plain Exception on a damaged tokenizer.json
        files = [name for name in TOKENIZER_FILES if (source.folder / name).is_file()]
        if not files:
            return None
        raise LoraCompressError(f"the tokenizer files of {source.folder} ({', '.join(files)}) cannot be read "
                                f"({_first_line(error)}); copy them again from the checkpoint's source") from None


def copy_side_files(source: Source, model: nn.Module, tokenizer, folder: Path) -> None:
    """Config and tokenizer files into ``folder`` (from the GGUF when the source is one).

    A compressed folder's config.json is written afterwards by ``compressed.finish_compressed``.
    """
    model.config.save_pretrained(folder)
    copied = False
    for name in SIDE_FILES:
        if (source.folder / name).is_file() and not source.gguf_file:
            shutil.copy2(source.folder / name, folder / name)
            copied = True
    if not copied and tokenizer is not None:
        tokenizer.save_pretrained(folder)


def is_causal_lm(model: nn.Module) -> bool:
    """True when the model predicts next tokens (has an LM head and is a decoder)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def tensor_names(path: Path) -> list[str]:
    """The names of the tensors in one safetensors file (its header only is read)."""
    with safe_open(path, "pt") as handle:
        return list(handle.keys())
