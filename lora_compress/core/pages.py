"""Giving memory back to the system: the C heap's freed pages, and the checkpoint pages of a dropped weight.

The in-memory path keeps the weights transformers loaded, which are views of the checkpoint files
mapped into memory (private, copy-on-write). Once a layer's factors replace its dense weight, the
pages of that weight stay resident (and counted in the process's RSS) for as long as the file
stays mapped, which is until every tensor of the file is gone: on a Qwen2-1.5B-shaped bf16
checkpoint the run peaked at the checkpoint plus all its factors (5.1 GiB for 2.9 GiB).
"""
from __future__ import annotations

import contextvars
import ctypes
import ctypes.util
import mmap
import sys
from contextlib import contextmanager
from functools import lru_cache

import torch

MADV_DONTNEED = 4  # Linux: drop the pages; a later read faults them in again from the file
CHECKPOINT_SUFFIX = ".safetensors"
_RELEASING = contextvars.ContextVar("releasing_checkpoint_pages", default=False)


@contextmanager
def releasing_checkpoint_pages():
    """Inside, :func:`release_checkpoint_pages` gives pages back; outside it does nothing.

    Only code that loaded the model from its files itself and has not written to its weights
    enters it (jobs/compress.py): a weight changed in place since loading would read back as the
    file's bytes once its pages are dropped, and a Python caller's model may have been changed so.
    """
    token = _RELEASING.set(True)
    try:
        yield
    finally:
        _RELEASING.reset(token)


@lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


def return_freed_memory() -> None:
    """Give the C heap's freed pages back to the system (glibc's malloc_trim; nothing elsewhere).

    A block's statistics and factoring free hundreds of MB of mid-sized tensors that the allocator
    keeps in its arenas, one per worker thread: on SmolLM2 the process grew 0.3 GiB over the run
    without this call after each block.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def release_checkpoint_pages(tensor: torch.Tensor) -> int:
    """Drop the resident pages of ``tensor`` when its memory is a mapping of a checkpoint file
    (a ``.safetensors`` file mapped by the loader) inside :func:`releasing_checkpoint_pages`;
    return the bytes given back (0 elsewhere: outside it, another OS, a GPU tensor, a tensor in
    ordinary memory).

    Only the pages lying wholly inside the tensor are dropped. They are clean copies of the file
    unless something wrote to them, and the caller drops the tensor (its layer was replaced): a
    read after all would fault the file's bytes in again, never zeros.
    """
    libc = _libc()
    if not _RELEASING.get() or not sys.platform.startswith("linux") or libc is None or tensor.device.type != "cpu" \
            or tensor.numel() == 0:
        return 0
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not _in_checkpoint_mapping(start, end):
        return 0
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return 0
    if libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) != 0:
        return 0
    return last - first


def _in_checkpoint_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies inside one mapping of a checkpoint file (/proc/self/maps)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or not fields[5].rstrip().endswith(CHECKPOINT_SUFFIX):
                    continue
                low, high = (int(value, 16) for value in fields[0].split("-"))
                if low <= start and end <= high:
                    return True
    except OSError:
        return False
    return False
