"""`evaluate --tasks`: lm-evaluation-harness on the dense and the compressed model, over local task files."""
import json
import shutil

import pytest

import prepare_eval_tasks as tasks
from lora_compress.evaluation.lm_eval_tasks import TaskConfig, run_tasks, _task_manager
from lora_compress.storage.checkpoint import load_tokenizer, resolve_source

from conftest import TEXT
from helpers import dense, run

pytest.importorskip("lm_eval")

REVIEWS = [("1", "3.2", "A gorgeous, moving film."), ("2", "-2.5", "Dull and far too long."),
           ("3", "0.1", "It is a film."), ("4", "2.0", "Warm and funny."), ("5", "-3.1", "A tedious mess.")]



@pytest.fixture(scope="module")
def task_folder(tmp_path_factory):
    """Both project tasks, written by scripts/prepare_eval_tasks.py from small local data."""
    root = tmp_path_factory.mktemp("eval-tasks")
    (root / "reviews.tsv").write_text("".join("\t".join(row) + "\n" for row in REVIEWS))
    (root / "prose.txt").write_text(TEXT)
    folder = root / "tasks"
    tasks.write_task(folder, "movie_sentiment", tasks.sentiment_docs(root / "reviews.tsv", 4), tasks.SENTIMENT_YAML)
    tasks.write_task(folder, "prose_last_word", tasks.last_word_docs([root / "prose.txt"], 6, words=(5, 200)),
                     tasks.LAST_WORD_YAML)
    return folder


@pytest.fixture(scope="module")
def llama_with_eos(tiny_models, tmp_path_factory):
    """The tiny Llama, its tokenizer given an end-of-sequence token (lm-eval starts requests with it),
    and a compressed copy."""
    base = tmp_path_factory.mktemp("eos") / "llama"
    shutil.copytree(tiny_models["llama"], base)
    tokenizer = load_tokenizer(resolve_source(str(base)))
    tokenizer.eos_token = "[UNK]"
    tokenizer.save_pretrained(base)
    out = base.parent / "llama-50"
    assert run("compress", base, "--ratio", "0.5", "--out", out, "--quiet").exit_code == 0
    return base, out


def test_task_files_hold_balanced_reviews_and_paragraphs_cut_before_their_last_word(task_folder):
    reviews = [json.loads(line) for line in (task_folder / "movie_sentiment.jsonl").read_text().splitlines()]
    assert [doc["label"] for doc in reviews] == [1, 0, 1, 0], "neutral snippets are dropped, labels alternate"
    paragraphs = [json.loads(line) for line in (task_folder / "prose_last_word.jsonl").read_text().splitlines()]
    assert paragraphs and all(f"{doc['context']} {doc['word']}" in " ".join(TEXT.split()) for doc in paragraphs)
    assert str((task_folder / "prose_last_word.jsonl").resolve()) in (task_folder / "prose_last_word.yaml").read_text()


def test_evaluate_scores_both_models_side_by_side_in_table_json_report_and_card(llama_with_eos, task_folder,
                                                                                 tmp_path, text_file):
    base, out = llama_with_eos
    figures_path = tmp_path / "figures.json"
    result = run("evaluate", base, out, "--text", text_file, "--tasks", "movie_sentiment,prose_last_word",
                 "--limit", "3", "--include-path", task_folder, "--json", figures_path, "--quiet")
    assert result.exit_code == 0, result.output
    figures = json.loads(figures_path.read_text())
    scores = figures["tasks"]
    assert set(scores) == {"movie_sentiment", "prose_last_word"} and "perplexity" in figures
    assert set(scores["prose_last_word"]["metrics"]) == {"acc", "perplexity"}
    assert scores["movie_sentiment"]["samples"] == 3
    last_word = scores["prose_last_word"]["metrics"]["perplexity"]
    assert last_word["dense"] != last_word["compressed"], "the two models are scored apart"
    config = TaskConfig(("prose_last_word",), limit=3, include_path=str(task_folder))
    alone = run_tasks(dense(base), load_tokenizer(resolve_source(str(base))), config, _task_manager(config))
    assert alone["prose_last_word"]["metrics"]["perplexity"][0] == pytest.approx(last_word["dense"], rel=1e-6)
    row = next(line for line in result.output.splitlines() if line.startswith("prose_last_word  perplexity"))
    assert f"{last_word['dense']:.4f}" in row and f"{last_word['compressed']:.4f}" in row
    report = (out / "report" / "report.md").read_text()
    assert "lm-evaluation-harness" in report and "| movie_sentiment | acc |" in report
    card = (out / "README.md").read_text()
    pair = f"{last_word['dense']:.4g} → {last_word['compressed']:.4g}"
    assert f"| lm-eval prose_last_word perplexity, dense → compressed | {pair} |" in card
    assert "![output drift per block](report/drift_per_block.png)" in card, "evaluate puts its plots in the card"
    assert "Figures measured with `lora-compress " in card


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task"], "lm-eval knows no task 'no_such_task' or in"),
    (["--tasks", ","], "names no task"),
    (["--tasks", "prose_last_word", "--limit", "0"], "--limit 0 must be a positive integer"),
    (["--limit", "3"], "--limit and --include-path go with --tasks"),
    ([], "nothing to measure; give --text FILE, --tasks T[,T...], or both"),
])
def test_bad_task_options_give_one_line(llama_with_eos, task_folder, args, message):
    base, out = llama_with_eos
    result = run("evaluate", base, out, "--include-path", task_folder, *args, "--quiet") if "--tasks" in args \
        else run("evaluate", base, out, *args, "--quiet")
    assert result.exit_code == 2 and result.output.count("\n") == 1 and message in result.output, result.output


def test_tasks_on_an_encoder_are_refused_in_one_line(tiny_models, task_folder, tmp_path):
    out = tmp_path / "bert"
    assert run("compress", tiny_models["bert"], "--rank", "4", "--out", out, "--quiet").exit_code == 0
    result = run("evaluate", tiny_models["bert"], out, "--tasks", "prose_last_word", "--include-path", task_folder)
    assert result.exit_code == 2 and "lm-eval tasks score causal language models; BertModel is not one" in result.output
