"""A full disk in one line: "no space left on DEVICE: N needed, M free", before writing when the size is
known (:func:`reserve`), else when a write fails (:func:`write_error`)."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

from ..errors import LoraCompressError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def reserve(folder: Path, needed: int, fix: str = "choose another --out") -> None:
    """Refuse to write ``needed`` bytes into ``folder`` when its device has fewer free.

    Raises:
        LoraCompressError: no space left on the device (naming it, the bytes needed and those free).
    """
    if shutil.disk_usage(folder).free < needed:
        raise no_space(folder, needed, fix)


def write_error(error: Exception, target: Path, written: int, fix: str) -> LoraCompressError:
    """The one line for a failed write of ``target`` (which had ``written`` bytes when it failed, now
    removed): a full device, or the system's reason.

    Args:
        error: an OSError, or safetensors' error (which reports the OS error in its text).
    """
    if _no_space(error):
        return no_space(target.parent, written, fix, failed=True)
    reason = error.strerror if isinstance(error, OSError) else str(error)
    return LoraCompressError(f"writing {target} failed ({reason}); {fix}")


def place_error(error: OSError, folder: Path, fix: str | None = None) -> LoraCompressError:
    """The one line for a folder in which nothing can be created: a full device, or the system's reason."""
    if error.errno in NO_SPACE:
        return no_space(folder, 0, fix or "choose another --out", failed=True)
    return LoraCompressError(f"cannot write to {folder} ({error.strerror}); {fix or 'choose a writable --out'}")


def _no_space(error: Exception) -> bool:
    if isinstance(error, OSError):
        return error.errno in NO_SPACE
    return any(f"(os error {code})" in str(error) for code in NO_SPACE)


def no_space(folder: Path, needed: int, fix: str, failed: bool = False) -> LoraCompressError:
    """The one line for a full device: which device, the bytes needed, the bytes free now.

    ``failed``: a write ran out of space after ``needed`` bytes (removed since); what it needs is more
    than those, and more than is free now.
    """
    mount = _mount_point(folder)
    free = shutil.disk_usage(mount).free
    needed = f"more than {size(max(needed, free))}" if failed else size(needed)
    return LoraCompressError(f"no space left on {mount}{_device(mount)}: {needed} needed, {size(free)} free; "
                             f"free space or {fix}")


def size(count: int) -> str:
    """Bytes for people: ``1.25 GB``, ``980 kB``, ``12 B``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count} B"


def _mount_point(folder: Path) -> Path:
    path = Path(folder).resolve()
    while not path.exists():
        path = path.parent
    while path != path.parent and path.parent.stat().st_dev == path.stat().st_dev:
        path = path.parent
    return path


def _device(mount: Path) -> str:
    """`` (tmpfs)``, `` (/dev/sda1)``: what /proc/mounts says is mounted there (nothing when unknown)."""
    try:
        mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return ""
    devices = [fields[0] for fields in mounts if len(fields) > 1 and fields[1] == str(mount)]
    return f" ({devices[-1]})" if devices else ""


def bytes_in(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (0 when there is none)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
