"""The manifest that marks a folder as compressed (``lora_compress.json``), and the format's names.

Every reader of a folder goes through :func:`read_manifest`, which checks the format version, and
every reader of a dense checkpoint through :func:`refuse_compressed`, so a compressed folder is
never computed on as if it were the dense model it came from.

    format 1   config.json is the base model's own: transformers alone builds random factored layers
    format 2   config.json has model_type "lora_compressed" and the modeling file (remote_code.py)
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import LoraCompressError

MANIFEST = "lora_compress.json"
ADAPTERS = "adapters.safetensors"
FORMAT_VERSION = 2
METADATA = {"format": "pt", "lora_compress_format": str(FORMAT_VERSION)}  # of every weights file
FIELDS = {"base_model": str, "dtype": str, "layers": dict, "model_class": str, "method": str, "settings": dict,
          "targeted_params": dict}  # what every reader uses, and its type
OPTIONAL = {"base_model_folder": (str, type(None)), "gguf_file": (str, type(None)), "experts": (dict, type(None)),
            "calibration": (dict, type(None)), "healing": (dict, type(None)), "run": (dict, type(None)),
            "command": (str, type(None)), "versions": (dict, type(None))}
DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass(frozen=True)
class LayerEntry:
    """What one targeted layer became: its dense shape (out, in), its rank (None: left dense) and why."""

    shape: tuple[int, int]
    rank: int | None
    bias: bool
    conv1d: bool = False  # GPT-2's Conv1D (weight stored in×out)
    energy_kept: float | None = None
    note: str | None = None  # why it was left dense, or how it was factored when that is unusual
    shared: tuple[str, str] | None = None  # (its factor lora_A|lora_B, the layer that owns it): one basis, experts

    @property
    def factored(self) -> bool:
        return self.rank is not None

    def to_dict(self) -> dict:
        entry = {"shape": list(self.shape), "rank": self.rank, "bias": self.bias, "conv1d": self.conv1d,
                 "energy_kept": self.energy_kept, "note": self.note}
        return {**entry, "shared": {"factor": self.shared[0], "with": self.shared[1]}} if self.shared else entry

    @classmethod
    def from_dict(cls, data: dict) -> "LayerEntry":
        """The entry :meth:`to_dict` wrote (checked by :func:`read_manifest` first)."""
        shared = data.get("shared")
        return cls(tuple(data["shape"]), data.get("rank"), bool(data["bias"]), bool(data.get("conv1d", False)),
                   data.get("energy_kept"), data.get("note"), (shared["factor"], shared["with"]) if shared else None)


@dataclass(frozen=True)
class Manifest:
    """``lora_compress.json``, typed: what was read, the two configs that repeat the run (``settings``: the
    method's, ``run``: how it went, as their ``to_dict``), what each layer became, and the figures of the
    steps that followed. ``to_dict``/``from_dict`` round-trip; keys this version does not know are kept.

    Example:
        >>> manifest = read_manifest("out/smol-80")
        >>> manifest.layers["model.layers.0.self_attn.q_proj"].rank
        >>> CompressConfig.from_dict(manifest.settings)         # methods/config.py: the recipe
    """

    base_model: str
    model_class: str
    dtype: str
    method: str
    settings: dict
    targeted_params: dict  # {"dense": n, "compressed": n}
    layers: dict[str, LayerEntry]
    run: dict = field(default_factory=dict)  # empty in folders written before the configs split
    base_model_folder: str | None = None  # where the base was read (its name may be relative or a Hub id)
    gguf_file: str | None = None
    command: str | None = None
    versions: dict = field(default_factory=dict)
    experts: dict = field(default_factory=dict)  # split experts modules: name → layout
    calibration: dict | None = None
    healing: dict | None = None
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)  # keys of another version, written back as they were

    @property
    def factored(self) -> dict[str, LayerEntry]:
        """The layers that were factored (a rank), by name."""
        return {name: layer for name, layer in self.layers.items() if layer.factored}

    def layer_table(self) -> dict[str, dict]:
        """The layers as plain data (what config.json's entries and the report are built from)."""
        return {name: layer.to_dict() for name, layer in self.layers.items()}

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("layers", "extra")}
        return {**data, "layers": self.layer_table(), **self.extra}

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        """The manifest :meth:`to_dict` wrote (or an older one); call :func:`read_manifest` on a folder, which
        checks the data first."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known and key != "extra"}
        values["layers"] = {name: LayerEntry.from_dict(entry) for name, entry in data["layers"].items()}
        values["experts"] = values.get("experts") or {}
        values["run"] = values.get("run") or {}
        values["versions"] = values.get("versions") or {}
        return cls(**values, extra={key: value for key, value in data.items() if key not in known})

    def replace(self, **changes) -> "Manifest":
        return dataclasses.replace(self, **changes)


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


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of a compressed folder, checked (a known format version, the keys every reader uses and
    their types) and typed.

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
    return Manifest.from_dict(manifest)


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


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """``lora_compress.json`` as indented JSON, stamped with this format version."""
    manifest = {**manifest.to_dict(), "format_version": FORMAT_VERSION}
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


def read_recipe(path: str | Path) -> Manifest:
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
