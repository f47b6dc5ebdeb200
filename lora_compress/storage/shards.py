"""Compressed folders written a tensor at a time: shards of at most MAX_SHARD_BYTES and their index.

    tensors ──add──▶ model-00001.safetensors … ──close──▶ model.safetensors (one shard)
                                                          or model-0000k-of-0000N.safetensors + index
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import COMPRESSED_INDEX, COMPRESSED_WEIGHTS, INDEX, WEIGHTS, tensor_names
from .manifest import ADAPTERS, METADATA
from .tensorfile import HEADER_BYTES, TensorFileWriter

MAX_SHARD_BYTES = 2 << 30  # output shard size (written a tensor at a time, never buffered)


class ShardWriter:
    """Writes each tensor to the current shard file as it arrives (nothing buffered); starts a new
    shard past ``max_bytes``; names the shards and writes the index at close."""

    def __init__(self, folder: Path, max_bytes: int | None = None, metadata: dict[str, str] = METADATA):
        self.folder, self.max_bytes, self.metadata = Path(folder), max_bytes or MAX_SHARD_BYTES, metadata
        self.current: TensorFileWriter | None = None
        self.shards: list[list[str]] = []  # tensor names per shard
        self.written = self.total = 0  # bytes in the current shard / in all

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and (self.written + size > self.max_bytes or not self.current.fits(key, tensor)):
            self._finish()
        if self.current is None:
            self.current = TensorFileWriter(self.folder / f"model-{len(self.shards) + 1:05d}.safetensors", self.metadata)
            self.shards.append([])
        self.current.add(key, tensor)
        self.shards[-1].append(key)
        self.written += size
        self.total += size

    def _finish(self) -> None:
        self.current.close()
        self.current, self.written = None, 0

    def close(self) -> None:
        """Finish the last shard; name them ``model.lora_compressed.safetensors`` or ``-0000k-of-0000N`` + index."""
        if self.current is None:  # no tensor at all: an empty weights file
            self.current = TensorFileWriter(self.folder / "model-00001.safetensors", self.metadata)
            self.shards.append([])
        self._finish()
        if len(self.shards) == 1:
            (self.folder / "model-00001.safetensors").rename(self.folder / COMPRESSED_WEIGHTS)
            return
        weight_map = {}
        for number, keys in enumerate(self.shards, 1):
            name = f"model-{number:05d}-of-{len(self.shards):05d}.safetensors"
            (self.folder / f"model-{number:05d}.safetensors").rename(self.folder / name)
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / COMPRESSED_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def output_files(folder: Path) -> dict[str, Path]:
    """Tensor name → file, for a compressed folder with one weights file or shards and an index (any format)."""
    for index in (COMPRESSED_INDEX, INDEX):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return {key: folder / name for key, name in weight_map.items()}
    weights = folder / (COMPRESSED_WEIGHTS if (folder / COMPRESSED_WEIGHTS).is_file() else WEIGHTS)
    return {key: weights for key in tensor_names(weights)}


def write_adapters(folder: Path) -> None:
    """``adapters.safetensors`` from the written shards, one tensor in memory at a time."""
    files = {key: path for key, path in output_files(folder).items() if key.endswith((".lora_A", ".lora_B"))}
    writer = TensorFileWriter(folder / ADAPTERS, METADATA, header_bytes=_header_room(len(files)))
    for key in sorted(files):
        with safe_open(files[key], "pt") as handle:
            writer.add(key, handle.get_tensor(key))
    writer.close()


def _header_room(count: int) -> int:
    """Header bytes for ``count`` tensors (named by a model's module paths: ~200 bytes each)."""
    return max(HEADER_BYTES, 512 * count)


