"""Atomic writes: a temp file in the same folder, then os.replace; the temp is unlinked on any exception.

Files and folders get the modes the umask gives (0644/0755 under 022, 0664/0775 under 002), as open() and mkdir()
would: mkstemp/mkdtemp create them 0600/0700, which would keep a cache shared by a team or restored under another
uid unreadable. Copies are never renames, so a cache on another filesystem than the outputs works.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .faults import checkpoint


def umask() -> int:
    """The process umask, read without changing it (os.umask sets it, racing threads that create files). Read
    each time: writes are few, and a caller may change it between builds."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def make_dir_public(path: Path) -> None:
    """A mkdtemp folder gets the mode mkdir would give it (keeping a setgid bit inherited from a shared parent)."""
    os.chmod(path, (os.stat(path).st_mode & 0o7000) | (0o777 & ~umask()))


def mkdtemp(prefix: str, dir: Path | None) -> Path:
    """A new private-named folder with the umask's mode (tempfile.mkdtemp's are 0700)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    make_dir_public(path)
    return path


def temp_beside(path: Path) -> tuple[int, str]:
    """A new file beside PATH, created exclusively (as tempfile.mkstemp does, without importing tempfile: 15 ms of
    a no-op build's start-up), then given the umask's mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp")
        try:
            fd = os.open(tmp, flags, 0o600)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name beside {path}")
    try:
        os.fchmod(fd, file_mode())
    except BaseException:
        os.close(fd)
        with _suppress():
            os.unlink(tmp)
        raise
    return fd, tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        checkpoint("atomic-write")
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_copy(src: Path, dst: Path) -> None:
    import shutil

    fd, tmp = temp_beside(dst)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


def read_json(path: Path) -> dict | None:
    """The JSON object in path, or None when it is missing or unreadable (a torn or foreign file)."""
    try:
        with open(path, "rb") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)  # type: ignore[arg-type]
