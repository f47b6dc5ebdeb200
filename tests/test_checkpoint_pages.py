"""Checkpoint pages given back: a weight dropped for its factors returns its memory-mapped pages (read again
from the file if touched), once no tied layer still reads them."""
from __future__ import annotations

import sys

import psutil
import pytest
import torch


def _mapped_checkpoint_tensor(folder, name: str = "weights.safetensors"):
    """A 4 MiB float32 tensor whose memory is a private mapping of a .safetensors file, as the loader maps it."""
    import mmap

    from safetensors.torch import save_file

    path = folder / name
    original = torch.arange(1 << 20, dtype=torch.float32)
    save_file({"w": original}, path)
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    header = 8 + int.from_bytes(mapped[:8], "little")
    tensor = torch.frombuffer(mapped, dtype=torch.float32, offset=header, count=original.numel())
    return path, mapped, tensor, original


def _resident(path) -> int:
    return sum(m.rss for m in psutil.Process().memory_maps(grouped=True) if m.path == str(path))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on file mappings: Linux")
def test_a_dropped_weight_gives_its_checkpoint_pages_back_and_reads_the_file_again(tmp_path):
    from lora_compress.core.pages import release_checkpoint_pages, releasing_checkpoint_pages

    path, mapped, tensor, original = _mapped_checkpoint_tensor(tmp_path)
    float(tensor.sum())  # fault every page in
    before = _resident(path)
    assert release_checkpoint_pages(tensor) == 0  # a Python caller's model: its weights may have been written to
    with releasing_checkpoint_pages():
        released = release_checkpoint_pages(tensor)
    assert released >= (4 << 20) - 2 * mmap_page() and _resident(path) <= before - released + mmap_page()
    assert torch.equal(tensor, original)  # a read after all faults the file's bytes in again
    with releasing_checkpoint_pages():
        assert release_checkpoint_pages(original.clone()) == 0  # ordinary memory is left alone
    del tensor
    mapped.close()


def mmap_page() -> int:
    import mmap

    return mmap.PAGESIZE


def test_a_replaced_weight_gives_its_pages_back_only_once_no_tied_layer_reads_them(monkeypatch):
    import lora_compress.core.patch as patch
    from lora_compress.core.svd import Factors

    released = []
    monkeypatch.setattr(patch, "release_checkpoint_pages", lambda tensor: released.append(tensor) or 0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False),
                                torch.nn.Linear(8, 8, bias=False))
    model[1].weight = model[0].weight  # tied
    shared, own = model[0].weight, model[2].weight
    factors = Factors(torch.ones(8, 2), torch.ones(2, 8), torch.ones(8), 1.0)
    patch.factor_module_(model, "0", factors)
    assert released == []  # layer 1 still reads the tied weight
    patch.factor_module_(model, "1", factors)
    patch.factor_module_(model, "2", factors)
    assert [t is shared for t in released] == [True, False] and released[1] is own
