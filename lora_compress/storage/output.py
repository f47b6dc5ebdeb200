"""Output folders that appear whole or not at all: written in a temporary folder, renamed at the end."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import LoraCompressError


def check_output_folder(out: Path, force: bool = False) -> None:
    """Refuse an existing non-empty output folder (or a file there) unless ``force``.

    Raises:
        LoraCompressError: ``out`` exists and ``force`` is False.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise LoraCompressError(f"output folder {out} already exists; choose another --out or pass --force")


@contextmanager
def atomic_folder(out: Path, force: bool = False):
    """Yield a temporary folder beside ``out``; rename it to ``out`` only if the block succeeds.

    Raises:
        LoraCompressError: ``out`` exists (see check_output_folder), or it cannot be written.
    """
    out = Path(out)
    check_output_folder(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as error:
        raise LoraCompressError(f"cannot write to {out.parent} ({error.strerror}); choose a writable --out") from None
    try:
        yield tmp
        _honour_umask(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except OSError as error:
        raise LoraCompressError(f"writing {out} failed ({error.strerror}); free space or choose another --out") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _honour_umask(folder: Path) -> None:
    """mkdtemp makes a 0700 folder; give the result the modes a plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
