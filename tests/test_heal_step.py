"""``compress --heal MINUTES``: healing as the compress job's last step. It trains on the compression's own
calibration tokens, the folder loads and says what healing bought, a heal that cannot improve keeps the
unhealed factors (one warning line, exit 0), and what healing cannot do is refused in one line."""
from __future__ import annotations

import importlib
import json

import pytest
import torch
from click.testing import CliRunner

import lora_compress as lc
from lora_compress.cli import main
from lora_compress.errors import LoraCompressError
from lora_compress.storage.compressed import MANIFEST, factored_modules

loop = importlib.import_module("lora_compress.healing.loop")
CALIB = dict(calib_samples=8, calib_len=32, calib_generated=0)


def _compress(model, text_file, out, budget=0.7, **run):
    return lc.compress(str(model), out, lc.CompressConfig(budget=budget),
                       lc.RunConfig(calib=str(text_file), **CALIB, **run), progress=False)


def _factors(folder) -> dict[str, torch.Tensor]:
    model = lc.load(folder)
    return {f"{name}.{key}": getattr(module, key).detach().clone()
            for name, module in factored_modules(model).items() for key in ("lora_A", "lora_B")}


@pytest.fixture(scope="module")
def unhealed(tiny_models, text_file, tmp_path_factory):
    """The tiny llama compressed without healing: what a failed heal must leave."""
    out = tmp_path_factory.mktemp("unhealed") / "llama"
    _compress(tiny_models["llama"], text_file, out)
    return out


def test_compress_heal_trains_the_factors_on_the_calibration_tokens(tiny_models, text_file, tmp_path, unhealed,
                                                                     monkeypatch):
    seen = []
    original = loop.TeacherCache.of

    def spy(teacher, sequences, *args, **kwargs):
        seen.append(sequences.clone())
        return original(teacher, sequences, *args, **kwargs)

    monkeypatch.setattr(loop.TeacherCache, "of", spy)
    out = tmp_path / "healed"
    report = _compress(tiny_models["llama"], text_file, out, budget=0.3, heal_minutes=0.03, heal_lr=1e-2)  # room to heal
    assert torch.equal(seen[0].cpu(), report.tokens)  # the very tokens the compression used
    assert seen[0].shape == (CALIB["calib_samples"], CALIB["calib_len"])
    healing = json.loads((out / MANIFEST).read_text())["healing"]
    assert healing["kept"] == "healed" and healing["held_out_after"] < healing["held_out_before"], healing
    assert healing["tokens_seen"] == healing["steps"] * 2 * CALIB["calib_len"] > 0
    assert healing["tokens"] == {"train": 7 * 32, "held_out": 32}  # one sequence in 8 held out
    _compress(tiny_models["llama"], text_file, tmp_path / "unhealed", budget=0.3)
    before = _factors(tmp_path / "unhealed")
    healed = _factors(out)
    assert healed.keys() == before.keys() and any(not torch.equal(healed[k], before[k]) for k in healed)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(lc.load(out)(ids).logits).all()  # the folder loads and runs
    assert "held-out loss" in (out / "report" / "report.md").read_text()
    assert "healing, held-out calibration loss" in (out / "README.md").read_text()


def test_a_nan_heal_keeps_the_unhealed_factors(tiny_models, text_file, tmp_path, unhealed, monkeypatch):
    distill = loop.distill_loss

    def nan_when_training(*args, **kwargs):
        loss = distill(*args, **kwargs)
        return loss * float("nan") if torch.is_grad_enabled() else loss

    monkeypatch.setattr(loop, "distill_loss", nan_when_training)
    out = tmp_path / "healed"
    result = CliRunner().invoke(main, ["compress", str(tiny_models["llama"]), "--budget", "0.7", "--calib",
                                       str(text_file), "--calib-samples", "8", "--calib-len", "32",
                                       "--calib-generated", "0", "--heal", "0.02",
                                       "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if line.startswith("warning: healing")]
    assert len(warning) == 1 and "NaN" in warning[0] and "kept the unhealed factors" in warning[0]
    healing = json.loads((out / MANIFEST).read_text())["healing"]
    assert healing["kept"] == "unhealed" and healing["stopped"] == "nan"
    healed, before = _factors(out), _factors(unhealed)
    assert all(torch.equal(healed[k], before[k]) for k in before)
    assert "Kept the unhealed factors" in (out / "report" / "report.md").read_text()


def test_a_rising_loss_stops_the_heal_and_keeps_the_unhealed_factors(tiny_models, text_file, tmp_path, unhealed,
                                                                     monkeypatch):
    distill, calls = loop.distill_loss, []

    def rising(*args, **kwargs):  # the training loss doubles every 5 steps; the held-out loss stays finite
        loss = distill(*args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
            return loss * 0 + 2.0 ** (len(calls) / 5)
        return loss

    monkeypatch.setattr(loop, "distill_loss", rising)
    with pytest.warns(lc.LoraCompressWarning, match="^healing stopped at step 20: the training loss rose"):
        _compress(tiny_models["llama"], text_file, tmp_path / "healed", heal_minutes=2)
    healing = json.loads((tmp_path / "healed" / MANIFEST).read_text())["healing"]
    assert healing["kept"] == "unhealed" and healing["stopped"] == "diverged" and healing["steps"] == 20
    healed, before = _factors(tmp_path / "healed"), _factors(unhealed)
    assert all(torch.equal(healed[k], before[k]) for k in before)


@pytest.mark.parametrize("arch, args, message", [
    ("llama", ["--ratio", "0.5", "--heal", "5"], "--heal-minutes trains on the calibration text, and this run has "
                                                 "none; pass --calib FILE"),
    ("llama", ["--budget", "0.7", "--calib", "TEXT", "--heal", "0"], "--heal-minutes 0.0 must be positive"),
    ("llama", ["--budget", "0.7", "--calib", "TEXT", "--heal", "-3"], "--heal-minutes -3.0 must be positive"),
    ("llama", ["--budget", "0.7", "--calib", "TEXT", "--heal", "1", "--heal-lr", "0"], "--heal-lr 0.0 must be"),
    ("t5", ["--ratio", "0.5", "--calib", "TEXT", "--heal", "5"], "this model is an encoder-decoder"),
    ("mixtral", ["--ratio", "0.5", "--method", "shared-basis", "--calib", "TEXT", "--heal", "5"],
     "--method shared-basis shares one basis across experts"),
    ("llama", ["--budget", "0.7", "--calib", "TEXT", "--heal", "5", "--stream"], "this run streams"),
])
def test_compress_heal_refuses_bad_input_in_one_line(arch, args, message, tiny_models, text_file, tmp_path,
                                                     monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("loaded the model before refusing")

    monkeypatch.setattr(importlib.import_module("lora_compress.jobs.compress"), "load_dense", no_load)
    out = tmp_path / "out"
    argv = [a.replace("TEXT", str(text_file)) for a in args]
    result = CliRunner().invoke(main, ["compress", str(tiny_models[arch]), *argv, "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert message in result.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_run_config_refuses_a_bad_heal_in_python():
    with pytest.raises(LoraCompressError, match="^heal_minutes 0 must be positive"):
        lc.RunConfig(calib="x.txt", heal_minutes=0)


def test_a_heal_that_cannot_start_keeps_the_compressed_model(tiny_models, text_file, tmp_path, unhealed, monkeypatch):
    step = importlib.import_module("lora_compress.jobs.heal_step")

    def too_slow(*args, **kwargs):
        raise lc.LoraCompressError("writing 112 teacher sequences took 6.0 of the 5 minutes")

    monkeypatch.setattr(step, "heal_", too_slow)
    with pytest.warns(lc.LoraCompressWarning, match="^healing stopped before training: writing 112"):
        _compress(tiny_models["llama"], text_file, tmp_path / "healed", heal_minutes=5)
    healing = json.loads((tmp_path / "healed" / MANIFEST).read_text())["healing"]
    assert healing["kept"] == "unhealed" and healing["steps"] == 0
    healed, before = _factors(tmp_path / "healed"), _factors(unhealed)
    assert all(torch.equal(healed[k], before[k]) for k in before)
    assert "Kept the unhealed factors" in (tmp_path / "healed" / "report" / "report.md").read_text()


def test_writing_teacher_text_stops_at_its_time_limit():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_compress.healing.teacher_text import DEADLINE_BATCH, teacher_sequences

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=4)).eval()
    sequences = torch.randint(64, (8, 32))
    assert teacher_sequences(teacher, sequences, 40, seed=0).shape == (40, 32)
    assert teacher_sequences(teacher, sequences, 40, seed=0, minutes=1e-9).shape == (DEADLINE_BATCH, 32)
