"""Reading user text files (evaluation and calibration text) with clear errors."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LoraCompressError


def read_text(path: str | Path, flag: str = "--text") -> str:
    """The text of a plain-text file, or of the ``text`` fields of a .jsonl file.

    Windows line endings become ``\\n``.

    Raises:
        LoraCompressError: a folder, or a file missing, unreadable, empty, not UTF-8, or a .jsonl without
            text fields.
    """
    path = Path(path)
    if path.is_dir():
        raise LoraCompressError(f"{flag} {path} is a folder; pass a UTF-8 text file (.txt, or .jsonl with a "
                                f"text field)")
    if not path.is_file():
        raise LoraCompressError(f"{flag} file {path} does not exist; pass a UTF-8 text file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LoraCompressError(f"{flag} file {path} is not UTF-8 (byte {error.start}); "
                                f"convert it, e.g. iconv -t utf-8") from None
    except OSError as error:
        raise LoraCompressError(f"{flag} file {path} cannot be read ({error.strerror}); make it readable") from None
    text = _jsonl_text(raw, path, flag) if path.suffix == ".jsonl" else raw.replace("\r\n", "\n")
    if not text.strip():
        raise LoraCompressError(f"{flag} file {path} is empty; pass a file with text in it")
    return text


def _jsonl_text(raw: str, path: Path, flag: str) -> str:
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(str(json.loads(line)["text"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LoraCompressError(f"{flag} file {path} line {number} is not a JSON object with a "
                                    f"\"text\" field; fix that line") from None
    return "\n\n".join(texts)


def paragraphs(text: str, min_chars: int = 40) -> list[str]:
    """Blank-line separated paragraphs of at least ``min_chars`` characters."""
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) >= min_chars]
