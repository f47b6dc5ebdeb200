"""Calibration text the model writes itself (calibrate/generation.py, CompressConfig.calib_generated)."""
from __future__ import annotations

import json

import pytest
import torch

import lora_compress as lc
from lora_compress.methods.config import RunConfig
from lora_compress.storage.compressed import MANIFEST

from lora_compress.calibrate.generation import generation_problem, with_generated, generated_sequences
from lora_compress.errors import LoraCompressError
from lora_compress.pipelines.plan import compress_
from lora_compress.methods.config import CompressConfig
from lora_compress.storage.checkpoint import load_dense, resolve_source
from helpers import run


def dense(folder):
    return load_dense(resolve_source(str(folder)))


def test_written_sequences_start_at_bos_run_to_full_length_and_repeat_with_the_seed(tiny_models):
    model = dense(tiny_models["llama"])
    written = generated_sequences(model, 3, 12, seed=0)
    assert written.shape == (3, 12)
    assert (written[:, 0] == model.config.bos_token_id).all()
    assert not (written[:, 1:] == model.config.eos_token_id).any()  # never ended early
    assert torch.equal(written, generated_sequences(model, 3, 12, seed=0))
    assert not torch.equal(written, generated_sequences(model, 3, 12, seed=1))


def test_a_share_of_the_rows_is_written_and_the_users_rows_kept_are_spread_evenly(tiny_models):
    model = dense(tiny_models["llama"])
    tokens = torch.arange(8 * 6).reshape(8, 6) % model.config.vocab_size  # (8, 6): row i starts at 6·i
    mixed = with_generated(model, tokens, 0.25)
    assert mixed.shape == tokens.shape
    assert torch.equal(mixed[:6], tokens[[0, 1, 3, 4, 6, 7]])  # 6 of 8 rows, first and last among them
    assert (mixed[6:, 0] == model.config.bos_token_id).all()
    assert with_generated(model, tokens, 0.0) is tokens


def test_an_encoder_cannot_write_calibration_text_and_says_so_in_one_line(tiny_models):
    model = dense(tiny_models["bert"])
    assert "no language-model head" in generation_problem(model)
    with pytest.raises(LoraCompressError, match="^calib_generated: BertModel has no language-model head") as err:
        generated_sequences(model, 2, 8)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_a_share_of_written_calibration_outside_0_1_is_refused(share):
    with pytest.raises(LoraCompressError, match="^calib_generated"):
        RunConfig(calib="t.txt", calib_generated=share)


def test_compress_writes_the_share_of_calibration_it_is_asked_and_records_it(tiny_models):
    tokens = torch.randint(3, 40, (8, 16), generator=torch.Generator().manual_seed(0))
    reports = {}
    for share in (0.0, 0.5):
        model = dense(tiny_models["llama"])
        run = RunConfig(calib="t.txt", calib_generated=share)
        reports[share] = (compress_(model, CompressConfig(budget=0.7), run, progress=False, tokens=tokens), model)
    assert reports[0.0][0].calibration["generated"] == 0 and reports[0.5][0].calibration["generated"] == 4
    first, second = (dict(m.named_parameters()) for _, m in reports.values())
    assert any(first[k].shape != second[k].shape or not torch.equal(first[k], second[k]) for k in first)


def test_data_free_compress_needs_no_calib_text_and_records_what_it_wrote(tiny_models, tmp_path):
    out = tmp_path / "free"
    result = run("compress", str(tiny_models["llama"]), "--out", str(out), "--budget", "0.7",
                 "--calib-generated", "1", "--calib-samples", "4", "--calib-len", "16", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["settings"]["method"] == "sequential" and manifest["run"]["calib"] is None
    assert manifest["calibration"]["generated"] == 4
    model, original = lc.load(out), dense(tiny_models["llama"])
    assert any(isinstance(module, lc.LowRankLinear) for module in model.modules())
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in original.parameters())


@pytest.mark.parametrize("args, message", [
    (["--budget", "0.7", "--calib-generated", "0.5"], "pass --calib FILE, or --calib-generated 1"),
    (["--ratio", "0.5", "--method", "svd", "--calib-generated", "1"], "--method svd does not use"),
    (["--budget", "0.7", "--calib-generated", "1", "--stream"], "needs the whole model in memory"),
])
def test_written_calibration_that_cannot_run_is_refused_in_one_line_and_writes_nothing(tiny_models, tmp_path, args,
                                                                                         message):
    out = tmp_path / "out"
    result = run("compress", str(tiny_models["llama"]), "--out", str(out), "--quiet", *args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_an_encoder_asked_to_write_its_calibration_is_refused_before_anything_is_written(tiny_models, tmp_path):
    out = tmp_path / "out"
    result = run("compress", str(tiny_models["bert"]), "--out", str(out), "--budget", "0.7",
                 "--calib-generated", "1", "--quiet")
    assert result.exit_code != 0 and "no language-model head" in result.output, result.output
    assert not out.exists()
