"""The time split of a calibrated run: seconds per stage, recorded in the report and the manifest."""
from __future__ import annotations

import itertools
import json
import time

from helpers import small_calibration
from lora_compress import CompressConfig, compress
from lora_compress.storage.compressed import MANIFEST

BUDGET = CompressConfig(budget=0.8)


def test_the_report_splits_the_time_by_stage(tiny_models, text_file, tmp_path, monkeypatch):
    """On a clock that moves one second per reading, every stage that ran shows time, less than the run's
    (a tiny run's stages round to 0.0 s on the real clock), and the parts add up to no more than the whole."""
    ticks = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(ticks)))
    report = compress(str(tiny_models["llama"]), tmp_path / "out", BUDGET, small_calibration(text_file),
                      progress=False)
    stages, total = report.calibration["seconds_by_stage"], report.calibration["seconds"]
    assert {"forward", "backward", "statistics", "costs", "factoring"} <= set(stages)
    assert all(0 < seconds < total for seconds in stages.values()), (stages, total)
    assert sum(stages.values()) <= total
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["calibration"]["seconds_by_stage"] == stages and manifest["calibration"]["seconds"] == total


def test_on_the_real_clock_the_stages_add_up_to_no_more_than_the_run(tiny_models, text_file, tmp_path):
    report = compress(str(tiny_models["llama"]), tmp_path / "out", BUDGET, small_calibration(text_file),
                      progress=False)
    stages, total = report.calibration["seconds_by_stage"], report.calibration["seconds"]
    assert sum(stages.values()) <= total + 0.05 * len(stages)  # each rounded to 0.1 s
