"""The click CLI, through CliRunner: the happy path and one-line errors with exit code 2."""
import json

import pytest
from helpers import run




@pytest.mark.parametrize("command", ["inspect", "compress", "evaluate"])
def test_every_command_has_help(command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_inspect_lists_layers_and_break_even_ranks(tiny_models):
    result = run("inspect", tiny_models["gpt2"])
    assert result.exit_code == 0, result.output
    assert "transformer.h.0.attn.c_attn" in result.output and "Conv1D" in result.output
    assert "96×32" in result.output and "break-even rank" in result.output


def test_compress_then_evaluate_a_causal_lm(tiny_models, tmp_path, text_file):
    out, report = tmp_path / "out", tmp_path / "figures.json"
    result = run("compress", tiny_models["llama"], "--ratio", "0.5", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "targeted weights" in result.output and (out / "lora_compress.json").exists()
    result = run("evaluate", tiny_models["llama"], out, "--text", text_file, "--json", report, "--quiet")
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert figures["kind"] == "causal-lm"
    assert f"{figures['perplexity']['compressed']:.4g}" in result.output
    assert figures["params"]["compressed_targeted"] < figures["params"]["dense_targeted"]
    # the compressed model, not the dense one twice: its outputs moved, a little (a random model's near-uniform
    # predictions barely move at ratio 0.5; measured: KL 1.9e-4 per token, top-1 agreement 1.0, perplexity -0.2%)
    drift, perplexity = figures["drift"], figures["perplexity"]
    assert 0 < drift["kl_per_token"] < 0.01 and 0 < drift["logits_rel_error"] < 0.5
    assert drift["top1_agreement"] >= 0.9 and abs(perplexity["compressed"] / perplexity["dense"] - 1) < 0.05


def test_compress_then_evaluate_an_encoder(tiny_models, tmp_path, text_file):
    out, report = tmp_path / "out", tmp_path / "figures.json"
    # --energy 0.9 kept every layer of the random BERT dense (ratio 1.0: dense compared with itself); 0.8 factors
    assert run("compress", tiny_models["bert"], "--energy", "0.8", "--out", out, "--quiet").exit_code == 0
    result = run("evaluate", tiny_models["bert"], out, "--text", text_file, "--json", report, "--quiet")
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert figures["kind"] == "encoder"
    assert figures["params"]["compressed_targeted"] < figures["params"]["dense_targeted"]
    # the hidden states moved, a little (after LayerNorm; measured: rel. error 0.0087, mean cosine 0.99994)
    drift = figures["drift"]
    assert 0 < drift["hidden_rel_error"] < 0.1 and 0.999 < drift["cosine_mean"] < 1
    assert "perplexity" not in figures


@pytest.mark.parametrize("args, message", [
    (["--rank", "0"], "--rank 0 must be a positive integer"),
    (["--ratio", "1.5"], "--ratio 1.5 is outside (0, 1]"),
    (["--energy", "0"], "--energy 0.0 is outside (0, 1]"),
    (["--rank", "2", "--ratio", "0.5"], "give exactly one of"),
    ([], "give exactly one of"),
    (["--rank", "2", "--include", "nope"], "--include 'nope' matches no linear module"),
    (["--rank", "999"], "--rank 999 is larger than"),
])
def test_bad_options_give_one_line_exit_2_and_no_output(tiny_models, tmp_path, args, message):
    result = run("compress", tiny_models["llama"], "--out", tmp_path / "out", "--quiet", *args)
    assert result.exit_code == 2
    assert message in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_missing_model_folder_gives_exit_2(tmp_path):
    result = run("compress", tmp_path / "missing", "--rank", "2", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_evaluate_with_a_missing_text_file_gives_exit_2(tiny_models, tmp_path):
    out = tmp_path / "out"
    run("compress", tiny_models["llama"], "--rank", "2", "--out", out, "--quiet")
    result = run("evaluate", tiny_models["llama"], out, "--text", tmp_path / "nope.txt")
    assert result.exit_code == 2 and "nope.txt does not exist" in result.output


def test_evaluate_windows_never_exceed_the_models_positions(tiny_models, tmp_path, text_file):
    out = tmp_path / "out"
    run("compress", tiny_models["gpt2"], "--rank", "4", "--out", out, "--quiet")
    result = run("evaluate", tiny_models["gpt2"], out, "--text", text_file, "--no-report", "--quiet")
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output
