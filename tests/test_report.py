"""Reports: report.md/report.json beside the outputs, PNG plots, per-block drift, compare."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from helpers import dense, inputs_for
from lora_compress.report import folder as report, plots
from lora_compress.cli import main
from lora_compress.calibrate.blocks import block_stack, split_name
from lora_compress.core.targets import find_targets
from lora_compress.errors import LoraCompressError
from lora_compress.storage.manifest import Manifest
from lora_compress.evaluation.drift import block_drift
from lora_compress.jobs.compress import compress
from lora_compress.pipelines.plan import compress_
from lora_compress.methods.config import CompressConfig
from lora_compress.calibrate.collectors import LayerStatistics
from lora_compress.report.spectra import layer_spectra, spectrum_table

PNG = b"\x89PNG\r\n\x1a\n"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 5_000


@pytest.fixture(scope="module")
def evaluated(tiny_models, tmp_path_factory, text_file):
    """A tiny Llama compressed at ratio 0.5 and evaluated through the CLI: (folder, json path, output)."""
    root = tmp_path_factory.mktemp("report")
    out, figures = root / "llama-50", root / "figures.json"
    assert run("compress", tiny_models["llama"], "--ratio", "0.5", "--out", out, "--quiet").exit_code == 0
    result = run("evaluate", tiny_models["llama"], out, "--text", text_file, "--json", figures, "--quiet")
    assert result.exit_code == 0, result.output
    return out, figures, result.output


def test_compress_writes_a_report_inside_its_output(tiny_models, tmp_path):
    out = tmp_path / "bert-50"
    compress(str(tiny_models["bert"]), out, CompressConfig(ratio=0.5), progress=False)
    written = json.loads((out / "report" / "report.json").read_text())
    manifest = json.loads((out / "lora_compress.json").read_text())
    assert written["layers"] == manifest["layers"] and written["evaluation"] is None
    assert written["cut"] == "ratio 0.5, svd"
    markdown = (out / "report" / "report.md").read_text()
    assert "# Compression report: bert, ratio 0.5, svd" in markdown and manifest["command"] in markdown
    assert "`encoder.layer.1.output.dense`" in markdown and "Not measured yet" in markdown
    assert is_png(out / "report" / "ranks.png") and is_png(out / "report" / "energy.png")
    assert not any(p.name.startswith(".") for p in out.rglob("*"))  # no temp folders left behind


def test_report_json_holds_exactly_the_figures_evaluate_printed(evaluated):
    out, figures_path, output = evaluated
    figures = json.loads(figures_path.read_text())
    written = json.loads((out / "report" / "report.json").read_text())
    assert written["evaluation"] == figures
    assert f"{figures['perplexity']['compressed']:.4g}" in output
    assert f"{figures['perplexity']['dense']:.4g}" in (out / "report" / "report.md").read_text()
    assert f"wrote {out / 'report'}" in output
    assert written["evaluate_command"].startswith("lora-compress ")  # sys.argv: pytest's under CliRunner


def test_evaluate_writes_its_figures_and_plots_into_the_model_card(evaluated):
    out, figures_path, _ = evaluated
    figures, card = json.loads(figures_path.read_text()), (out / "README.md").read_text()
    ppl = figures["perplexity"]
    assert f"| perplexity on text.txt, dense → compressed | {ppl['dense']:.4g} → {ppl['compressed']:.4g} |" in card
    assert "![output drift per block](report/drift_per_block.png)" in card
    assert is_png(out / "report" / "drift_per_block.png")
    assert "not measured at compress time" not in card


def test_evaluate_measures_drift_for_every_block(evaluated):
    out, figures_path, output = evaluated
    blocks = json.loads(figures_path.read_text())["blocks"]
    assert blocks["stack"] == "model.layers" and len(blocks["cumulative"]) == len(blocks["local"]) == 2
    assert blocks["local"][0] == pytest.approx(blocks["cumulative"][0])  # block 0 sees the same input
    assert all(0 < e < 10 for e in blocks["cumulative"] + blocks["local"])
    assert "drift per block: largest local error" in output
    assert is_png(out / "report" / "drift_per_block.png")
    assert "![output drift per block](drift_per_block.png)" in (out / "report" / "report.md").read_text()


def test_evaluate_no_report_leaves_the_report_alone(tiny_models, tmp_path, text_file):
    out = tmp_path / "gpt2-50"
    compress(str(tiny_models["gpt2"]), out, CompressConfig(ratio=0.5), progress=False)
    before = (out / "report" / "report.json").read_text()
    result = run("evaluate", tiny_models["gpt2"], out, "--text", text_file, "--no-report", "--max-tokens", 200,
                 "--quiet")  # the tiny GPT-2 has 256 positions
    assert result.exit_code == 0, result.output
    assert (out / "report" / "report.json").read_text() == before
    assert not (out / "report" / "drift_per_block.png").exists()


def test_block_drift_is_zero_for_a_copy_and_grows_as_the_cut_deepens(tiny_models):
    model = dense(tiny_models["llama"])
    inputs = {**inputs_for(model, length=16), "use_cache": False}
    assert block_drift(model, copy.deepcopy(model), [inputs])["cumulative"] == [0.0, 0.0]
    errors = []
    for ratio in (0.8, 0.3):
        compressed = copy.deepcopy(model)
        compress_(compressed, CompressConfig(ratio=ratio), progress=False)
        errors.append(block_drift(model, compressed, [inputs]))
    assert all(deep > light for deep, light in zip(errors[1]["local"], errors[0]["local"]))
    assert errors[1]["tokens"] == 2 * 16


def test_block_drift_leaves_padding_out(tiny_models):
    model = dense(tiny_models["bert"])
    compressed = copy.deepcopy(model)
    compress_(compressed, CompressConfig(ratio=0.5), progress=False)
    ids = inputs_for(model, batch=2, length=10)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    result = block_drift(model, compressed, [{"input_ids": ids, "attention_mask": mask}])
    assert result["stack"] == "encoder.layer" and result["tokens"] == 16


def test_find_blocks_is_none_without_a_stack():
    assert block_stack(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None


@pytest.mark.parametrize("name, expected", [
    ("model.layers.3.self_attn.q_proj", (3, "self_attn.q_proj")),
    ("encoder.layer.11.attention.output.dense", (11, "attention.output.dense")),
    ("transformer.h.0.attn.c_attn", (0, "attn.c_attn")),
    ("pooler.dense", (None, "pooler.dense")),
])
def test_split_name_separates_block_and_layer_type(name, expected):
    assert split_name(name) == expected


def test_spectra_hold_all_singular_values_and_rank_for_energy(tiny_models):
    model = dense(tiny_models["llama"])
    targets = find_targets(model)
    spectra = layer_spectra(targets, progress=False)
    first = spectra[0]
    assert torch.allclose(first.singular_values, torch.linalg.svdvals(targets[first.name].weight.double()), atol=1e-5)
    assert first.rank_for(1.0) <= min(first.shape) and first.rank_for(0.5) < first.rank_for(0.99)
    assert torch.all(first.energy().diff() >= 0) and first.energy()[-1] == pytest.approx(1.0)
    table = spectrum_table(spectra)
    assert "self_attn.q_proj" in table and "mlp.down_proj" in table and "rank @99% energy" in table


def test_whitened_spectra_differ_from_plain_ones(tiny_models):
    model = dense(tiny_models["llama"])
    targets = find_targets(model, include=("q_proj",))
    scale = torch.linspace(0.1, 3.0, 32, dtype=torch.float64)  # inputs with very unequal channels
    plain = layer_spectra(targets, progress=False)
    stats = {name: LayerStatistics({"output_gram": m.weight.double() @ torch.diag(scale ** 2) @ m.weight.double().T,
                                    "input_diagonal": scale ** 2}, 1) for name, m in targets.items()}  # wide layers
    W = targets[plain[0].name].weight.double()
    whitened = layer_spectra(targets, stats, shrinkage=0.3, progress=False)  # a diagonal C: shrinking keeps it
    expected = torch.linalg.svdvals(W * scale)
    assert torch.allclose(whitened[0].singular_values, expected, rtol=1e-4)
    assert not torch.allclose(whitened[0].singular_values, plain[0].singular_values, rtol=1e-2)


def test_inspect_spectrum_prints_a_table_and_draws_pngs(tiny_models, tmp_path):
    result = run("inspect", tiny_models["gpt2"], "--spectrum", "--plot", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    assert "plain spectra" in result.output and "attn.c_attn" in result.output
    assert is_png(tmp_path / "plots" / "spectrum.png") and is_png(tmp_path / "plots" / "energy.png")


def test_inspect_whitened_spectra_from_calibration_text(tiny_models, tmp_path, text_file):
    long_text = tmp_path / "long.txt"
    long_text.write_text(text_file.read_text() * 20)
    result = run("inspect", tiny_models["llama"], "--calib", long_text, "--plot", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    assert "whitened spectra" in result.output
    assert is_png(tmp_path / "plots" / "spectrum_whitened.png") and is_png(tmp_path / "plots" / "energy_whitened.png")


def test_inspect_calib_too_short_is_one_clear_line(tiny_models, text_file):
    result = run("inspect", tiny_models["llama"], "--calib", text_file)
    assert result.exit_code == 2 and "error: calibration text has 512 tokens" in result.output


def _fake_manifest(blocks: int = 4) -> dict:
    layers = {f"model.layers.{b}.{kind}": {"shape": [64, 32], "rank": None if kind == "mlp.up_proj" and b == 0
                                           else 8, "bias": False, "energy_kept": 0.9, "note": ""}
              for b in range(blocks) for kind in ("self_attn.q_proj", "mlp.up_proj")}
    manifest = {"base_model": "models/tiny", "model_class": "LlamaForCausalLM", "method": "svd", "dtype": "float32",
                "settings": {"ratio": 0.5, "method": "svd"}, "command": "lora-compress compress ...",
                "targeted_params": {"dense": 16384, "compressed": 7000}, "layers": layers,
                "healing": {"history": [{"step": s, "minutes": s / 60, "loss": 2.0 / s} for s in range(1, 30)],
                            "held_out_before": 2.1, "held_out_after": 0.3, "steps": 29, "minutes": 0.5,
                            "stopped": "steps", "settings": {"loss": "kl"}}}
    return manifest


@pytest.mark.slow
def test_plots_render_without_a_display_and_without_pyplot(tmp_path):
    script = (f"import json, sys; from pathlib import Path; from lora_compress.report import folder as report; "
              f"from lora_compress.storage.manifest import Manifest; "
              f"manifest = json.loads(Path({str(tmp_path / 'manifest.json')!r}).read_text()); "
              f"images, note = report.draw_plots(report.build_report(Manifest.from_dict(manifest), {{'blocks': "
              f"{{'stack': 'model.layers', 'tokens': 9, 'cumulative': [0.1, 0.2, 0.4, 0.5], "
              f"'local': [0.1, 0.15, 0.3, 0.1]}}}}), Path({str(tmp_path)!r})); "
              f"print(sorted(images), 'matplotlib.pyplot' in sys.modules)")
    (tmp_path / "manifest.json").write_text(json.dumps(_fake_manifest()))
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND", "WAYLAND_DISPLAY")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['drift', 'energy', 'healing', 'ranks'] False"
    for name in ("ranks", "energy", "drift_per_block", "healing_loss"):
        assert is_png(tmp_path / f"{name}.png")


def test_healing_history_in_the_manifest_gets_a_section_and_a_plot(tmp_path):
    (tmp_path / "lora_compress.json").write_text(json.dumps({**_fake_manifest(), "format_version": 1}))
    folder = report.write_report(tmp_path)
    markdown = (folder / "report.md").read_text()
    assert "## Healing" in markdown and "held-out loss 2.1 → 0.3" in markdown
    assert "healed" in json.loads((folder / "report.json").read_text())["cut"]
    assert is_png(folder / "healing_loss.png")


def test_calibration_facts_appear_in_the_markdown():
    calibration = {"samples": 32, "length": 256, "text": "asyoulik.txt", "seconds": 48.0, "peak_memory_mb": 900.5}
    built = report.build_report(Manifest.from_dict({**_fake_manifest(), "calibration": calibration}))
    markdown = report.render_markdown(built, {})
    assert "- calibration: 32 × 256 tokens of `asyoulik.txt`, 48.0 s, peak memory 900.5 MiB" in markdown


def test_without_matplotlib_plots_fail_clearly_and_reports_still_write(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "available", lambda: False)
    with pytest.raises(LoraCompressError, match="plots need matplotlib, which cannot be imported"):
        plots.drift_per_block({"stack": "s", "tokens": 1, "cumulative": [1.0], "local": [1.0]}, "t", tmp_path / "x.png")
    (tmp_path / "lora_compress.json").write_text(json.dumps({**_fake_manifest(), "format_version": 1}))
    folder = report.write_report(tmp_path)
    assert "Plots skipped" in (folder / "report.md").read_text() and not list(folder.glob("*.png"))


def test_compare_prints_one_table_and_draws_quality_vs_parameters(evaluated, tiny_models, tmp_path, text_file):
    other = tmp_path / "llama-80"
    compress(str(tiny_models["llama"]), other, CompressConfig(ratio=0.8), progress=False)
    unevaluated = tmp_path / "llama-30"
    compress(str(tiny_models["llama"]), unevaluated, CompressConfig(ratio=0.3), progress=False)
    assert run("evaluate", tiny_models["llama"], other, "--text", text_file, "--quiet").exit_code == 0
    result = run("compare", evaluated[0], other, unevaluated, "--plot", tmp_path / "sweep.png")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["run", "cut", "targeted"] and "ppl compressed" in lines[0]
    assert any(line.startswith("llama-80") and "ratio 0.8, svd" in line for line in lines)
    assert "not evaluated yet" in result.output
    assert is_png(tmp_path / "sweep.png") and f"wrote {tmp_path / 'sweep.png'}" in result.output
    assert not list(tmp_path.glob(".sweep.png*")), "the temporary file is renamed to exactly --plot"


def test_compare_rejects_runs_of_different_base_models(evaluated, tiny_models, tmp_path):
    other = tmp_path / "gpt2-50"
    compress(str(tiny_models["gpt2"]), other, CompressConfig(ratio=0.5), progress=False)
    result = run("compare", evaluated[0], other)
    assert result.exit_code == 2
    assert result.output.startswith("error: runs come from different base models: llama-50 from ")
    assert result.output.strip().endswith("compare runs of one base model")


def test_compare_accepts_one_base_model_named_by_relative_and_absolute_paths(evaluated, tiny_models, tmp_path,
                                                                            monkeypatch):
    monkeypatch.chdir(tiny_models["llama"].parent)
    assert run("compress", "llama", "--ratio", "0.8", "--out", tmp_path / "llama-80", "--quiet").exit_code == 0
    result = run("compare", evaluated[0], tmp_path / "llama-80")  # the first run named it by its absolute path
    assert result.exit_code == 0, result.output


def test_compare_rejects_a_folder_that_is_no_run(tmp_path):
    result = run("compare", tmp_path)
    assert result.exit_code == 2 and "lora_compress.json" in result.output


@pytest.mark.real
def test_minilm_report_after_compress_and_evaluate(minilm_dir, real_text_dir, tmp_path):
    out, figures = tmp_path / "minilm-50", tmp_path / "figures.json"
    assert run("compress", minilm_dir, "--ratio", "0.5", "--out", out, "--quiet").exit_code == 0
    result = run("evaluate", minilm_dir, out, "--text", real_text_dir / "alice29.txt", "--json", figures, "--quiet")
    assert result.exit_code == 0, result.output
    written = json.loads((out / "report" / "report.json").read_text())
    assert written["evaluation"] == json.loads(figures.read_text())
    assert len(written["evaluation"]["blocks"]["local"]) == 6
    assert written["evaluation"]["blocks"]["cumulative"][-1] > written["evaluation"]["blocks"]["cumulative"][0]
    for name in ("ranks", "energy", "drift_per_block"):
        assert is_png(out / "report" / f"{name}.png")
