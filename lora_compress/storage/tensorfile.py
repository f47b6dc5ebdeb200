"""Write a .safetensors file one tensor at a time, holding no more than that tensor in memory.

safetensors' own ``save_file`` takes the whole dict at once. Its file layout is documented and
simple: an 8-byte little-endian header length N, N bytes of JSON header (may end in spaces),
then the raw data, each tensor at ``data_offsets`` relative to the data's start. Here a fixed
``header_bytes`` region is reserved at the start, data is appended as tensors arrive, and the
header is written into the reserved region (padded with spaces) on ``close``. When the next
entry would not fit the region, ``fits`` says so and the caller starts another file.

    [N=header_bytes][{"__metadata__":…,"a":{…},"b":{…}}␣␣␣␣␣␣␣␣][a's bytes][b's bytes]…
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
HEADER_BYTES = 256 << 10  # reserved header region: room for ~1,500 tensor entries


class TensorFileWriter:
    """Appends tensors to ``path``; the header goes into the reserved region on :meth:`close`."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None, header_bytes: int = HEADER_BYTES):
        self.path, self.header_bytes = Path(path), header_bytes - header_bytes % 8
        self.header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self.offset = 0  # bytes of data written
        self.header_length = len(self._header_json())  # bytes of the header JSON so far
        self.file = open(self.path, "wb")
        self.file.seek(8 + self.header_bytes)

    def fits(self, key: str, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s header entry still fits the reserved region."""
        return self.header_length + self._entry_length(key, tensor) <= self.header_bytes

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Write ``tensor``'s bytes now and remember its header entry.

        Raises:
            ValueError: the entry does not fit the header region (check :meth:`fits` first).
        """
        if not self.fits(key, tensor):
            raise ValueError(f"{self.path.name}: the header region is full; start another file")
        self.header_length += self._entry_length(key, tensor)
        self.header[key] = self._entry(tensor)
        self.file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.offset = self.header[key]["data_offsets"][1]

    def close(self) -> None:
        """Write the header (padded with spaces) into the reserved region and close the file."""
        blob = self._header_json()
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.header_bytes) + blob + b" " * (self.header_bytes - len(blob)))
        self.file.close()

    def abort(self) -> None:
        """Close without a header (the caller removes the file)."""
        self.file.close()

    def _entry(self, tensor: torch.Tensor) -> dict:
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"cannot write a {tensor.dtype} tensor to safetensors here")
        size = tensor.numel() * tensor.element_size()
        return {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                "data_offsets": [self.offset, self.offset + size]}

    def _entry_length(self, key: str, tensor: torch.Tensor) -> int:
        """Bytes the entry adds to the header JSON: ``,"key":{…}`` (one byte over for the first)."""
        return len(self._header_json({key: self._entry(tensor)})) - 2 + 1

    def _header_json(self, header: dict | None = None) -> bytes:
        return json.dumps(self.header if header is None else header, separators=(",", ":")).encode()
