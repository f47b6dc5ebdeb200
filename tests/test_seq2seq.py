"""Encoder-decoder models (tiny T5 and BART): the decoder is fed the text shifted right, as in training."""
from __future__ import annotations

import pytest
import torch

from helpers import dense, rel_error, run, saved_tensors
from lora_compress import (CompressConfig, LoraCompressError, calibration_tokens, compress, compress_, evaluate_folder,
                           load)
from lora_compress.methods.config import RunConfig
from lora_compress.pipelines.factoring import GroupFactoring
from lora_compress.calibrate.seq2seq import decoder_input_ids, model_inputs
from lora_compress.storage.checkpoint import load_tokenizer, resolve_source


def _ids(model, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(2, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(**model_inputs(model, ids)).logits


def _tokens(folder, text_file, samples: int = 6, length: int = 16) -> torch.Tensor:
    return calibration_tokens(load_tokenizer(resolve_source(str(folder))), text_file.read_text(), samples, length)


def test_the_decoder_reads_the_text_shifted_right_from_its_start_token(seq2seq_model):
    model = dense(seq2seq_model)
    ids = _ids(model)
    shifted = decoder_input_ids(model, ids)
    assert torch.equal(shifted[:, 1:], ids[:, :-1])
    assert (shifted[:, 0] == model.config.decoder_start_token_id).all()


def test_full_rank_reproduces_the_decoders_logits(seq2seq_model):
    model = dense(seq2seq_model)
    ids = _ids(model)
    before = _logits(model, ids)
    report = compress_(model, CompressConfig(energy=1.0, factor_all=True), progress=False)
    assert any("decoder." in layer.name for layer in report.layers)
    assert any("encoder." in layer.name for layer in report.layers)
    assert rel_error(_logits(model, ids), before) < 1e-5


def test_output_error_falls_as_rank_rises(seq2seq_model):
    reference = dense(seq2seq_model)
    ids = _ids(reference)
    before = _logits(reference, ids)
    errors = []
    for rank in (1, 4, 8, 16):
        model = dense(seq2seq_model)
        compress_(model, CompressConfig(rank=rank, factor_all=True), progress=False)
        errors.append(rel_error(_logits(model, ids), before))
    assert errors[0] > 1e-3, "rank 1 should really change the model"
    assert errors == sorted(errors, reverse=True)


def test_saved_encoder_decoder_reloads_bit_identical(seq2seq_model, tmp_path):
    model = dense(seq2seq_model)
    compress_(model, CompressConfig(ratio=0.5), progress=False)
    compress(str(seq2seq_model), tmp_path / "out", CompressConfig(ratio=0.5), progress=False)
    ids = _ids(model)
    assert torch.equal(_logits(load(tmp_path / "out"), ids), _logits(model, ids))


@pytest.mark.parametrize("method", ["whiten", "sequential"])
def test_calibrated_methods_feed_the_decoder_and_beat_plain_svd(seq2seq_model, text_file, method):
    tokens = _tokens(seq2seq_model, text_file)
    reference = dense(seq2seq_model)
    before = _logits(reference, tokens)
    errors = {}
    for name in ("svd", method):
        model = dense(seq2seq_model)
        compress_(model, CompressConfig(ratio=0.5, method=name), progress=False,
                  tokens=None if name == "svd" else tokens)
        errors[name] = rel_error(_logits(model, tokens), before)
    assert errors["svd"] > 1e-2, "plain SVD at half the parameters should really change the model"
    assert errors[method] < errors["svd"]


def test_the_closed_loop_compresses_the_encoder_before_the_decoder(tiny_models, text_file, monkeypatch):
    model = dense(tiny_models["t5"])
    seen = []
    factor = GroupFactoring.factor
    monkeypatch.setattr(GroupFactoring, "factor", lambda self, names, stats: (
        seen.append(names[0].rpartition(".block.")[0] + ".block." + names[0].split(".block.")[1].split(".")[0]),
        factor(self, names, stats)))
    compress_(model, CompressConfig(ratio=0.5), RunConfig(calib=str(text_file)), progress=False,
              tokens=_tokens(tiny_models["t5"], text_file))
    assert list(dict.fromkeys(seen)) == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]


def test_evaluate_scores_the_decoders_predictions(seq2seq_model, text_file, tmp_path):
    compress(str(seq2seq_model), tmp_path / "out", CompressConfig(ratio=0.5), progress=False)
    figures = evaluate_folder(str(seq2seq_model), tmp_path / "out", text_file, progress=False)
    assert figures["kind"] == "seq2seq"
    # the decoder's predictions of the compressed model against the dense one's: moved, not garbage (measured:
    # KL per token 0.46 T5 / 8e-7 BART, top-1 agreement 0.66 / 1.0, perplexity 90 → 127 / 46.05 → 46.05)
    perplexity, drift = figures["perplexity"], figures["drift"]
    assert 0 < drift["kl_per_token"] < 2 and drift["top1_agreement"] > 0.5
    assert 1 / 2 < perplexity["compressed"] / perplexity["dense"] < 2
    assert perplexity["dense"] < 4 * dense(seq2seq_model).config.vocab_size, "an untrained model: near uniform"
    assert figures["blocks"]["stack"].endswith(("decoder.block", "decoder.layers"))
    assert 0.4 < figures["params"]["ratio_targeted"] <= 0.5


def test_an_encoder_decoder_without_an_lm_head_is_one_line_from_evaluate(tiny_models, text_file, tmp_path):
    from transformers import T5Config, T5Model

    folder = tmp_path / "t5-base"
    T5Model(T5Config.from_pretrained(tiny_models["t5"])).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_models["t5"] / name).read_bytes())
    compress(str(folder), tmp_path / "out", CompressConfig(ratio=0.5), progress=False)
    with pytest.raises(LoraCompressError, match="T5Model has no LM head; evaluate a ...ForConditionalGeneration"):
        evaluate_folder(str(folder), tmp_path / "out", text_file, progress=False)


def test_streamed_plain_svd_of_an_encoder_decoder_is_the_in_memory_result(seq2seq_model, tmp_path):
    compress(str(seq2seq_model), tmp_path / "memory", CompressConfig(ratio=0.5), progress=False)
    compress(str(seq2seq_model), tmp_path / "stream", CompressConfig(ratio=0.5), RunConfig(stream=True), progress=False)
    memory, streamed = saved_tensors(tmp_path / "memory"), saved_tensors(tmp_path / "stream")
    assert memory.keys() == streamed.keys()
    assert all(torch.equal(memory[key], streamed[key]) for key in memory)


def test_streamed_calibration_of_an_encoder_decoder_is_one_clear_line(tiny_models, text_file, tmp_path):
    result = run("compress", str(tiny_models["bart"]), "--out", str(tmp_path / "out"),
                 "--ratio", "0.5", "--calib", str(text_file), "--calib-samples", "4",
                 "--calib-len", "16", "--stream", "--quiet")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: BartForConditionalGeneration is an encoder-decoder: calibrated methods stream decoder-only and "
        "encoder-only models block by block, not two stacks; drop --stream (in memory they work), or stream plain "
        "SVD (--method svd)"]
    assert not (tmp_path / "out").exists()


def test_heal_of_an_encoder_decoder_is_one_clear_line(tiny_models, text_file, tmp_path):
    from lora_compress import HealConfig, heal

    compress(str(tiny_models["t5"]), tmp_path / "out", CompressConfig(ratio=0.5), progress=False)
    with pytest.raises(LoraCompressError, match="T5ForConditionalGeneration is an encoder-decoder; heal distils"):
        heal(tmp_path / "out", text_file, tmp_path / "healed", HealConfig(steps=1, calib_len=16))
