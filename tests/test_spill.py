"""What pass 1 parks for pass 2: in memory or spilled to disk, the same tensors and the same factors."""
from __future__ import annotations

import torch

from helpers import saved_tensors, small_calibration
from lora_compress import CompressConfig, compress
from lora_compress.calibrate.spill import Spill

BUDGET = CompressConfig(budget=0.8)


def test_spill_round_trips_on_disk_and_in_memory(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    for to_disk in (False, True):
        store = Spill(to_disk, tmp_path)
        store.put("x", tensors)
        if to_disk:
            assert len(list(store.folder.iterdir())) == 1
        back = store.take("x")
        assert all(torch.equal(back[k], tensors[k]) for k in tensors)
        store.close()
    assert not list(tmp_path.iterdir())  # the folder goes with it


def test_spilling_to_disk_gives_the_factors_kept_in_memory(tiny_models, text_file, tmp_path, monkeypatch):
    parked = []  # (on disk?, key) of each put
    put = Spill.put
    monkeypatch.setattr(Spill, "put", lambda self, key, tensors: parked.append((self.to_disk, key)) or
                        put(self, key, tensors))
    compress(str(tiny_models["llama"]), tmp_path / "kept", BUDGET, small_calibration(text_file), progress=False)
    in_memory, parked[:] = list(parked), []
    monkeypatch.setattr("lora_compress.pipelines.calibrated.SPILL_BYTES", 0)  # the name the pipeline reads
    compress(str(tiny_models["llama"]), tmp_path / "spilled", BUDGET, small_calibration(text_file), progress=False)
    assert in_memory and {disk for disk, _ in in_memory} == {False}, "the tiny run keeps its tensors in memory"
    assert [key for _, key in parked] == [key for _, key in in_memory] and {disk for disk, _ in parked} == {True}
    kept, spilled = saved_tensors(tmp_path / "kept"), saved_tensors(tmp_path / "spilled")
    assert kept.keys() == spilled.keys() and all(torch.equal(kept[k], spilled[k]) for k in kept)
