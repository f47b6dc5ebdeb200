"""examples/: each script runs as a user runs it (a fresh interpreter, from the repository root), on tiny
random models in the fast set and on the prepared real models under ``-m real``; each says in one line
which command prepares a missing model, with exit code 2."""
from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import prepare_eval_tasks as eval_tasks
from conftest import TEXT

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("[0-9][0-9]_*.py"))
REVIEWS = [("1", "3.2", "A gorgeous, moving film."), ("2", "-2.5", "Dull and far too long."),
           ("3", "0.1", "It is a film."), ("4", "2.0", "Warm and funny."), ("5", "-3.1", "A tedious mess.")]


def example(name: str, *args, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run examples/NAME with ``args`` in a fresh interpreter; stdin closed, as in a pipeline."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = next(path for path in EXAMPLES if path.name.startswith(name))
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=REPO, env=env, text=True,
                            capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"{script.name}: {time.perf_counter() - start:.0f} s wall, {cpu:.0f} s CPU")  # shown with pytest -s
    return result


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_six_examples_each_short_and_saying_what_it_shows_and_prints():
    assert [path.name[:2] for path in EXAMPLES] == ["01", "02", "03", "04", "05", "06"]
    for path in EXAMPLES:
        source = path.read_text()
        assert len(source.splitlines()) <= 70, path.name
        docstring = source.split('"""')[1]
        assert "Prints" in docstring or "prints" in docstring, f"{path.name}: say what it prints"


@pytest.fixture(scope="module")
def llama(tiny_models, tmp_path_factory) -> Path:
    """The tiny Llama with an end-of-sequence token (lm-eval starts its requests with it)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("examples") / "llama"
    shutil.copytree(tiny_models["llama"], folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.eos_token = "[UNK]"
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def compressed(llama, text_file) -> tuple[Path, str]:
    """examples/02 run on the tiny Llama: its folder and what it printed."""
    out = llama.parent / "llama-80"
    stdout = ok(example("02", "--model", llama, "--calib", text_file, "--text", text_file, "--out", out,
                        "--calib-samples", 4, "--calib-len", 16))
    return out, stdout


def test_01_the_toy_rebuilds_exactly_and_the_real_layer_error_falls_with_rank(llama):
    stdout = ok(example("01", "--model", llama))
    assert "B (10, 2), A (2, 10): 100 parameters against 40" in stdout
    assert float(re.search(r"\(B·\(A·x\) \+ b\)\| = (\S+)", stdout).group(1)) < 1e-4
    errors = [float(line.split()[-1]) for line in stdout.splitlines() if re.match(r"\s+\d+\s+\S+%\s+\S+$", line)]
    assert len(errors) >= 3 and errors == sorted(errors, reverse=True) and errors[-1] < 1e-4


def test_02_compresses_and_compares_perplexity(compressed):
    out, stdout = compressed
    assert (out / "lora_compress.json").exists() and (out / "modeling_lora_compressed.py").exists()
    dense, small = map(float, re.search(r"dense ([\d.]+), compressed ([\d.]+)", stdout).groups())
    assert dense > 1 and small > 1
    kept = float(re.search(r"([\d.]+)% of the targeted weights kept", stdout).group(1))
    assert 60 < kept <= 80.05  # budget=0.8: at most 80% (a layer's rank is whole)


def test_03_transformers_alone_loads_the_folder_and_generates(compressed):
    stdout = ok(example("03", "--folder", compressed[0], "--prompt", "Alice was beginning", "--tokens", 5))
    assert "LoraCompressed" in stdout and stdout.strip().splitlines()[-1].startswith("'Alice was beginning")


def test_04_extracts_a_fine_tune_that_peft_loads_and_that_comes_closer_than_the_base(llama, tmp_path):
    tuned = tmp_path / "tuned"
    shutil.copytree(llama, tuned)
    tensors = load_file(tuned / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    for name in [n for n in tensors if n.endswith("proj.weight")]:  # a low-rank "fine-tune" of every projection
        out_dim, in_dim = tensors[name].shape
        tensors[name] = tensors[name] + 0.05 * torch.randn(out_dim, 2, generator=generator) @ \
            torch.randn(2, in_dim, generator=generator)
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    stdout = ok(example("04", "--base", llama, "--tuned", tuned, "--rank", 4, "--out", tmp_path / "adapter",
                        "--sentence", "Alice was beginning to get very tired"))
    base, adapted = map(float, re.search(r"base ([\d.]+), base \+ adapter ([\d.e-]+)", stdout).groups())
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert adapted < 0.01 * base  # rank 4 holds the rank-2 deltas


def test_05_lm_eval_scores_the_folder(compressed, tmp_path):
    (tmp_path / "reviews.tsv").write_text("".join("\t".join(row) + "\n" for row in REVIEWS))
    (tmp_path / "prose.txt").write_text(TEXT)
    tasks = tmp_path / "tasks"
    eval_tasks.write_task(tasks, "movie_sentiment", eval_tasks.sentiment_docs(tmp_path / "reviews.tsv", 4),
                          eval_tasks.SENTIMENT_YAML)
    stdout = ok(example("05", "--folder", compressed[0], "--tasks", "movie_sentiment", "--include-path", tasks,
                        "--limit", 3))
    assert re.search(r"movie_sentiment \(3 documents\): acc [\d.]+ ± [\d.]+", stdout)


def test_06_a_method_registered_in_the_script_runs(llama, text_file):
    stdout = ok(example("06", "--model", llama, "--calib", text_file, "--text", text_file, "--calib-samples", 4,
                        "--calib-len", 16, "--ratio", 0.5))
    figures = dict(re.findall(r"(\w+): perplexity ([\d.]+)", stdout))
    assert set(figures) == {"dense", "svd", "asvd"}
    assert figures["svd"] != figures["asvd"]  # the statistic reached the handler


@pytest.mark.parametrize("name, args, command", [
    ("01", ["--model", "missing"], "python scripts/prepare_examples.py"),
    ("02", ["--model", "missing"], "python scripts/prepare_examples.py"),
    ("03", ["--folder", "missing"], "python examples/02_compress_and_evaluate.py"),
    ("04", ["--tuned", "missing"], "python scripts/make_finetune.py"),
    ("05", ["--folder", "missing"], "python examples/02_compress_and_evaluate.py"),
    ("06", ["--model", "missing"], "python scripts/prepare_examples.py"),
])
def test_a_missing_model_names_the_command_that_prepares_it(name, args, command, tmp_path):
    result = example(name, *[tmp_path / a if a == "missing" else a for a in args])
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout.strip().count("\n") == 0 and command in result.stdout
    assert (REPO / command.split()[1]).exists()


SLOW = 2400  # seconds a real example may take on a busy shared 2-core machine (minutes when quiet)


@pytest.fixture(scope="module")
def real_folder(smollm2_dir, real_text_dir, tmp_path_factory) -> tuple[Path, str]:
    """examples/02 on SmolLM2 with its defaults: the folder and what it printed."""
    out = tmp_path_factory.mktemp("real-examples") / "smol-80"
    return out, ok(example("02", "--out", out, timeout=SLOW))


@pytest.mark.real
def test_01_on_a_real_layer(smollm2_dir):
    stdout = ok(example("01"))
    errors = [float(line.split()[-1]) for line in stdout.splitlines() if re.match(r"\s+\d+\s+\S+%\s+\S+$", line)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.5  # real weights are not low rank


@pytest.mark.real
def test_02_on_smollm2_stays_near_dense(real_folder):
    dense, small = map(float, re.search(r"dense ([\d.]+), compressed ([\d.]+)", real_folder[1]).groups())
    assert small < 3 * dense  # activation-aware: plain SVD at this cut is in the millions


@pytest.mark.real
def test_03_on_smollm2(real_folder):
    assert "'Alice was beginning" in ok(example("03", "--folder", real_folder[0], timeout=SLOW))


@pytest.mark.real
def test_04_on_the_movies_fine_tune(smollm2_dir, tmp_path):
    if not (REPO / ".cache/models/SmolLM2-135M-movies").exists():
        pytest.skip("SmolLM2-135M-movies missing: run python scripts/make_finetune.py")
    stdout = ok(example("04", "--out", tmp_path / "adapter", timeout=SLOW))
    base, adapted = map(float, re.search(r"base ([\d.]+), base \+ adapter ([\d.e-]+)", stdout).groups())
    assert adapted < base


@pytest.mark.real
def test_05_on_smollm2(real_folder):
    if not (REPO / ".cache/eval_tasks").is_dir():
        pytest.skip(".cache/eval_tasks missing: run python scripts/prepare_eval_tasks.py")
    assert "movie_sentiment (20 documents): acc" in ok(example("05", "--folder", real_folder[0], timeout=SLOW))


@pytest.mark.real
def test_06_on_smollm2(smollm2_dir, real_text_dir):
    figures = dict(re.findall(r"(\w+): perplexity ([\d.]+)", ok(example("06", timeout=SLOW))))
    assert float(figures["asvd"]) < float(figures["svd"])  # the activation scale pays on a real model
