"""The manifest that marks a folder as compressed (``lora_compress.json``), and the format's names.

Every reader of a folder goes through :func:`read_manifest`, which checks the format version, and
every reader of a dense checkpoint through :func:`refuse_compressed`, so a compressed folder is
never computed on as if it were the dense model it came from.

    format 1   config.json is the base model's own: transformers alone builds random factored layers
    format 2   config.json has model_type "lora_compressed" and the modeling file (remote_code.py)
    format 3   config.json keeps the base's model_type (AutoTokenizer reads the folder with no flag or prompt), and the
               weights are model.lora_compressed.safetensors, transformers' variant name that a dense class never
               loads (``export --upgrade`` rewrites a folder of format 1 or 2)
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LoraCompressError

MANIFEST = "lora_compress.json"
ADAPTERS = "adapters.safetensors"
FORMAT_VERSION = 3
METADATA = {"format": "pt", "lora_compress_format": str(FORMAT_VERSION)}  # of every weights file
FIELDS = {"base_model": str, "dtype": str, "layers": dict, "model_class": str, "method": str, "settings": dict,
          "targeted_params": dict}  # what every reader uses, and its type
OPTIONAL = {"base_model_folder": (str, type(None)), "gguf_file": (str, type(None)), "experts": dict,
            "calibration": (dict, type(None)), "healing": dict}
DTYPES = ("float32", "float16", "bfloat16", "float64")


def read_json(path: Path) -> dict:
    """A JSON file's content.

    Raises:
        LoraCompressError: unreadable or not valid JSON.
    """
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoraCompressError(f"{path} is not valid JSON ({error}); restore the file") from None


def is_compressed(folder: Path) -> bool:
    """True when ``folder`` holds a lora-compress manifest."""
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a compressed folder, checked: a known format version and the keys every reader uses.

    Raises:
        LoraCompressError: the folder is not a lora-compress output, or its manifest is damaged or newer.
    """
    folder = Path(folder)
    if not is_compressed(folder):
        raise LoraCompressError(f"{folder} has no {MANIFEST}; pass a folder written by `lora-compress compress`")
    manifest = read_json(folder / MANIFEST)
    if not isinstance(manifest, dict):
        raise LoraCompressError(f"{folder / MANIFEST} is not a JSON object; compress the model again")
    check_format_version(folder, manifest.get("format_version"))
    problem = _fields_problem(manifest)
    if problem:
        raise LoraCompressError(f"{folder / MANIFEST} {problem}; the manifest is damaged: compress the model again")
    return manifest


def _fields_problem(manifest: dict) -> str | None:
    """What is missing from the manifest or of the wrong type (None when nothing is)."""
    missing = [key for key in FIELDS if key not in manifest]
    if missing:
        return f"lacks {', '.join(missing)}"
    wrong = [key for key, kind in {**FIELDS, **OPTIONAL}.items()
             if key in manifest and not isinstance(manifest[key], kind)]
    if wrong:
        return f"has {wrong[0]} {manifest[wrong[0]]!r}, of the wrong type"
    if manifest["dtype"] not in DTYPES:
        return f"has dtype {manifest['dtype']!r}, none of {', '.join(DTYPES)}"
    counts = manifest["targeted_params"]
    if not (_count(counts.get("dense")) and counts["dense"] > 0 and _count(counts.get("compressed"))):
        return f"has targeted_params {counts!r}, not two parameter counts"
    return next((f"has layer {name!r} {problem}" for name, problem in
                 ((name, _layer_problem(layer)) for name, layer in manifest["layers"].items()) if problem), None)


def _layer_problem(layer) -> str | None:
    """What is wrong with one entry of the manifest's layers (None when nothing is)."""
    if not isinstance(layer, dict):
        return "that is not a JSON object"
    shape, rank, shared = layer.get("shape"), layer.get("rank"), layer.get("shared")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_count(n) and n > 0 for n in shape)):
        return f"of shape {shape!r}, not [out, in]"
    if rank is not None and not (_count(rank) and rank > 0):
        return f"of rank {rank!r}, neither a positive integer nor null (dense)"
    if not isinstance(layer.get("bias"), bool) or not isinstance(layer.get("conv1d", False), bool):
        return "without true/false bias and conv1d"
    if shared is not None and not (isinstance(shared, dict) and shared.get("factor") in ("lora_A", "lora_B")
                                   and isinstance(shared.get("with"), str)):
        return f"sharing {shared!r}, not a factor of another layer"
    return None


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_format_version(folder: Path, version) -> None:
    """An integer from 1 to FORMAT_VERSION (a newer one needs a newer lora-compress)."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise LoraCompressError(f"format_version {version!r} in {folder / MANIFEST} is not an integer ≥ 1; "
                                f"the manifest is damaged: compress the model again")
    if version > FORMAT_VERSION:
        raise LoraCompressError(f"{folder} was written by a newer lora-compress (format {version}, this one reads "
                                f"up to {FORMAT_VERSION}); upgrade lora-compress")


def write_manifest(folder: Path, manifest: dict) -> None:
    """``lora_compress.json`` as indented JSON, stamped with this format version."""
    manifest = {**manifest, "format_version": FORMAT_VERSION}
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def refuse_compressed(folder: Path, name: str) -> None:
    """Raise when a dense checkpoint was expected but ``folder`` (typed as ``name``) is compressed.

    Raises:
        LoraCompressError: naming the folder's base model, which is what to pass instead.
    """
    if not is_compressed(folder):
        return
    try:
        base = f" (its base: {read_json(folder / MANIFEST).get('base_model')})"
    except (LoraCompressError, AttributeError):
        base = ""
    raise LoraCompressError(f"{name} is a compressed folder, not a dense checkpoint; pass the dense model it was "
                            f"compressed from{base}, or `lora-compress export {name} --dense --out DIR` first")


def read_recipe(path: str | Path) -> dict:
    """The manifest a recipe names: a compressed folder, or its ``lora_compress.json`` itself.

    Raises:
        LoraCompressError: neither, or a damaged manifest.
    """
    path = Path(path)
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    if not is_compressed(path):
        raise LoraCompressError(f"--recipe {path} is not a compressed folder or its {MANIFEST}; pass the folder a "
                                f"compress run wrote")
    return read_manifest(path)
