"""Compression to a quality target (``max_loss_rise``): refusals, the allocation under a cost limit, and a tiny
trained Llama cut to targets of loss rise, predicted against measured."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import TEXT, _tiny_tokenizer, build_llama
from lora_compress.calibrate.tokens import calibration_tokens
from lora_compress.cli import main
from lora_compress.errors import OptionError
from lora_compress.methods.allocate import LayerCost, allocate_within, total_cost
from lora_compress.methods.config import CompressConfig, RunConfig
from lora_compress.pipelines.plan import Plan, compress_
from lora_compress.pipelines.target import held_out_split, tighter_limit


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory):
    """A tiny Llama trained a few steps on TEXT (so cutting it raises its loss), saved with its tokenizer."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("trained_llama")
    vocab = _tiny_tokenizer(folder)
    model = build_llama(folder, vocab=vocab).train()
    ids = calibration_tokens(AutoTokenizer.from_pretrained(folder), TEXT, 8, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder, safe_serialization=True)
    return folder


def _tokens(folder, samples=16, length=24):
    from transformers import AutoTokenizer

    return calibration_tokens(AutoTokenizer.from_pretrained(folder), TEXT, samples, length)


@pytest.mark.parametrize("fields, match", [
    ({"max_loss_rise": 0.2, "budget": 0.5}, r"max_loss_rise chooses the size itself; drop budget"),
    ({"max_loss_rise": 0.2, "rank": 4}, r"drop rank"),
    ({"max_loss_rise": 0.0}, r"max_loss_rise 0.0 must be a positive loss rise in nats"),
    ({"max_loss_rise": -0.1}, r"max_loss_rise -0.1 must be a positive"),
    ({"max_loss_rise": float("nan")}, r"must be a positive"),
])
def test_bad_targets_are_refused_naming_the_fields(fields, match):
    with pytest.raises(OptionError, match=match):
        CompressConfig(**fields)


def test_a_target_needs_calibration_text():
    with pytest.raises(OptionError, match=r"max_loss_rise measures the loss on held-out calibration text; pass calib"):
        Plan.make(CompressConfig(max_loss_rise=0.2), RunConfig())
    with pytest.raises(OptionError, match=r"max_loss_rise .*calibrated method"):
        Plan.make(CompressConfig(max_loss_rise=0.2, method="svd"), RunConfig(calib="x.txt"))
    with pytest.raises(OptionError, match=r"drop stream"):
        Plan.make(CompressConfig(max_loss_rise=0.2), RunConfig(calib="x.txt", stream=True))


def test_an_encoder_is_refused(tiny_models, text_file):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_models["bert"])
    with pytest.raises(OptionError, match=r"max_loss_rise is a rise of the next-token loss.*pass budget"):
        compress_(model, CompressConfig(max_loss_rise=0.2), RunConfig(calib=str(text_file)),
                  tokens=torch.randint(0, 60, (4, 16)), progress=False)


@pytest.mark.parametrize("args, words", [
    (["--max-loss-rise", "0.2", "--budget", "0.5"], "--max-loss-rise chooses the size itself; drop --budget"),
    (["--max-loss-rise", "-1"], "--max-loss-rise -1.0 must be a positive loss rise in nats"),
    (["--max-loss-rise", "0"], "--max-loss-rise 0.0 must be a positive"),
])
def test_cli_refuses_in_one_line(tiny_models, text_file, tmp_path, args, words):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", str(tiny_models["llama"]), "--out", str(out), "--calib",
                                       str(text_file), *args])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"error: {words}"] or words in result.output.strip()
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_refuses_a_target_without_calibration(tiny_models, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", str(tiny_models["llama"]), "--out", str(out),
                                       "--max-loss-rise", "0.2"])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: --max-loss-rise measures the loss on held-out calibration text; pass "
                                     "--calib FILE and a calibrated method (sequential, whiten)")
    assert not out.exists()


def test_held_out_rows_are_one_in_eight_and_left_out_of_the_fit():
    tokens = torch.arange(32 * 3).view(32, 3)
    fit, held = held_out_split(tokens)
    assert len(held) == 4 and len(fit) == 28
    assert held[:, 0].tolist() == [21, 45, 69, 93]  # rows 7, 15, 23, 31
    assert not set(fit[:, 0].tolist()) & set(held[:, 0].tolist())
    with pytest.raises(OptionError, match=r"calib_samples 2 or more"):
        held_out_split(tokens[:1])


def test_a_tighter_limit_scales_by_the_measured_ratio_and_always_shrinks():
    assert tighter_limit(0.2, predicted=0.2, measured=0.4, target=0.2) == pytest.approx(0.2 * 0.9 * 0.5)
    assert tighter_limit(0.2, predicted=0.15, measured=0.25, target=0.2) == pytest.approx(0.2 * 0.9 * 0.15 / 0.25)
    assert tighter_limit(0.2, predicted=0.2, measured=float("inf"), target=0.2) == 0.0
    assert tighter_limit(0.2, predicted=0.0, measured=0.3, target=0.2) == 0.0


def test_allocation_within_a_cost_keeps_it_and_grows_with_a_smaller_limit():
    generator = torch.Generator().manual_seed(0)
    costs = {f"l{i}": LayerCost.from_spectrum((32, 48), torch.rand(32, generator=generator) ** (i + 1) * (i + 1))
             for i in range(6)}
    full = sum(float(c.tail[0]) for c in costs.values())
    params = []
    for share in (0.5, 0.2, 0.05, 0.01):
        ranks = allocate_within(costs, share * full, max_keep=0.9)
        assert total_cost(costs, ranks) <= share * full
        params.append(sum(costs[n].params(r) for n, r in ranks.items()))
    assert params == sorted(params) and params[0] < params[-1]


def test_a_trained_llama_meets_its_target_and_reports_predicted_and_measured(trained_llama):
    from transformers import AutoModelForCausalLM

    tokens = _tokens(trained_llama)
    found = {}
    for target in (0.05, 0.5):
        model = AutoModelForCausalLM.from_pretrained(trained_llama)
        report = compress_(model, CompressConfig(max_loss_rise=target, method="whiten"), RunConfig(calib="text"),
                           tokens=tokens, progress=False)
        result = report.calibration["loss_target"]
        assert result["held_out_sequences"] == 2 and result["max_loss_rise"] == target
        assert result["predicted"] >= 0 and result["measured"] == result["tries"][-1]["measured"]
        assert result["met"] == (result["measured"] <= target)
        assert report.calibration["samples"] == 14  # the held-out rows stay out of the statistics
        found[target] = report.params
    assert found[0.5] <= found[0.05] < report.dense_params


def test_cli_prints_and_records_predicted_and_measured(trained_llama, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compress", str(trained_llama), "--out", str(out), "--calib", str(text),
                                       "--calib-samples", "16", "--calib-len", "24", "--max-loss-rise", "0.3",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    assert "loss rise on 2 held-out calibration sequences" in result.output and "measured" in result.output
    manifest = json.loads((out / "lora_compress.json").read_text())
    assert manifest["settings"]["max_loss_rise"] == 0.3
    measured = manifest["calibration"]["loss_target"]["measured"]
    assert f"measured {measured:.4f} nats" in (out / "report" / "report.md").read_text()
    assert f"/ {measured:.4f} (target 0.3" in (out / "README.md").read_text()
