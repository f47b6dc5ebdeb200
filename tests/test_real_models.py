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
    assert 0 < figures["drift"]["cosine_mean"] < 1
    again = lc.evaluate_folder(str(minilm_dir), out, real_text_dir / "alice29.txt",
                               config=EvalConfig(max_paragraphs=64), progress=False)
    assert again["drift"] == figures["drift"], "reloading must give the same outputs every time"


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
