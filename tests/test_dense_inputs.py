"""No silent garbage: a compressed folder is never read as a dense model, and evaluate checks its BASE."""
import shutil

import pytest

from helpers import run


@pytest.mark.parametrize("command", [
    lambda c, m, t, o: ["compress", c, "--rank", "2", "--out", o, "--quiet"],
    lambda c, m, t, o: ["compress", c, "--rank", "2", "--out", o, "--stream", "--quiet"],
    lambda c, m, t, o: ["inspect", c],
    lambda c, m, t, o: ["inspect", c, "--spectrum"],
    lambda c, m, t, o: ["evaluate", c, c, "--text", t, "--quiet"],
    lambda c, m, t, o: ["heal", c, "--base", c, "--calib", t, "--steps", "1", "--out", o, "--quiet"],
    lambda c, m, t, o: ["extract", "--base", c, "--tuned", m, "--rank", "2", "--out", o, "--quiet"],
    lambda c, m, t, o: ["extract", "--base", m, "--tuned", c, "--rank", "2", "--out", o, "--quiet"],
], ids=["compress", "compress-stream", "inspect", "inspect-spectrum", "evaluate-base", "heal-base", "extract-base",
        "extract-tuned"])
def test_commands_that_expect_a_dense_model_refuse_a_compressed_folder(compressed, tiny_models, text_file, tmp_path,
                                                                      command):
    result = run(*command(compressed["llama"], tiny_models["llama"], text_file, tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "is a compressed folder, not a dense checkpoint" in result.output
    assert f"(its base: {tiny_models['llama']})" in result.output and not (tmp_path / "out").exists()


def test_evaluate_warns_in_one_line_when_base_is_not_the_manifests(compressed, tiny_models, tmp_path, text_file):
    folder, copy = compressed["llama"], tmp_path / "elsewhere"
    shutil.copytree(tiny_models["llama"], copy)
    result = run("evaluate", copy, folder, "--text", text_file, "--no-report", "--quiet")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: BASE {copy} is not the base model recorded in {folder} "
                        f"({tiny_models['llama']}); the figures compare against {copy}"]
    result = run("evaluate", tiny_models["llama"], folder, "--text", text_file, "--no-report", "--quiet")
    assert result.exit_code == 0 and "warning:" not in result.output


@pytest.mark.parametrize("other, problem", [
    ("gpt2", "it is a GPT2LMHeadModel, the folder a LlamaForCausalLM"),
    ("llama-wide-vocab", "its vocabulary × width is"),
])
def test_evaluate_refuses_a_base_of_another_architecture_or_vocabulary(compressed, tiny_models, tmp_path, text_file,
                                                                       other, problem):
    from conftest import build_llama

    if other == "llama-wide-vocab":
        base = tmp_path / other
        shutil.copytree(tiny_models["llama"], base)
        build_llama(base, vocab=200).save_pretrained(base)
    else:
        base = tiny_models[other]
    result = run("evaluate", base, compressed["llama"], "--text", text_file, "--quiet")
    lines = [line for line in result.output.splitlines() if not line.startswith("warning:")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: BASE {base} is not the model this folder was compressed from")
    assert problem in lines[0] and lines[0].endswith(f"pass its base, {tiny_models['llama']}")
