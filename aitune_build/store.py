"""The content-addressed artifact store. Knows nothing of torch.

    <cache>/CACHEDIR.TAG, <cache>/.gitignore ("*")
    <cache>/store-v1/objects/<key[:2]>/<key>/{<artifact files>, entry.json}
    <cache>/store-v1/locks/<key>.lock, gpu-<uuid>.lock (gpus.GpuPool: one compile per GPU)
    <cache>/store-v1/tmp/

An entry is a folder built under tmp/ and renamed into place, so readers never see half of one. entry.json, written
last, lists every file's size and digests; an entry whose files don't match it is corrupt: discarded with a warning,
never served. One lock per key: two processes never build the same key twice. Files and folders get the umask's
modes, so a team shares a cache through a group-writable setgid folder and umask 002; a cache this process cannot
write is read only, and builds go to a private temp folder. Opening the store removes older store-v*/state-v*.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from filelock import FileLock

from .faults import checkpoint
from .fsutil import atomic_write_bytes, atomic_write_json, mkdtemp, read_json
from .hashing import STATE_VERSION, StateCache, hash_file, sha256_file

STORE_VERSION = 1
STORE_DIR = f"store-v{STORE_VERSION}"
ENTRY_FORMAT = 1
CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by aitune-build.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)


def _writable(store: Path) -> bool:
    """Whether this process can create the store's folders and write into them (False for a read-only mount or a
    team cache this user may only read)."""
    try:
        for sub in ("objects", "locks", "tmp"):
            (store / sub).mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return all(os.access(store / sub, os.W_OK | os.X_OK) for sub in ("objects", "locks", "tmp"))


def _prune_old_versions(cache_dir: Path) -> None:
    """Remove the stores and state files of older formats, which nothing reads any more (as uv prunes old buckets).
    One listing of the cache root, done when the store is opened (a no-op build never opens it)."""
    import re

    try:
        names = os.listdir(cache_dir)
    except OSError:
        return
    for name in names:
        store = re.fullmatch(r"store-v(\d+)", name)
        state = re.fullmatch(r"state-v(\d+)\.json", name)
        try:
            if store and int(store[1]) < STORE_VERSION:
                trash = cache_dir / STORE_DIR / "tmp" / f"rm-{name}-{os.getpid()}-{time.monotonic_ns()}"
                os.replace(cache_dir / name, trash)  # gone at once for other readers; deleted below
                shutil.rmtree(trash, ignore_errors=True)
            elif state and int(state[1]) < STATE_VERSION:
                os.unlink(cache_dir / name)
        except OSError:
            pass


ORPHAN_GRACE_S = 60.0  # a tmp entry younger than this is never an orphan (its owner may still be starting)
ORPHAN_FOREIGN_S = 7 * 24 * 3600.0  # another host's tmp entries: its processes cannot be checked from here
_TMP_NAME = __import__("re").compile(
    r"(?:build-(?:(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-)?[^/]*|rm-[0-9a-f]+-(?P<rmpid>\d+)-\d+)")


def _host() -> str:
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CorruptEntry(UserWarning):
    pass


@dataclass(frozen=True)
class Entry:
    """One entry of the content-addressed store: its files' digests and its build record."""

    key: str
    path: Path
    files: dict[str, dict[str, Any]]  # name -> {"size", "xxh3", "sha256"}
    meta: dict[str, Any]


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {size, xxh3, sha256}} for every file below folder (entry.json aside)."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "entry.json")
    return {n: {"size": (folder / n).stat().st_size, "xxh3": hash_file(folder / n), "sha256": sha256_file(folder / n)} for n in names}


def entry_record(cache_dir: Path, key: str) -> dict[str, Any] | None:
    """The entry.json of key in the store under cache_dir, unverified, without opening the store (no folder is
    created): for dry runs and `status`, which only say what a build would do."""
    return read_json(cache_dir / STORE_DIR / "objects" / key[:2] / key / "entry.json")


class ArtifactStore:
    def __init__(self, cache_dir: Path, state: StateCache | None = None, readonly: bool = False):
        self.root = cache_dir / STORE_DIR
        self.state = state or StateCache(None)
        self.readonly = readonly or not _writable(self.root)  # a cache we may not write: read it, build in a private temp
        if not self.readonly:
            for name, text in (("CACHEDIR.TAG", CACHEDIR_TAG), (".gitignore", "*\n")):
                if not (cache_dir / name).exists():
                    try:
                        atomic_write_bytes(cache_dir / name, text.encode())
                    except OSError:
                        pass
            _prune_old_versions(cache_dir)
            self.remove_orphans()

    def _dir(self, key: str) -> Path:
        return self.root / "objects" / key[:2] / key

    def lock(self, key: str) -> FileLock:
        from filelock import FileLock  # imported when something is built: a no-op build takes no lock

        return FileLock(str(self.root / "locks" / f"{key}.lock"))

    def has(self, key: str) -> bool:
        return (self._dir(key) / "entry.json").is_file()

    def get(self, key: str) -> Entry | None:
        """The verified entry for key, or None. A corrupt entry is discarded with a warning."""
        path = self._dir(key)
        entry = read_json(path / "entry.json")
        if entry is None:
            return None
        problem = None
        if entry.get("format") != ENTRY_FORMAT or entry.get("key") != key:
            problem = "unknown entry format"
        else:
            for name, want in entry["files"].items():
                f = path / name
                if not f.is_file():
                    problem = f"{name} is missing"
                elif f.stat().st_size != want["size"] or self.state.digest(f) != want["xxh3"]:
                    problem = f"{name} does not match its checksum"
                if problem:
                    break
        if problem:
            warnings.warn(f"cache entry {key[:12]} is corrupt ({problem}); discarded, it will be rebuilt", CorruptEntry, stacklevel=2)
            self.remove(key)
            return None
        self.touch(key)
        return Entry(key=key, path=path, files=entry["files"], meta=entry.get("meta", {}))

    def new_tmp(self) -> Path:
        """A folder to build into: under the store (renamed into place, same filesystem), or a private one in the
        system temp folder when the cache is read-only (outputs are copied from it, never renamed)."""
        return mkdtemp(f"build-{_host()}-{os.getpid()}-", self.root / "tmp" if not self.readonly else None)

    def remove_orphans(self, grace_s: float = ORPHAN_GRACE_S) -> list[str]:
        """Remove what killed processes left in tmp/ (build folders, job files, trash): entries older than grace_s
        whose owner process is gone (on this host; another host's entries only after ORPHAN_FOREIGN_S). The build
        folder's name carries its owner: build-<host>-<pid>-<random>."""
        tmp = self.root / "tmp"
        removed: list[str] = []
        try:
            names = os.listdir(tmp)
        except OSError:
            return removed
        now = time.time()
        for name in names:
            m = _TMP_NAME.match(name)
            if m is None:
                continue
            path = tmp / name
            try:
                age = now - path.lstat().st_mtime
            except OSError:
                continue
            host, pid = m.group("host"), m.group("pid") or m.group("rmpid")
            if host is not None and host != _host():
                if age < ORPHAN_FOREIGN_S:
                    continue
            elif age < grace_s or (pid is not None and _alive(int(pid))):
                continue
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(name)
            except OSError:
                pass
        return removed

    def put(self, key: str, folder: Path, meta: dict[str, Any], files: dict[str, dict[str, Any]] | None = None) -> Entry:
        """Move a finished build folder into the store under key (replacing any entry there). `files`: the folder's
        description when the caller has just verified it (a remote download), to save hashing it again."""
        files = files if files is not None else describe_files(folder)
        atomic_write_json(folder / "entry.json", {"format": ENTRY_FORMAT, "key": key, "files": files, "meta": meta, "created": time.time()})
        checkpoint("put-entry-written")
        final = self._dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            self.remove(key)
        os.replace(folder, final)
        checkpoint("put-renamed")
        return Entry(key=key, path=final, files=files, meta=meta)

    def remove(self, key: str) -> None:
        if self.readonly:
            return
        path = self._dir(key)
        if not path.exists():
            return
        trash = self.root / "tmp" / f"rm-{key}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.replace(path, trash)  # atomic: readers see the entry or nothing
        except OSError:
            return
        checkpoint("remove-renamed")
        shutil.rmtree(trash, ignore_errors=True)

    def touch(self, key: str) -> None:
        """Mark key as used now (for least-recently-used gc)."""
        if self.readonly:
            return
        try:
            os.utime(self._dir(key) / "entry.json")
        except OSError:
            pass

    def entries(self) -> list[tuple[str, float, int]]:
        """(key, last used, bytes) for every entry."""
        out = []
        objects = self.root / "objects"
        if not objects.is_dir():
            return out
        for shard in objects.iterdir():
            for d in shard.iterdir():
                e = d / "entry.json"
                try:
                    used = e.stat().st_mtime
                except OSError:
                    continue
                size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                out.append((d.name, used, size))
        return out

    def gc(self, max_bytes: int) -> list[str]:
        """Remove least-recently-used entries until the store holds at most max_bytes. Returns removed keys."""
        entries = sorted(self.entries(), key=lambda e: e[1])
        total = sum(e[2] for e in entries)
        removed = []
        for key, _, size in entries:
            if total <= max_bytes:
                break
            checkpoint("gc-entry")
            with self.lock(key):
                self.remove(key)
            removed.append(key)
            total -= size
        return removed
