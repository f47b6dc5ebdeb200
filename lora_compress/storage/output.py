"""Outputs that appear whole or not at all, one writer at a time.

    check_output_folder(OUT, inputs=…)   before any compute: OUT is not an input, nor inside or around
                                         one; no other run writes it (its lock, lock.py, is taken for
                                         the job); its place is writable; temporary folders left there
                                         by killed runs are removed (or reported while their run lives)
    atomic_folder(OUT)                   yields .OUT.tmp-XXXX beside OUT (with a marker naming this
                                         process), renames it to OUT at the end; removes it on an
                                         error, Ctrl-C or SIGTERM; a full disk is one line (space.py)
    check_file_output(PATH, "--json")    before any compute: a file output's folder exists, PATH is no folder
    atomic_file(PATH, "--json")          yields a temporary path beside PATH, renamed to PATH at the end
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from ..errors import LoraCompressError, LoraCompressWarning
from .lock import claim, holds_outputs
from .space import bytes_in, place_error, write_error

MARKER = ".lora_compress_writing"  # inside a temporary folder: {"pid", "host"} of the run writing it


def check_output_folder(out: Path, force: bool = False, inputs=(), fix: str | None = None,
                        wait: bool = False) -> None:
    """Check ``out`` before any compute: refuse an existing output (unless ``force``), an input, an
    output another run is writing, an unwritable place; clean up after killed runs.

    Inside :func:`holds_outputs` (every job, and :func:`atomic_folder`) ``out``'s lock stays taken
    until the scope ends; outside one it is only tried.

    Args:
        inputs: the folders the run reads (paths as typed; names that are no local folder are skipped).
            ``out`` may be none of them, nor lie inside one, nor hold one, even with ``force``.
        fix: what the user should do when ``out`` cannot be written, the end of that message
            (default: choose a writable, or another, --out).
        wait: wait for another run writing ``out`` to finish instead of refusing (a report rewritten
            in place by two runs: the last one's stays).

    Raises:
        LoraCompressError: one of the above, naming the fix.
    """
    out = Path(out)
    _check_apart(out, inputs)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise LoraCompressError(f"output folder {out} already exists; choose another --out or pass --force")
    claim(out, fix, wait)
    clean_stale(out)


def _check_apart(out: Path, inputs) -> None:
    target = out.expanduser().resolve()
    for name in inputs:
        if name is None or not Path(name).expanduser().is_dir():
            continue
        folder = Path(name).expanduser().resolve()
        if target == folder or folder in target.parents:
            raise LoraCompressError(f"--out {out} is the input {name} or inside it; writing there would replace the "
                                    f"input: choose an --out outside it")
        if target in folder.parents:
            raise LoraCompressError(f"--out {out} holds the input {name}; replacing it would delete the input: "
                                    f"choose an --out that does not contain it")


def clean_stale(out: Path) -> list[Path]:
    """Remove the temporary folders beside ``out`` left by killed runs on this host; warn about each, and
    about those whose run still lives or ran elsewhere (kept). Returns the removed folders."""
    removed = []
    for tmp in sorted(Path(out).parent.glob(f".{Path(out).name}.tmp-*")):
        writer = _writer(tmp)
        if writer is None or writer.get("pid") == os.getpid():
            continue
        if writer.get("host") == socket.gethostname() and not _alive(writer.get("pid")):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
            warnings.warn(f"removed {tmp}, a temporary folder left by a killed run (pid {writer.get('pid')})",
                          LoraCompressWarning, stacklevel=3)
        else:
            warnings.warn(f"{tmp} is being written by another run (pid {writer.get('pid')} on "
                          f"{writer.get('host')}) into the same --out; remove it if that run is gone",
                          LoraCompressWarning, stacklevel=3)
    return removed


def _writer(tmp: Path) -> dict | None:
    try:
        return json.loads((tmp / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def atomic_folder(out: Path, force: bool = False, inputs=(), fix: str | None = None, wait: bool = False):
    """Yield a temporary folder beside ``out``; rename it to ``out`` only if the block succeeds.

    On an exception, Ctrl-C or SIGTERM the temporary folder is removed (SIGTERM then exits with
    status 143, as an unhandled SIGTERM would). ``fix`` and ``wait``: see :func:`check_output_folder`.

    Raises:
        LoraCompressError: ``out`` is refused (see check_output_folder), or it cannot be written
            (a full disk: the device, the bytes needed and those free).
    """
    out = Path(out)
    with holds_outputs():
        check_output_folder(out, force, inputs, fix, wait)
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            (tmp / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        except OSError as error:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise place_error(error, out.parent, fix) from None
        try:
            yield tmp
            (tmp / MARKER).unlink()
            _honour_umask(tmp)
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.replace(tmp, out)
        except (OSError, SafetensorError) as error:
            written = bytes_in(tmp)
            shutil.rmtree(tmp, ignore_errors=True)  # first: the free space reported is what the user has
            raise write_error(error, out, written, fix or "choose another --out") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def check_file_output(path: str | Path, flag: str, suffix: str | None = None) -> None:
    """Before any compute: a file output (``--json``, ``--plot``) goes into an existing folder and is no
    folder itself; with ``suffix``, its name ends in it.

    Raises:
        LoraCompressError: naming the option and the fix.
    """
    path = Path(path)
    if suffix and path.suffix.lower() != suffix:
        raise LoraCompressError(f"{flag} {path} does not end in {suffix}; name a {suffix} file, "
                                f"e.g. {path.stem}{suffix}")
    if path.is_dir():
        raise LoraCompressError(f"{flag} {path} is a folder; name a file (in it, or elsewhere)")
    if not path.parent.is_dir():
        raise LoraCompressError(f"{flag} {path}: the folder {path.parent} does not exist; create it or name a file "
                                f"in an existing folder")


@contextmanager
def atomic_file(path: str | Path, flag: str):
    """Yield a temporary path beside ``path`` (checked by :func:`check_file_output`); rename it to
    ``path`` when the block succeeds, remove it otherwise.

    Raises:
        LoraCompressError: the file cannot be written (a full disk: the device, the bytes needed and those free).
    """
    path = Path(path)
    check_file_output(path, flag)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        written = bytes_in(tmp)
        tmp.unlink(missing_ok=True)
        raise write_error(error, path, written, f"choose another {flag}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _honour_umask(folder: Path) -> None:
    """mkdtemp makes a 0700 folder; give the result the modes a plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
