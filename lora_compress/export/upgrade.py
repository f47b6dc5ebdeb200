"""A compressed folder of an older format rewritten in today's (the same tensors, bit for bit).

Format 1 folders carry the base model's own config.json, so transformers alone loads them with
randomly initialised factored layers; format 2 adds the modeling file (storage/remote_code.py).
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from ..errors import LoraCompressError, LoraCompressWarning
from ..methods.registry import get_method
from ..storage.card import compressed_card, write_card
from ..storage.checkpoint import Source, copy_side_files, load_tokenizer
from ..storage.compressed import ADAPTERS, load, read_manifest, write_compressed
from ..storage.manifest import read_json
from ..storage.output import atomic_folder, check_output_folder, holds_outputs

REPORT_DIR = "report"  # report/folder.py's, copied as it is


@holds_outputs()
def upgrade_folder(folder: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write ``folder`` again into ``out`` in today's format: weights, manifest, tokenizer, report, card.

    Example:
        >>> upgrade_folder("out/old-smol", "out/smol")
        >>> AutoModelForCausalLM.from_pretrained("out/smol", trust_remote_code=True)

    Raises:
        LoraCompressError: ``folder`` is not a compressed folder, ``out`` exists or is refused.
    """
    folder, out = Path(folder), Path(out)
    manifest = read_manifest(folder)
    check_output_folder(out, force, inputs=(folder,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraCompressWarning)  # "format 1": what this rewrite is for
        model = load(folder)
    source = Source(folder.resolve(), str(folder))
    with atomic_folder(out, force, inputs=(folder,)) as tmp:
        copy_side_files(source, model, load_tokenizer(source), tmp)
        write_compressed(tmp, model, manifest, adapters=(folder / ADAPTERS).is_file())
        if (folder / REPORT_DIR).is_dir():
            shutil.copytree(folder / REPORT_DIR, tmp / REPORT_DIR)
        images = tuple((path.stem, f"{REPORT_DIR}/{path.name}") for path in sorted((tmp / REPORT_DIR).glob("*.png")))
        card = compressed_card(manifest, _method_summary(manifest.method), _evaluation(folder), images)
        write_card(tmp, card, load_path=str(out))
    return out


def _method_summary(method: str) -> str | None:
    try:
        return get_method(method).summary
    except LoraCompressError:  # a method registered by a script, not in this process
        return None


def _evaluation(folder: Path) -> dict | None:
    """The figures an earlier ``evaluate`` wrote into the report, if any."""
    path = folder / REPORT_DIR / "report.json"
    return read_json(path).get("evaluation") if path.is_file() else None
