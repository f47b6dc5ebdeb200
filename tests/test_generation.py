"""Calibration text the model writes itself (calibrate/generation.py, CompressConfig.calib_generated)."""
from __future__ import annotations

import json

import pytest
from lora_compress.cli import main
from click.testing import CliRunner
import torch

import lora_compress as lc
from lora_compress.methods.config import RunConfig
from lora_compress.storage.compressed import MANIFEST

from lora_compress.calibrate import generation
from lora_compress.calibrate.generation import (PROMPTS, generation_problem, generated_sequences, prompted_sequences,
                                                repeated_rows, with_generated)
from lora_compress.calibrate.tokens import calibration_tokens
from lora_compress.storage.checkpoint import load_tokenizer
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


class Words:
    """A tokenizer of numbered words; ``bos``: an id it puts first in every encoding (None: none)."""

    def __init__(self, bos=None):
        self.bos_token_id = bos

    def __call__(self, text, **kwargs):
        ids = [10 + i for i in range(len(text.split()))]
        ids = ids if self.bos_token_id is None else [self.bos_token_id, *ids]
        return {"input_ids": torch.tensor([ids]) if kwargs.get("return_tensors") else ids}


def test_every_calibration_row_starts_with_bos_when_the_tokenizer_adds_one():
    rows = calibration_tokens(Words(bos=2), " ".join(["w"] * 100), 4, 10)
    assert (rows[:, 0] == 2).all()  # rows cut from the middle of the text get the BOS the model expects first
    assert (rows[:, 2:] - rows[:, 1:-1] == 1).all() and (rows[1:, 1] > 11).all()  # then the text's own tokens


def test_calibration_rows_are_the_text_itself_when_the_tokenizer_adds_no_bos():
    rows = calibration_tokens(Words(bos=None), " ".join(["w"] * 100), 4, 10)
    assert rows[0, 0] == 10 and rows[-1, -1] == 109  # the text's own first and last tokens
    assert (rows[:, 1:] - rows[:, :-1] == 1).all()


def test_consecutive_rows_for_healing_start_with_bos_too():
    rows = calibration_tokens(Words(bos=2), " ".join(["w"] * 40), None, 10, consecutive=True)
    assert rows.shape[0] == 4 and (rows[:, 0] == 2).all()


def test_prompted_rows_continue_distinct_prompts_and_repeat_with_the_seed(tiny_models):
    model, tokenizer = dense(tiny_models["llama"]), load_tokenizer(resolve_source(str(tiny_models["llama"])))
    rows = prompted_sequences(model, tokenizer, 5, 20, seed=0)
    assert rows.shape == (5, 20)
    assert torch.equal(rows, prompted_sequences(model, tokenizer, 5, 20, seed=0))
    assert not torch.equal(rows, prompted_sequences(model, tokenizer, 5, 20, seed=1))
    prompts = {tuple(tokenizer(p)["input_ids"]) for p in PROMPTS}
    starts = [next(p for p in prompts if tuple(row[: len(p)]) == p) for row in rows.tolist()]
    assert len(starts) == 5  # every row begins with one of the prompts
    assert not (rows == model.config.eos_token_id).any()  # never ended early


def test_rows_that_repeat_an_earlier_row_are_found_after_their_prompt():
    rows = torch.tensor([[1, 5, 6, 7], [2, 5, 6, 7], [1, 9, 9, 9], [3, 4, 9, 9]])
    assert repeated_rows(rows, [1, 1, 1, 2], span=3) == [1]  # row 3's written part (9, 9) differs from (9, 9, 9)
    assert repeated_rows(rows, [1, 1, 1, 1], span=2) == [1]


def test_repeated_written_rows_are_rewritten(tiny_models, monkeypatch):
    model, tokenizer = dense(tiny_models["llama"]), load_tokenizer(resolve_source(str(tiny_models["llama"])))
    monkeypatch.setattr(generation, "PROMPTS", ("one two",))  # one prompt: every row continues it
    calls, write = [], generation._write

    def stuck_first(model, prompts, length, generator, device):
        calls.append(len(prompts))
        rows = write(model, prompts, length, generator, device)
        return rows[:1].repeat(len(rows), 1) if len(calls) == 1 else rows  # the first round writes one row 4 times

    monkeypatch.setattr(generation, "_write", stuck_first)
    rows = prompted_sequences(model, tokenizer, 4, 24, seed=0)
    assert calls[:2] == [4, 3]  # three repeats rewritten
    assert repeated_rows(rows, [2] * 4) == []


def test_the_share_of_written_rows_is_respected_and_the_users_rows_spread(tiny_models):
    model, tokenizer = dense(tiny_models["llama"]), load_tokenizer(resolve_source(str(tiny_models["llama"])))
    tokens = torch.randint(3, 40, (8, 16), generator=torch.Generator().manual_seed(0))
    for share, written in ((0.125, 1), (0.25, 2), (0.5, 4)):
        mixed = with_generated(model, tokens, share, seed=0, tokenizer=tokenizer)
        assert mixed.shape == tokens.shape
        kept = torch.linspace(0, 7, 8 - written).round().long()
        assert torch.equal(mixed[: 8 - written], tokens[kept])


def test_a_causal_lm_calibrates_on_a_quarter_of_prompted_rows_by_default_and_an_encoder_on_none(tiny_models):
    tokens = torch.randint(3, 40, (8, 16), generator=torch.Generator().manual_seed(0))
    for name, written in (("llama", 2), ("bert", 0)):
        folder = tiny_models[name]
        report = compress_(dense(folder), CompressConfig(budget=0.7), RunConfig(calib="t.txt"), progress=False,
                           tokens=tokens, tokenizer=load_tokenizer(resolve_source(str(folder))))
        assert report.calibration["generated"] == written, name
    report = compress_(dense(tiny_models["llama"]), CompressConfig(budget=0.7), RunConfig(calib="t.txt",
                       calib_generated=0), progress=False, tokens=tokens, tokenizer=load_tokenizer(
                       resolve_source(str(tiny_models["llama"]))))
    assert report.calibration["generated"] == 0  # --calib-generated 0 turns it off


def test_budget_without_calib_text_calibrates_on_text_the_model_writes(tiny_models, tmp_path):
    out = tmp_path / "free"
    result = run("compress", tiny_models["llama"], "--out", out, "--budget", "0.7", "--calib-samples", "4",
                 "--calib-len", "16", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["settings"]["method"] == "sequential" and manifest["calibration"]["generated"] == 4


def test_budget_without_calib_text_on_an_encoder_is_refused_in_one_line(tiny_models, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", str(tiny_models["bert"]), "--out", str(out), "--budget", "0.7",
                                       "--quiet"])
    assert result.exit_code != 0 and "no language-model head" in result.output and "--calib FILE" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_a_streamed_run_writes_the_same_calibration_rows_as_an_in_memory_one(tiny_models, text_file, tmp_path):
    for name, stream in (("memory", False), ("stream", True)):
        lc.compress(str(tiny_models["llama"]), tmp_path / name, CompressConfig(budget=0.7),
                    RunConfig(calib=str(text_file), calib_samples=8, calib_len=16, stream=stream), progress=False)
    manifests = [json.loads((tmp_path / name / MANIFEST).read_text()) for name in ("memory", "stream")]
    assert manifests[0]["calibration"]["generated"] == manifests[1]["calibration"]["generated"] == 2
    assert manifests[0]["layers"] == manifests[1]["layers"]


def test_a_streamed_run_whose_weights_do_not_fit_says_so_for_an_explicit_share(tiny_models, text_file, tmp_path,
                                                                               monkeypatch):
    from lora_compress.jobs import compress as job
    monkeypatch.setattr(job, "weights_and_room", lambda model, run: (2 << 30, 1 << 30))
    result = CliRunner().invoke(main, ["compress", str(tiny_models["llama"]), "--out", str(tmp_path / "out"),
                                       "--budget", "0.7", "--calib", str(text_file), "--calib-samples", "8",
                                       "--calib-len", "16", "--calib-generated", "0.5", "--stream", "--quiet"])
    assert result.exit_code != 0 and "--calib-generated 0" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
