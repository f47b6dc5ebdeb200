"""The house: imports flow one way (import-linter), and a method is one config plus one handler."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers import dense, saved_tensors
from lora_compress import (Collector, CompressConfig, LoraCompressError, LoraCompressWarning, MethodConfig,
                           RunConfig, SequentialConfig, SvdConfig, compress, compress_, get_method, method_names,
                           register_method)
from lora_compress.cli import main
from lora_compress.calibrate.collectors import statistics_bytes
from lora_compress.core.svd import factorize
from lora_compress.errors import OptionError
from lora_compress.methods import registry
from lora_compress.methods.config import resolve
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
    config = CompressConfig(budget=0.8, method=SequentialConfig(output_damping=0.05))
    assert config.method == "sequential" and config.options.output_damping == 0.05
    assert config.to_dict()["options"] == {"output_damping": 0.05, "output_floor": 0.01, "input_shrinkage": 0.3}
    assert resolve(CompressConfig(budget=0.8), RunConfig(calib="text.txt")).options == SequentialConfig()
    assert get_method("sequential").gradients and get_method("sequential").closed_loop
    assert not get_method("whiten").gradients and not get_method("svd").calibration


def test_a_manifest_written_under_the_former_names_still_reads():
    former = {"budget": 0.8, "method": "sequential", "svd": "randomized",
              "options": {"fisher_damping": 0.05, "fisher_floor": 0.02, "input_shrinkage": 0.3}}
    config = CompressConfig.from_dict(former)
    assert config.solver == "randomized"
    assert config.options == SequentialConfig(output_damping=0.05, output_floor=0.02)
    assert CompressConfig.from_dict(config.to_dict()) == config


def test_auto_names_sequential_with_calibration_text_and_svd_without():
    assert resolve(CompressConfig(ratio=0.5), RunConfig()).method == "svd"
    assert resolve(CompressConfig(ratio=0.5), RunConfig(calib="text.txt")).method == "sequential"
    assert resolve(CompressConfig(ratio=0.5), RunConfig(calib_generated=1)).method == "sequential"


def test_both_configs_round_trip_through_plain_data():
    config = CompressConfig(budget=0.7, method=SequentialConfig(input_shrinkage=0.1), include=("mlp",), seed=3)
    run = RunConfig(calib="text.txt", calib_samples=8, calib_len=64, workers=1, memory_limit="20G")
    assert CompressConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))) == run


def test_options_of_another_method_are_refused():
    with pytest.raises(LoraCompressError, match="configures another method than whiten"):
        CompressConfig(ratio=0.5, method="whiten", options=SequentialConfig())
    with pytest.raises(LoraCompressError, match="^method 'nope' is unknown; choose one of svd, whiten"):
        CompressConfig(ratio=0.5, method="nope")


def test_library_errors_name_fields_and_the_cli_names_flags(tiny_models, tmp_path):
    with pytest.raises(OptionError, match=r"^calib_samples 0 / calib_len 256 are too small") as caught:
        RunConfig(calib_samples=0)
    assert caught.value.fields == ("calib_samples", "calib_len")
    result = CliRunner().invoke(main, ["compress", str(tiny_models["llama"]), "--out", str(tmp_path / "o"),
                                       "--ratio", "0.5", "--calib-samples", "0"])
    assert result.exit_code == 2
    assert "error: --calib-samples 0 / --calib-len 256 are too small" in result.output


def test_unused_options_warn_from_the_library():
    with pytest.warns(LoraCompressWarning, match="^calib is unused by method svd"):
        resolve(CompressConfig(ratio=0.5, method="svd"), RunConfig(calib="text.txt"))
    with pytest.warns(LoraCompressWarning, match="^solver full is unused by method sequential"):
        resolve(CompressConfig(ratio=0.5, solver="full"), RunConfig(calib="text.txt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve(CompressConfig(ratio=0.5), RunConfig())  # nothing unused: no warning


@dataclass(frozen=True)
class HalfConfig(MethodConfig):
    """A test method: plain SVD, then lora_B scaled by a knob."""

    scale: float = 0.5


def factor_scaled(weight, rank, inputs, config, *, solver="auto", seed=0):
    factors = factorize(weight, rank, solver=solver, seed=seed)
    return type(factors)(factors.B * config.scale, factors.A, factors.singular_values, factors.energy_kept)


@pytest.fixture
def scaled_method(monkeypatch):
    """``scaled-svd`` registered for one test only."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    register_method("scaled-svd", HalfConfig, summary="test: plain SVD with lora_B scaled")(factor_scaled)
    return "scaled-svd"


@dataclass(frozen=True)
class InputAbsMean(Collector):
    """A statistic no module of the package knows: Σ|x| per input channel (ASVD's activation scale)."""

    key: ClassVar[str] = "abs_mean"
    per_input: ClassVar[bool] = True

    def nbytes(self, shape):
        return 8 * shape[1]

    def add(self, sums, call):
        sums[self.key] = sums.get(self.key, 0) + call.inputs.abs().sum(0).double()


@dataclass(frozen=True)
class AsvdConfig(MethodConfig):
    """ASVD (Yuan et al. 2023): scale W's columns by the mean |x|^alpha of its inputs, SVD, scale back."""

    alpha: float = 0.5


def factor_asvd(weight, rank, stats, config, *, solver="auto", seed=0):
    scale = (stats["abs_mean"] / stats.rows).clamp_min(1e-6).pow(config.alpha).to(weight.dtype)  # (in,)
    factors = factorize(weight * scale, rank, solver="full")
    return type(factors)(factors.B, factors.A / scale, factors.singular_values, factors.energy_kept)


@pytest.fixture
def asvd_method(monkeypatch):
    """``asvd`` with its own statistic, registered in this file alone for one test."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    register_method("asvd", AsvdConfig, statistics=(InputAbsMean(),), summary="test: ASVD")(factor_asvd)
    return "asvd"


def test_a_method_with_a_statistic_of_its_own_is_declared_in_one_place(asvd_method, tiny_models, text_file,
                                                                         tmp_path):
    method = get_method(asvd_method)
    assert method.calibration and not method.gradients and not method.closed_loop  # the passes follow from it
    run = RunConfig(calib=str(text_file), calib_samples=4, calib_len=16)
    report = compress(str(tiny_models["llama"]), tmp_path / "asvd", CompressConfig(ratio=0.5, method="asvd"), run,
                      progress=False)
    plain = compress(str(tiny_models["llama"]), tmp_path / "svd", CompressConfig(ratio=0.5), progress=False)
    assert [layer.rank for layer in report.layers] == [layer.rank for layer in plain.layers]
    asvd, svd = saved_tensors(tmp_path / "asvd"), saved_tensors(tmp_path / "svd")
    name = "model.layers.0.mlp.up_proj"
    assert not torch.allclose(asvd[f"{name}.lora_A"], svd[f"{name}.lora_A"])  # the statistic reached the handler
    assert statistics_bytes([(64, 32)], method.statistics) == 8 * 32  # and the memory plan counts it


def test_a_registered_method_runs_end_to_end_with_its_knob(scaled_method, tiny_models, tmp_path):
    model = dense(tiny_models["llama"])
    reference = dense(tiny_models["llama"])
    compress_(reference, CompressConfig(rank=4, method=SvdConfig()), progress=False)
    compress_(model, CompressConfig(rank=4, method=HalfConfig(scale=0.25)), progress=False)
    name = "model.layers.0.mlp.up_proj"
    assert torch.allclose(model.get_submodule(name).lora_B, 0.25 * reference.get_submodule(name).lora_B)
    compress(str(tiny_models["llama"]), tmp_path / "out", CompressConfig(rank=4, method="scaled-svd"), progress=False)
    manifest = read_manifest(tmp_path / "out")
    assert manifest.method == "scaled-svd" and manifest.settings["options"] == {"scale": 0.5}
    assert "test: plain SVD with lora_B scaled" in (tmp_path / "out" / "README.md").read_text()


def test_registering_a_name_twice_is_refused(scaled_method):
    with pytest.raises(ValueError, match="registered twice"):
        register_method("scaled-svd", HalfConfig, summary="again")(factor_scaled)
