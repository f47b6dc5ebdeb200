"""A run repeats from its folder: the typed manifest round-trips, and ``compress --recipe OUT`` (or the same
in Python) gives the same factors, with the options given on the command line overriding the recipe's."""
import json

import torch
from click.testing import CliRunner

from lora_compress.cli import main
from lora_compress.jobs.compress import compress, configs_from
from lora_compress.methods.config import CompressConfig, RunConfig
from lora_compress.storage.manifest import MANIFEST, LayerEntry, Manifest, read_manifest, read_recipe

from helpers import saved_tensors


def _compress(args):
    result = CliRunner().invoke(main, ["compress", *args, "--quiet"])
    assert result.exit_code == 0, result.output
    return result


def test_the_manifest_round_trips_through_its_dict_and_keeps_unknown_keys(tiny_models, text_file, tmp_path):
    out = tmp_path / "out"
    compress(str(tiny_models["llama"]), out, CompressConfig(budget=0.7, seed=3),
             RunConfig(calib=str(text_file), calib_samples=4, calib_len=16), progress=False)
    manifest = read_manifest(out)
    assert isinstance(next(iter(manifest.layers.values())), LayerEntry)
    assert manifest.settings["budget"] == 0.7 and manifest.settings["seed"] == 3
    assert manifest.run["calib_samples"] == 4 and manifest.run["calib"] == str(text_file.resolve())
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    on_disk = json.loads((out / MANIFEST).read_text())
    assert manifest.to_dict() == on_disk
    newer = Manifest.from_dict({**on_disk, "future_field": [1, 2]})
    assert newer.extra == {"future_field": [1, 2]} and newer.to_dict()["future_field"] == [1, 2]


def test_compress_recipe_repeats_a_calibrated_run_with_the_same_factors(tiny_models, text_file, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    _compress([str(tiny_models["llama"]), "--budget", "0.7", "--calib", str(text_file), "--calib-samples", "4",
               "--calib-len", "16", "--seed", "5", "--out", str(first)])
    _compress([str(tiny_models["llama"]), "--recipe", str(first / MANIFEST), "--out", str(again)])
    assert read_manifest(again).settings == read_manifest(first).settings
    assert read_manifest(again).run == read_manifest(first).run
    before, after = saved_tensors(first), saved_tensors(again)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_options_given_override_the_recipe(tiny_models, text_file, tmp_path):
    first = tmp_path / "first"
    _compress([str(tiny_models["llama"]), "--budget", "0.7", "--calib", str(text_file), "--calib-samples", "4",
               "--calib-len", "16", "--out", str(first)])
    config, run = configs_from(str(first), {"ratio": 0.5, "calib_samples": 2, "method": None})
    assert config.ratio == 0.5 and config.budget is None
    assert run.calib_samples == 2 and run.calib_len == 16 and run.calib == str(text_file.resolve())
    assert read_recipe(first) == read_manifest(first)
