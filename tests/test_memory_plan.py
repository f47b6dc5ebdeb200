"""Memory known before compute: a run that fits nowhere is refused in one line, one that fits only streamed
streams (and says so), and memory sizes parse."""
from __future__ import annotations

import pytest
import torch

from helpers import run, saved_tensors, small_calibration
from lora_compress import CompressConfig, LoraCompressError, LoraCompressWarning, compress
from lora_compress.jobs.memory import parse_size

BUDGET = CompressConfig(budget=0.8)


def test_too_little_memory_for_any_path_is_one_line_before_compute(tiny_models, text_file, tmp_path):
    result = run("compress", str(tiny_models["llama"]), "--budget", "0.8", "--calib",
                 str(text_file), "--calib-samples", "6", "--calib-len", "16", "--memory-limit",
                 "10M", "--out", str(tmp_path / "out"), "--quiet")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: compressing needs about ")
    assert "--memory-limit 0.0 GiB" in lines[0] and "fewer --calib-samples" in lines[0]
    assert "--stream" not in lines[0], "streaming was tried: its estimate does not fit either"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_when_only_streaming_fits_it_streams_and_says_so(tiny_models, text_file, tmp_path, monkeypatch):
    from lora_compress.jobs import memory

    found = memory.MemoryEstimate(in_memory=10 << 30, streamed=1 << 30, parts={"checkpoint": 1})
    monkeypatch.setattr(memory, "estimate", lambda *args: found)
    with pytest.warns(LoraCompressWarning, match="streaming block by block instead"):
        compress(str(tiny_models["llama"]), tmp_path / "auto", BUDGET, small_calibration(text_file, memory_limit="4G"), progress=False)
    compress(str(tiny_models["llama"]), tmp_path / "stream", BUDGET, small_calibration(text_file, stream=True), progress=False)
    auto, streamed = saved_tensors(tmp_path / "auto"), saved_tensors(tmp_path / "stream")
    assert auto.keys() == streamed.keys() and all(torch.equal(auto[k], streamed[k]) for k in auto)


def test_memory_sizes_parse_and_a_bad_one_is_refused():
    assert parse_size("20G") == 20 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1.5g") == 3 << 29
    with pytest.raises(LoraCompressError, match="^memory_limit 'lots' is not a size; pass e.g. 20G"):
        parse_size("lots")
