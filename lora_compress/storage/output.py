"""Output folders that appear whole or not at all: written in a temporary folder, renamed at the end.

    check_output_folder(OUT, inputs=…)   before any compute: OUT is not an input, nor inside or around
                                         one; its place is writable; temporary folders left there by
                                         killed runs are removed (or reported while their run lives)
    atomic_folder(OUT)                   yields .OUT.tmp-XXXX beside OUT (with a marker naming this
                                         process), renames it to OUT at the end; removes it on an
                                         error, Ctrl-C or SIGTERM
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

from ..errors import LoraCompressError, LoraCompressWarning

MARKER = ".lora_compress_writing"  # inside a temporary folder: {"pid", "host"} of the run writing it


def check_output_folder(out: Path, force: bool = False, inputs=()) -> None:
    """Check ``out`` before any compute: refuse an existing output (unless ``force``), an input, an
    unwritable place; clean up after killed runs.

    Args:
        inputs: the folders the run reads (paths as typed; names that are no local folder are skipped).
            ``out`` may be none of them, nor lie inside one, nor hold one, even with ``force``.

    Raises:
        LoraCompressError: one of the above, naming the fix.
    """
    out = Path(out)
    _check_apart(out, inputs)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise LoraCompressError(f"output folder {out} already exists; choose another --out or pass --force")
    _check_writable(out)
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


def _check_writable(out: Path) -> None:
    """Create (and remove) a temporary folder where OUT's will go, creating no parent for good."""
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=out.parent)).rmdir()
    except OSError as error:
        raise LoraCompressError(f"cannot write to {out.parent} ({error.strerror}); choose a writable --out") from None
    finally:
        _remove_created_parents(out.parent, existing)


def _remove_created_parents(folder: Path, existing: Path) -> None:
    while folder != existing and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


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
def atomic_folder(out: Path, force: bool = False, inputs=()):
    """Yield a temporary folder beside ``out``; rename it to ``out`` only if the block succeeds.

    On an exception, Ctrl-C or SIGTERM the temporary folder is removed (SIGTERM then exits with
    status 143, as an unhandled SIGTERM would).

    Raises:
        LoraCompressError: ``out`` is refused (see check_output_folder), or it cannot be written.
    """
    out = Path(out)
    check_output_folder(out, force, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        (tmp / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    except OSError as error:
        raise LoraCompressError(f"cannot write to {out.parent} ({error.strerror}); choose a writable --out") from None
    try:
        with _exit_on_sigterm():
            yield tmp
            (tmp / MARKER).unlink()
            _honour_umask(tmp)
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.replace(tmp, out)
    except OSError as error:
        raise LoraCompressError(f"writing {out} failed ({error.strerror}); free space or choose another --out") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _exit_on_sigterm():
    """Turn SIGTERM into SystemExit(143) inside the block, so ``finally`` clauses run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _honour_umask(folder: Path) -> None:
    """mkdtemp makes a 0700 folder; give the result the modes a plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
