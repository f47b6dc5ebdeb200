"""Local lm-evaluation-harness tasks over the project's real text, for offline runs (`--include-path`).

    .cache/eval_tasks/
      movie_sentiment.yaml + .jsonl   zero-shot sentiment of human-rated movie-review snippets
                                      (vaderSentiment; |mean rating| >= 1, positive and negative alternate)
      prose_last_word.yaml + .jsonl   the last word of held-out prose paragraphs (LAMBADA-style: alice29,
                                      prose fiction, and lcet10, a report, alternate; neither is calibration text)

    python scripts/prepare_eval_tasks.py            # writes the folder above (needs prepare_examples.py first)
    lora-compress evaluate BASE OUT --tasks movie_sentiment,prose_last_word --include-path .cache/eval_tasks

The YAML files name their data by absolute path, so lm-eval can run them from any directory.
"""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / ".cache" / "eval_tasks"
TEXT = REPO / ".cache" / "text"
SENTIMENT_DOCS = 1000
LAST_WORD_DOCS = 500
_LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{3,})(?P<end>[^A-Za-z\s]*)$", re.DOTALL)

SENTIMENT_YAML = """task: movie_sentiment
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Review: {{{{text}}}}\\nSentiment:"
doc_to_choice: ["negative", "positive"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

LAST_WORD_YAML = """task: prose_last_word
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + word}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
"""


def sentiment_docs(tsv: Path, count: int = SENTIMENT_DOCS, threshold: float = 1.0) -> list[dict]:
    """Snippets rated at least ``threshold`` away from neutral, positive and negative alternating."""
    positive, negative = [], []
    with open(tsv, newline="", encoding="utf-8") as handle:
        for row in csv.reader(handle, delimiter="\t"):
            rating, text = float(row[1]), row[2].strip()
            if abs(rating) >= threshold and text:
                (positive if rating > 0 else negative).append({"text": text, "label": int(rating > 0),
                                                               "rating": rating})
    pairs = zip(positive[: count // 2], negative[: count // 2])
    return [doc for pair in pairs for doc in pair]


def last_word_docs(texts: list[Path], count: int = LAST_WORD_DOCS, words: tuple[int, int] = (20, 150)) -> list[dict]:
    """Paragraphs of ``words`` words that end a sentence, cut before their last word (of 3+ letters),
    the texts taking turns."""
    per_text = []
    for path in texts:
        docs = []
        for paragraph in path.read_text(encoding="utf-8").split("\n\n"):
            paragraph = " ".join(paragraph.split())
            match = _LAST_WORD.match(paragraph)
            ends_a_sentence = match and any(mark in match["end"] for mark in ".!?")
            if ends_a_sentence and words[0] <= len(paragraph.split()) <= words[1]:
                docs.append({"context": match["context"], "word": match["word"], "source": path.name})
        per_text.append(docs)
    mixed = [doc for group in zip(*per_text) for doc in group]
    return mixed[:count]


def write_task(folder: Path, name: str, docs: list[dict], template: str) -> Path:
    """``name.jsonl`` and ``name.yaml`` (naming the data by absolute path) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = (folder / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(template.format(data=data))
    return folder / f"{name}.yaml"


def prepare(folder: Path = TASKS, text: Path = TEXT) -> Path:
    """Both tasks into ``folder`` from the prepared texts in ``text``."""
    write_task(folder, "movie_sentiment", sentiment_docs(text / "vader_movie_reviews.tsv"), SENTIMENT_YAML)
    write_task(folder, "prose_last_word", last_word_docs([text / "alice29.txt", text / "lcet10.txt"]),
               LAST_WORD_YAML)
    return folder


if __name__ == "__main__":
    if not (TEXT / "vader_movie_reviews.tsv").is_file():
        sys.exit(f"{TEXT} lacks the prepared texts; run python scripts/prepare_examples.py first")
    print(f"wrote {prepare()}")
