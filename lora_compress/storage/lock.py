"""One writer per output: an ``fcntl.flock`` on ``.OUT.lock`` beside OUT, held for the whole run.

    @holds_outputs()      around a job (compress, export, extract, heal): the locks claimed inside
                          are held until it returns or raises; SIGTERM meanwhile ends it through
                          its cleanups (SystemExit 143)
    claim(OUT)            take OUT's lock for the innermost open scope (outside any: try it only);
                          another run holding it is one line naming its pid, before any compute

The kernel releases a lock when its process dies, so a killed run never blocks the next one; the
lock file such a run leaves is taken over and removed by the next run into the same place.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

from ..errors import LoraCompressError
from .space import place_error

_held: dict[Path, tuple[int, Path, Path]] = {}  # OUT (resolved) → (lock fd, lock file, OUT's first existing parent)
_scopes: list[list[Path]] = []  # per open holds_outputs(): the outputs claimed inside it


@contextmanager
def holds_outputs():
    """Hold the output locks claimed inside the block (or the decorated call) until it ends, and turn
    SIGTERM into SystemExit(143) meanwhile so that ``finally`` clauses run (main thread only).

    Example:
        >>> @holds_outputs()
        ... def export(folder, out): ...
    """
    _scopes.append([])
    try:
        with _exit_on_sigterm():
            yield
    finally:
        for key in _scopes.pop():
            _release(key)


def claim(out: Path, fix: str | None = None, wait: bool = False) -> None:
    """Take ``out``'s lock for the innermost open :func:`holds_outputs` scope (outside any, only try it);
    ``out``'s missing parents are created (and removed with the lock when still empty): creating the
    lock file is the probe that the place is writable.

    Args:
        fix: the end of the message when the place is not writable (default: choose a writable --out).
        wait: wait for the run holding the lock instead of refusing.

    Raises:
        LoraCompressError: another run writes ``out``, or its place is not writable.
    """
    key = Path(out).expanduser().resolve()
    if key in _held or _other_torchrun_process():
        return
    existing = key.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LoraCompressError(f"cannot write to {out}: {existing} is a file; {fix or 'choose a writable --out'}")
    try:
        key.parent.mkdir(parents=True, exist_ok=True)
        _held[key] = (*_lock(key, out, wait), existing)
    except OSError as error:
        _remove_created_parents(key.parent, existing)
        raise place_error(error, Path(out).parent, fix) from None
    except LoraCompressError:
        _remove_created_parents(key.parent, existing)
        raise
    if _scopes:
        _scopes[-1].append(key)
    else:
        _release(key)


def _lock(key: Path, out: Path, wait: bool) -> tuple[int, Path]:
    """An open, locked ``.OUT.lock`` naming this process (taken again if its holder removed it meanwhile)."""
    lock = key.parent / f".{key.name}.lock"
    while True:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            writer = _writer(descriptor)
            os.close(descriptor)
            raise LoraCompressError(f"{out} is being written by another run (pid {writer.get('pid')} on "
                                    f"{writer.get('host')}); wait for it to finish or choose another --out") from None
        try:
            same = os.path.samestat(os.fstat(descriptor), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
            return descriptor, lock
        os.close(descriptor)


def _writer(descriptor: int) -> dict:
    """The ``{"pid", "host"}`` a lock file names ({} while its holder is still writing it)."""
    try:
        writer = json.loads(os.pread(descriptor, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return writer if isinstance(writer, dict) else {}


def _release(key: Path) -> None:
    descriptor, lock, existing = _held.pop(key)
    lock.unlink(missing_ok=True)  # while still locked: a run waiting on this file takes the next one
    os.close(descriptor)
    _remove_created_parents(key.parent, existing)


def _remove_created_parents(folder: Path, existing: Path) -> None:
    while folder != existing and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def _other_torchrun_process() -> bool:
    """Under torchrun only rank 0 writes the output, so only it holds the lock."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"


@contextmanager
def _exit_on_sigterm():
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
