"""The house: imports flow one way (import-linter), and a method is one config plus one handler."""
from __future__ import annotations

import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers import dense
from lora_compress import (CompressConfig, LoraCompressError, LoraCompressWarning, MethodConfig, SequentialConfig,
                           SvdConfig, compress, compress_, get_method, method_names, register_method)
from lora_compress.cli import main
from lora_compress.core.svd import factorize
from lora_compress.methods import registry
from lora_compress.storage.compressed import read_manifest

REPO = Path(__file__).resolve().parent.parent


def test_imports_keep_the_layers_contract_and_have_no_cycle():
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter), "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_cli_method_choices_and_help_come_from_the_registry():
    result = CliRunner().invoke(main, ["compress", "--help"])
    assert result.exit_code == 0
    for method in registry.methods():
        assert method.name in result.output
        assert method.summary.split()[0] in result.output
    assert method_names()[:4] == ("svd", "whiten", "sequential", "sequential-refit")


def test_a_method_config_sets_the_method_and_its_knobs():
    config = CompressConfig(budget=0.8, calib="text.txt", method=SequentialConfig(fisher_damping=0.05))
    assert config.method == "sequential" and config.options.fisher_damping == 0.05
    assert config.settings()["options"] == {"fisher_damping": 0.05, "fisher_floor": 0.01, "input_shrinkage": 0.3}
    assert CompressConfig(budget=0.8, calib="text.txt").options == SequentialConfig()
    assert get_method("sequential").gradients and get_method("sequential").closed_loop
    assert not get_method("whiten").gradients and not get_method("svd").calibration


def test_options_of_another_method_are_refused():
    with pytest.raises(LoraCompressError, match="configures another method than whiten"):
        CompressConfig(ratio=0.5, calib="text.txt", method="whiten", options=SequentialConfig())
    with pytest.raises(LoraCompressError, match="--method 'nope' is unknown; choose one of svd, whiten"):
        CompressConfig(ratio=0.5, method="nope")


def test_unused_options_warn_from_the_library():
    with pytest.warns(LoraCompressWarning, match="--calib is unused by --method svd"):
        CompressConfig(ratio=0.5, method="svd", calib="text.txt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CompressConfig(ratio=0.5)  # nothing unused: no warning


@dataclass(frozen=True)
class HalfConfig(MethodConfig):
    """A test method: plain SVD, then lora_B scaled by a knob."""

    scale: float = 0.5


def factor_scaled(weight, rank, inputs, config, *, svd="auto", seed=0):
    factors = factorize(weight, rank, svd=svd, seed=seed)
    return type(factors)(factors.B * config.scale, factors.A, factors.singular_values, factors.energy_kept)


@pytest.fixture
def scaled_method(monkeypatch):
    """``scaled-svd`` registered for one test only."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    register_method("scaled-svd", HalfConfig, summary="test: plain SVD with lora_B scaled")(factor_scaled)
    return "scaled-svd"


def test_a_registered_method_runs_end_to_end_with_its_knob(scaled_method, tiny_models, tmp_path):
    model = dense(tiny_models["llama"])
    reference = dense(tiny_models["llama"])
    compress_(reference, CompressConfig(rank=4, method=SvdConfig()), progress=False)
    compress_(model, CompressConfig(rank=4, method=HalfConfig(scale=0.25)), progress=False)
    name = "model.layers.0.mlp.up_proj"
    assert torch.allclose(model.get_submodule(name).lora_B, 0.25 * reference.get_submodule(name).lora_B)
    compress(str(tiny_models["llama"]), tmp_path / "out", CompressConfig(rank=4, method="scaled-svd"), progress=False)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["method"] == "scaled-svd" and manifest["settings"]["options"] == {"scale": 0.5}
    assert "test: plain SVD with lora_B scaled" in (tmp_path / "out" / "README.md").read_text()


def test_registering_a_name_twice_is_refused(scaled_method):
    with pytest.raises(ValueError, match="registered twice"):
        register_method("scaled-svd", HalfConfig, summary="again")(factor_scaled)
