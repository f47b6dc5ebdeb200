"""The real example models (marked `real`): compress, reload, evaluate."""
import pytest
import torch

import lora_compress as lc
from lora_compress.evaluation.metrics import EvalConfig

pytestmark = pytest.mark.real


def test_minilm_at_ratio_half_reloads_bit_identical_and_evaluates(minilm_dir, real_text_dir, tmp_path):
    out = tmp_path / "minilm-50"
    report = lc.compress(str(minilm_dir), out, lc.CompressConfig(ratio=0.5), progress=False)
    assert len(report.layers) == 37 and 0.45 < report.params / report.dense_params <= 0.5
    figures = lc.evaluate_folder(str(minilm_dir), out, real_text_dir / "alice29.txt",
                                 config=EvalConfig(max_paragraphs=64), progress=False)
    assert figures["kind"] == "encoder"
    assert 0.45 < figures["params"]["ratio_targeted"] <= 0.5 and figures["disk"]["ratio"] < 0.8
    again = lc.evaluate_folder(str(minilm_dir), out, real_text_dir / "alice29.txt",
                               config=EvalConfig(max_paragraphs=64), progress=False)
    assert again["drift"] == figures["drift"], "reloading must give the same outputs every time"
    # plain SVD at ratio 0.5 moves MiniLM's hidden states a lot (measured: mean cosine 0.32, rel. error 1.03);
    # the figure follows the cut: a milder one keeps them closer
    lc.compress(str(minilm_dir), tmp_path / "minilm-80", lc.CompressConfig(ratio=0.8), progress=False)
    milder = lc.evaluate_folder(str(minilm_dir), tmp_path / "minilm-80", real_text_dir / "alice29.txt",
                                config=EvalConfig(max_paragraphs=64), progress=False)
    assert figures["drift"]["cosine_mean"] < milder["drift"]["cosine_mean"] < 1
    assert figures["drift"]["hidden_rel_error"] > milder["drift"]["hidden_rel_error"] > 0


def test_smollm2_at_energy_099_stays_close_to_dense(smollm2_dir, real_text_dir, tmp_path):
    out = tmp_path / "smollm2-e99"
    report = lc.compress(str(smollm2_dir), out, lc.CompressConfig(energy=0.99), progress=False)
    assert len(report.layers) == 210
    figures = lc.evaluate_folder(str(smollm2_dir), out, real_text_dir / "alice29.txt",
                                 config=EvalConfig(max_tokens=1024), progress=False)
    ppl = figures["perplexity"]
    assert 10 < ppl["dense"] < 40, "dense SmolLM2 on Alice should be in the twenties"
    assert ppl["compressed"] < 1.2 * ppl["dense"] and figures["drift"]["top1_agreement"] > 0.8
    model = lc.load(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight, "tied embeddings stay tied after reload"
    ids = torch.arange(100, 116).unsqueeze(0)
    assert torch.equal(model(input_ids=ids).logits, lc.load(out)(input_ids=ids).logits)


def test_smollm2_folder_loads_in_plain_transformers_is_smaller_and_lm_eval_scores_it(smollm2_dir, real_text_dir,
                                                                                   tmp_path):
    """The compressed folder as a user elsewhere meets it: transformers alone (trust_remote_code) and
    lm-eval's own command line, against lc.load and `evaluate --tasks`'s bridge."""
    import json
    import os
    import subprocess
    import sys

    import prepare_eval_tasks as tasks
    from helpers import dense, load_with_plain_transformers, outputs, rel_error
    from lora_compress.core.counting import total_params
    from lora_compress.evaluation.lm_eval_tasks import TaskConfig, _task_manager, run_tasks
    from lora_compress.storage.checkpoint import load_tokenizer, resolve_source
    from lora_compress.storage.compressed import weight_bytes

    out = tmp_path / "smollm2-r80"
    lc.compress(str(smollm2_dir), out, lc.CompressConfig(ratio=0.8), progress=False)  # plain SVD: fast, not good
    model = lc.load(out)
    kept = total_params(model) / total_params(dense(smollm2_dir))
    assert kept < 0.9 and weight_bytes(out) <= (kept + 0.01) * weight_bytes(smollm2_dir), "stored once, same dtype"
    inputs = {"input_ids": torch.arange(100, 116).unsqueeze(0)}
    facts, seen = load_with_plain_transformers(out, "AutoModelForCausalLM", inputs, tmp_path)
    assert "no file named model.safetensors" in facts["refusal"]  # format 3: a dense class finds no weights
    assert rel_error(seen, outputs(model, inputs)) <= 1e-6 and facts["params"] == total_params(model)
    assert facts["generated"] == 20

    folder = tasks.prepare(tmp_path / "tasks", real_text_dir)
    config = TaskConfig(("movie_sentiment",), limit=24, include_path=str(folder))
    bridge = run_tasks(model, load_tokenizer(resolve_source(str(smollm2_dir))), config, _task_manager(config))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "m")}
    command = [os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "hf", "--model_args",
               f"pretrained={out},trust_remote_code=True", "--tasks", "movie_sentiment", "--include_path", str(folder),
               "--limit", "24", "--output_path", str(tmp_path / "lm-eval"), "--batch_size", "8"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(next((tmp_path / "lm-eval").rglob("results_*.json")).read_text())
    accuracy = written["results"]["movie_sentiment"]["acc,none"]
    assert round(accuracy * 24) == pytest.approx(accuracy * 24, abs=1e-9), "a share of the 24 examples scored"
    assert accuracy == pytest.approx(bridge["movie_sentiment"]["metrics"]["acc"][0], abs=1e-9)


def test_gemma3_compresses_on_bos_rows_and_written_text_and_stays_close_to_dense(gemma_dir, real_text_dir, tmp_path):
    """Gemma-3-270m (post-norms, a 262k vocabulary, sliding-window attention): the default calibration writes a
    quarter of its rows from prompts, every row starts with BOS, and a 20% cut stays within a few times dense."""
    from lora_compress.calibrate.tokens import calibration_tokens
    from lora_compress.storage.checkpoint import load_tokenizer, resolve_source

    tokenizer = load_tokenizer(resolve_source(str(gemma_dir)))
    rows = calibration_tokens(tokenizer, (real_text_dir / "asyoulik.txt").read_text(), 8, 128)
    assert (rows[:, 0] == tokenizer.bos_token_id).all()
    out = tmp_path / "gemma-20"
    run = lc.RunConfig(calib=str(real_text_dir / "asyoulik.txt"), calib_samples=8, calib_len=128)
    report = lc.compress(str(gemma_dir), out, lc.CompressConfig(budget=0.8), run, progress=False)
    assert len(report.layers) == 18 * 7 and report.calibration["generated"] == 2
    assert report.params <= 0.8 * report.dense_params
    figures = lc.evaluate_folder(str(gemma_dir), out, real_text_dir / "alice29.txt",
                                 config=EvalConfig(max_tokens=512), progress=False)
    ppl = figures["perplexity"]
    assert ppl["dense"] < ppl["compressed"] < 5 * ppl["dense"], ppl
