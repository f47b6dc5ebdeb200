"""Tensors parked between passes: in memory, or spilled to disk (safetensors) and read back once.

What must survive from one pass to the next (hidden states at every block boundary, each block's
gradient covariances) is put under a key and taken back exactly once, one block's worth at a time;
on disk the file is deleted as it is read. A spill folder lives inside the run's temporary output
folder (or a temporary folder of its own) and goes with it.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SPILL_BYTES = 64 << 20  # what a pass keeps for a later one: above this it goes to disk (read back once a block)


class Spill:
    """``put(key, tensors)`` / ``take(key)``; on disk when ``to_disk``, in memory otherwise."""

    def __init__(self, to_disk: bool, folder: Path | None = None):
        self.to_disk = to_disk
        self.folder = None
        if to_disk:
            self.folder = Path(tempfile.mkdtemp(prefix="spill-", dir=folder)) if folder else \
                Path(tempfile.mkdtemp(prefix="lora-compress-spill-"))
        self.kept: dict[str, dict[str, torch.Tensor]] = {}
        self.devices: dict[str, torch.device] = {}

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if not self.to_disk:
            self.kept[key] = tensors
            return
        self.devices[key] = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(self._path(key)))

    def take(self, key: str) -> dict[str, torch.Tensor]:
        if not self.to_disk:
            return self.kept.pop(key)
        path = self._path(key)
        tensors = load_file(str(path), device=str(self.devices.pop(key)))
        path.unlink()
        return tensors

    def put_list(self, key: str, tensors: list[torch.Tensor]) -> None:
        self.put(key, {str(i): t for i, t in enumerate(tensors)})

    def take_list(self, key: str) -> list[torch.Tensor]:
        found = self.take(key)
        return [found[str(i)] for i in range(len(found))]

    def close(self) -> None:
        """Forget what is left and remove the folder."""
        self.kept.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"
