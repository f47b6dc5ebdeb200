"""A checkpoint opened lazily: the model skeleton on the meta device, and where each tensor lies.

The architecture is built from config.json with its parameters on the meta device (no memory
used; buffers, small and partly computed at construction, are real) to learn the targeted
modules, the tied tensors and the dtype transformers would load. Tensors are then read one at a
time from their shard (:func:`read_tensor`); each input file is re-checked (size, mtime) before
every read, so a checkpoint changed mid-run is an error.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..core.experts import expert_sources
from ..core.targets import expose_experts_, find_targets
from ..errors import LoraCompressError
from ..methods.config import CompressConfig
from ..methods.ranks import check_fixed_rank
from ..storage.checkpoint import Source, check_weight_files, model_class, tensor_names, weight_files
from ..storage.tensorfile import DTYPE_NAMES
from .conversions import Assembled, CheckpointLayout, checkpoint_layout


@dataclass
class LazyCheckpoint:
    """A checkpoint whose tensors are read on demand: what streaming knows before reading any weight."""

    model: nn.Module  # the architecture, parameters on the meta device, in the output dtype
    dtype: torch.dtype
    files: dict[str, Path]  # checkpoint tensor name → file holding it
    stamps: dict[Path, tuple[int, int]]  # file → (size, mtime_ns) when the run started
    targets: dict[str, nn.Module]
    keys: dict[str, str]  # output name → checkpoint name: untouched tensors and target weights, model order
    assembled: dict[str, Assembled] = field(default_factory=dict)  # output name → the checkpoint tensors it joins


def open_lazily(source: Source, config: CompressConfig, dtype: torch.dtype | None = None) -> LazyCheckpoint:
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
    files = {key: path for path in paths for key in tensor_names(path)}
    hf_config = AutoConfig.from_pretrained(source.folder)
    dtype = dtype or _checkpoint_dtype(hf_config, files)
    with parameters_on_meta():
        cls = model_class(hf_config)
        build = getattr(cls, "_from_config", None) or cls.from_config  # Auto* classes have only from_config
        model = build(hf_config, dtype=dtype).eval()
    layout = checkpoint_layout(model, files)
    keys = _output_keys(model, layout)
    split = expose_experts_(model, config.include, config.exclude)  # each expert's matrices become targets
    keys, assembled = _expert_keys(model, keys, layout, split)
    targets = find_targets(model, config.include, config.exclude)
    check_fixed_rank(targets, config.rank)
    return LazyCheckpoint(model, dtype, files, stamps, targets, keys, assembled)


def _expert_keys(model: nn.Module, keys: dict[str, str], layout: CheckpointLayout, split: list[str]):
    """Output keys with each split experts module's fused tensors replaced by one key per expert, in
    model order, and what every assembled output tensor is made of: ``(keys, assembled)``."""
    assembled = {key: layout.assembled[stored] for key, stored in keys.items() if stored in layout.assembled}
    for name in split:
        for key, (fused, index, transposed) in expert_sources(name, model.get_submodule(name)).items():
            stored = keys[fused]
            if stored in layout.assembled:  # the Hub's layout: the expert's own tensors
                assembled[key] = layout.assembled[stored].expert(index, transposed)
            else:  # fused in the checkpoint too: its slice
                assembled[key] = Assembled((((stored, index),),), False, transposed)
            keys[key] = key
    return {k: keys[k] for k in model.state_dict() if k in keys}, assembled


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


def _output_keys(model: nn.Module, layout: CheckpointLayout) -> dict[str, str]:
    """Output name → checkpoint name (or, for a tensor transformers assembles from several, its own
    name: see ``LazyCheckpoint.assembled``), in model order, one name per tied group.

    Of a tied group the output keeps the name safetensors' ``save_model`` keeps (the first in
    sorted order), as the in-memory path does, and reads whichever alias the checkpoint holds.

    Raises:
        LoraCompressError: a model tensor is in no checkpoint file, or made of tensors streaming cannot join.
    """
    stored_as = {**layout.renamed, **{key: key for key in layout.assembled}}
    aliases: dict[int, list[str]] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        aliases.setdefault(id(tensor), []).append(name)
    order = {name: i for i, name in enumerate(model.state_dict())}
    keys = {}
    for names in aliases.values():
        names = sorted(n for n in names if n in order)
        stored = [n for n in names if n in stored_as]
        if names and not stored and names[0] in layout.refused:
            raise LoraCompressError(f"{names[0]} is not in the checkpoint under that name "
                                    f"({layout.refused[names[0]]}); compress this model without --stream")
        if names and not stored:
            raise LoraCompressError(f"{names[0]} is not in the checkpoint (transformers would fill it with random "
                                    f"weights); the checkpoint is incomplete or renamed: copy it again from its source")
        if names:
            keys[names[0]] = stored_as[stored[0]]
    return dict(sorted(keys.items(), key=lambda item: order[item[0]]))


def read_tensor(checkpoint: LazyCheckpoint, key: str) -> torch.Tensor:
    """One tensor from its shard, opened only for this read (the mapping is dropped after it); a
    tensor of ``checkpoint.assembled`` (an expert's matrix, fused experts) joined from its pieces.

    Raises:
        LoraCompressError: the shard changed on disk since the run started, or cannot be read.
    """
    assembled = checkpoint.assembled.get(key)
    if assembled is None:
        return _read_piece(checkpoint, key, None)
    matrices = [torch.cat([_read_piece(checkpoint, name, index) for name, index in expert])  # rows joined
                for expert in assembled.parts]
    matrices = [m.T.contiguous() if assembled.transposed else m for m in matrices]
    return torch.stack(matrices) if assembled.stacked else matrices[0]  # (E, out, in) or (out, in)


def _read_piece(checkpoint: LazyCheckpoint, key: str, index: int | None) -> torch.Tensor:
    """Checkpoint tensor ``key``, or its slice ``index`` along the first dimension."""
    path = checkpoint.files[key]
    if _stamp(path) != checkpoint.stamps[path]:
        raise LoraCompressError(f"{path.name} changed on disk while compressing (size or mtime differ); "
                                f"rerun once the checkpoint is no longer being written")
    try:
        with safe_open(path, "pt") as handle:
            return handle.get_tensor(key) if index is None else handle.get_slice(key)[index]
    except SafetensorError as error:
        raise LoraCompressError(f"{path.name} could not be read ({error}); copy the checkpoint again") from None
