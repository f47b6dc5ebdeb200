"""Plain-SVD compression one tensor at a time: peak memory ≈ one weight + one 256 MiB output shard.

    shards ──safe_open (one tensor)──▶ factor_weight ──▶ ShardWriter ──▶ OUT/model-0000k-of-0000N.safetensors
                                                                           model.safetensors.index.json

The architecture is built from config.json with its parameters on the meta device (no memory
used; buffers, small and partly computed at construction, are real) to learn the targeted
modules, the tied tensors and the dtype transformers would load. Untouched tensors
are copied through, cast to that dtype; factors are computed by the same code as the
in-memory path, so the output holds the same tensors bit for bit and the same manifest
(one output file below ``max_shard_bytes``, else shards and an index). Each input file is
re-checked (size, mtime) before every read, so a checkpoint changed mid-run is an error.
Under torchrun the layers are split across processes (see distributed.py).
"""
from __future__ import annotations

import json
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import (ADAPTERS, FORMAT_VERSION, INDEX, WEIGHTS, Source, check_weight_files,
                         model_class, weight_files)
from .compress import (CompressConfig, CompressionReport, _check_fixed_rank, factor_weight, factoring_workers,
                       new_layer_result)
from .distributed import Group, check_split
from .errors import LoraCompressError
from .layers import is_conv1d
from .targets import find_targets
from .tensorfile import DTYPE_NAMES, HEADER_BYTES, TensorFileWriter
from .workers import ordered_map

MAX_SHARD_BYTES = 2 << 30  # output shard size (written a tensor at a time, never buffered)
_METADATA = {"format": "pt", "lora_compress_format": str(FORMAT_VERSION)}


@dataclass
class Plan:
    """What streaming needs to know before reading any weight."""

    model: nn.Module  # the architecture, parameters on the meta device, in the output dtype
    dtype: torch.dtype
    files: dict[str, Path]  # checkpoint tensor name → file holding it
    stamps: dict[Path, tuple[int, int]]  # file → (size, mtime_ns) when the run started
    targets: dict[str, nn.Module]
    keys: dict[str, str]  # output name → checkpoint name: untouched tensors and target weights, model order


def plan(source: Source, config: CompressConfig, dtype: torch.dtype | None = None) -> Plan:
    """Read config.json and the shard headers; build the model skeleton; map output names to files.

    Raises:
        LoraCompressError: a GGUF source, a bad checkpoint, or a model tensor the checkpoint lacks.
    """
    from transformers import AutoConfig

    if source.gguf_file:
        raise LoraCompressError("streaming reads safetensors checkpoints only; drop --stream for a GGUF file")
    paths = weight_files(source.folder)
    check_weight_files(paths)
    stamps = {path: _stamp(path) for path in paths}
    files = {key: path for path in paths for key in _keys(path)}
    hf_config = AutoConfig.from_pretrained(source.folder)
    dtype = dtype or _checkpoint_dtype(hf_config, files)
    with parameters_on_meta():
        cls = model_class(hf_config)
        build = getattr(cls, "_from_config", None) or cls.from_config  # Auto* classes have only from_config
        model = build(hf_config, dtype=dtype).eval()
    targets = find_targets(model, config.include, config.exclude)
    _check_fixed_rank(targets, config.rank)
    return Plan(model, dtype, files, stamps, targets, _output_keys(model, files))


@contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device and keep real buffers.

    As accelerate's ``init_empty_weights(include_buffers=False)``: each parameter is moved to
    meta as it is registered (``torch.empty`` allocates no pages, so nothing is touched), and
    non-persistent buffers such as rotary frequencies, which no checkpoint holds, are computed.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:  # a meta parameter is kept as is: ties are by identity
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _keys(path: Path) -> list[str]:
    with safe_open(path, "pt") as handle:
        return list(handle.keys())


def _stamp(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def _checkpoint_dtype(hf_config, files: dict[str, Path]) -> torch.dtype:
    """The dtype from_pretrained(dtype="auto") picks: config.dtype, else the first float tensor's."""
    dtype = getattr(hf_config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    for key, path in files.items():
        with safe_open(path, "pt") as handle:
            tensor = handle.get_slice(key)
            if tensor.get_dtype() in ("F32", "F16", "BF16", "F64"):
                return {v: k for k, v in DTYPE_NAMES.items()}[tensor.get_dtype()]
    return torch.float32


def _output_keys(model: nn.Module, files: dict[str, Path]) -> dict[str, str]:
    """Output name → checkpoint name, in model order, one name per tied group.

    Of a tied group the output keeps the name safetensors' ``save_model`` keeps (the first in
    sorted order), as the in-memory path does, and reads whichever alias the checkpoint holds.

    Raises:
        LoraCompressError: a model tensor is in no checkpoint file (e.g. renamed keys).
    """
    aliases: dict[int, list[str]] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        aliases.setdefault(id(tensor), []).append(name)
    order = {name: i for i, name in enumerate(model.state_dict())}
    keys = {}
    for names in aliases.values():
        names = sorted(n for n in names if n in order)
        stored = [n for n in names if n in files]
        if names and not stored:
            raise LoraCompressError(f"{names[0]} is not in the checkpoint under that name (transformers would "
                                    f"rename or create it); compress this model without --stream")
        if names:
            keys[names[0]] = stored[0]
    return dict(sorted(keys.items(), key=lambda item: order[item[0]]))


def read_tensor(plan_: Plan, key: str) -> torch.Tensor:
    """One tensor from its shard, opened only for this read (the mapping is dropped after it).

    Raises:
        LoraCompressError: the shard changed on disk since the run started, or cannot be read.
    """
    path = plan_.files[key]
    if _stamp(path) != plan_.stamps[path]:
        raise LoraCompressError(f"{path.name} changed on disk while compressing (size or mtime differ); "
                                f"rerun once the checkpoint is no longer being written")
    try:
        with safe_open(path, "pt") as handle:
            return handle.get_tensor(key)
    except SafetensorError as error:
        raise LoraCompressError(f"{path.name} could not be read ({error}); copy the checkpoint again") from None


def factored_layers(plan_: Plan, config: CompressConfig, group: Group = Group(), progress: bool = True):
    """Yield ``(LayerResult, Factors | None)`` for every target, in model order, on every process.

    Process p computes targets p, p+K, …; each round's results are shared with all processes.
    """
    names = list(plan_.targets)
    check_split(group, len(names))
    bar = tqdm(total=len(names), desc="factoring", unit="layer", disable=not (progress and group.is_writer))
    for outcome in _outcomes(plan_, config, group, names):
        if isinstance(outcome, str):
            raise LoraCompressError(outcome)
        bar.update()
        yield outcome
    bar.close()


def _outcomes(plan_: Plan, config: CompressConfig, group: Group, names: list[str]):
    """Each target's :func:`_factor_one` outcome, in order: one process factors several layers at
    once on its threads (workers.py); K processes factor one layer each per round."""
    if group.world == 1:
        workers = factoring_workers(config, plan_.targets)
        yield from ordered_map(lambda name: _factor_one(plan_, config, name), names, workers)
        return
    for start in range(0, len(names), group.world):
        index = start + group.rank
        mine = _factor_one(plan_, config, names[index]) if index < len(names) else None
        yield from group.share(mine)[:len(names) - start]


def _factor_one(plan_: Plan, config: CompressConfig, name: str):
    """(result, CPU factors) for one layer, or the error message to share with the other processes."""
    module = plan_.model.get_submodule(name)
    result = new_layer_result(name, module)
    try:
        weight = read_tensor(plan_, f"{name}.weight").to(plan_.dtype)
        factors = factor_weight(result, weight.T if is_conv1d(module) else weight, config)
    except LoraCompressError as error:
        return str(error)
    if factors is not None:
        factors = type(factors)(factors.B.cpu(), factors.A.cpu(), factors.singular_values.cpu(),
                                factors.energy_kept)
    return result, factors


def compress_streaming(plan_: Plan, config: CompressConfig, folder: Path | None, group: Group = Group(),
                       progress: bool = True, max_shard_bytes: int | None = None) -> CompressionReport:
    """Factor every target and write weights + adapters into ``folder`` (rank 0; others pass None).

    Returns:
        The CompressionReport, identical on every process.
    """
    report = CompressionReport(config)
    writer = ShardWriter(folder, max_shard_bytes or MAX_SHARD_BYTES) if folder is not None else None
    with closing(factored_layers(plan_, config, group, progress)) as layers:  # closing gives the threads back
        for key, stored in plan_.keys.items():
            module_name, factors = key.rpartition(".")[0], None
            if module_name in plan_.targets and key.endswith(".weight"):
                result, factors = next(layers)
                report.layers.append(result)
            if writer is None:
                continue
            if factors is not None:
                writer.add(f"{module_name}.lora_A", factors.A.contiguous())
                writer.add(f"{module_name}.lora_B", factors.B.contiguous())
            else:
                writer.add(key, read_tensor(plan_, stored).to(plan_.dtype))
    if writer is not None:
        writer.close()
        write_adapters(folder)
    return report


class ShardWriter:
    """Writes each tensor to the current shard file as it arrives (nothing buffered); starts a new
    shard past ``max_bytes``; names the shards and writes the index at close."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.current: TensorFileWriter | None = None
        self.shards: list[list[str]] = []  # tensor names per shard
        self.written = self.total = 0  # bytes in the current shard / in all

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and (self.written + size > self.max_bytes or not self.current.fits(key, tensor)):
            self._finish()
        if self.current is None:
            self.current = TensorFileWriter(self.folder / f"model-{len(self.shards) + 1:05d}.safetensors", _METADATA)
            self.shards.append([])
        self.current.add(key, tensor)
        self.shards[-1].append(key)
        self.written += size
        self.total += size

    def _finish(self) -> None:
        self.current.close()
        self.current, self.written = None, 0

    def close(self) -> None:
        """Finish the last shard; name them ``model.safetensors`` or ``-0000k-of-0000N`` + index."""
        if self.current is None:  # no tensor at all: an empty weights file
            self.current = TensorFileWriter(self.folder / "model-00001.safetensors", _METADATA)
            self.shards.append([])
        self._finish()
        if len(self.shards) == 1:
            (self.folder / "model-00001.safetensors").rename(self.folder / WEIGHTS)
            return
        weight_map = {}
        for number, keys in enumerate(self.shards, 1):
            name = f"model-{number:05d}-of-{len(self.shards):05d}.safetensors"
            (self.folder / f"model-{number:05d}.safetensors").rename(self.folder / name)
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def output_files(folder: Path) -> dict[str, Path]:
    """Tensor name → file, for a compressed folder with one weights file or shards and an index."""
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    return {key: folder / WEIGHTS for key in _keys(folder / WEIGHTS)}


def write_adapters(folder: Path) -> None:
    """``adapters.safetensors`` from the written shards, one tensor in memory at a time."""
    files = {key: path for key, path in output_files(folder).items() if key.endswith((".lora_A", ".lora_B"))}
    writer = TensorFileWriter(folder / ADAPTERS, _METADATA, header_bytes=_header_room(len(files)))
    for key in sorted(files):
        with safe_open(files[key], "pt") as handle:
            writer.add(key, handle.get_tensor(key))
    writer.close()


def _header_room(count: int) -> int:
    """Header bytes for ``count`` tensors (named by a model's module paths: ~200 bytes each)."""
    return max(HEADER_BYTES, 512 * count)
