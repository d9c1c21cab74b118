"""Content digests with a stat cache: an unchanged file costs a stat, not a read.

The state file maps an absolute path to (inode, mtime_ns, size, xxh3-128 digest), a source file's digest to the
imports found in it, so an unchanged source is neither read nor parsed again, a manifest's digest to its
validated form, so an unchanged aitune.toml is not validated again, and a build.json's path to (inode, mtime_ns,
size, its JSON object), so a no-op build does not read every target's build.json again.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import xxhash

from .fsutil import atomic_write_bytes

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any

STATE_VERSION = 2
_MANIFESTS_KEPT = 4
_ENVS_KEPT = 4
_CHUNK = 8 << 20
RACY_NS = 2_000_000_000  # a file modified this recently may change again unseen (see digest)


def _digest(path: Path, h: Any) -> str:
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def hash_file(path: Path) -> str:
    return _digest(path, xxhash.xxh3_128())


def sha256_file(path: Path) -> str:
    import hashlib

    return _digest(path, hashlib.sha256())


class StateCache:
    """(inode, mtime_ns, size) -> digest, persisted in one versioned JSON file. Thread-safe; written atomically."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._dirty = False
        self._files: dict[str, list] = {}
        self._imports: dict[str, list] = {}
        self._manifests: dict[str, dict] = {}
        # environment -> {top-level import name -> distribution ("" for none)}, the last few environments: `python -m
        # aitune_build` and a `python -c` caller see other sys.path[0]s, and alternating must not rewrite the file
        self._dists: dict[str, dict[str, str]] = {}
        self._records: dict[str, list] = {}  # build.json path -> [inode, mtime_ns, size, its JSON object]
        if path is not None:
            try:
                data = json.loads(path.read_bytes())
                if data.get("version") == STATE_VERSION:
                    self._files, self._imports, self._manifests = data["files"], data["imports"], data["manifests"]
                    dists = data.get("dists")
                    if isinstance(dists, dict) and isinstance(dists.get("envs"), dict):
                        self._dists = {k: v for k, v in dists["envs"].items() if isinstance(v, dict)}
                    records = data.get("records")
                    if isinstance(records, dict):  # a damaged entry is dropped (read again), never served
                        self._records = {k: v for k, v in records.items()
                                         if isinstance(v, list) and len(v) == 4 and isinstance(v[3], dict)}
            except (OSError, ValueError, KeyError, TypeError):
                pass

    def digest(self, path: Path, st: os.stat_result | None = None) -> str:
        """path's xxh3-128; st: its os.stat, when the caller has just taken it."""
        key = str(path)
        st = st or os.stat(path)
        sig = [st.st_ino, st.st_mtime_ns, st.st_size]
        with self._lock:
            hit = self._files.get(key)
            if hit is not None and hit[:3] == sig:
                return hit[3]
        digest = hash_file(path)
        # A file written in the last moments may change again within the clock's granularity without its
        # (mtime, size) changing ("racily clean" in git's words): hash it again next time rather than trust it.
        if time.time_ns() - st.st_mtime_ns > RACY_NS:
            with self._lock:
                self._files[key] = sig + [digest]
                self._dirty = True
        return digest

    def json_object(self, path: str) -> dict | None:
        """The JSON object in path (a build.json), parsed again only when its (inode, mtime_ns, size) changed; None
        when it is missing, unreadable or not an object. The caller must not modify what it gets."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        sig = [st.st_ino, st.st_mtime_ns, st.st_size]
        hit = self._records.get(path)
        if hit is not None and hit[:3] == sig:
            return hit[3]
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())  # the signature of the bytes read, should the file be replaced meanwhile
                obj = json.loads(f.read())
        except (OSError, ValueError):
            return None
        if not isinstance(obj, dict):
            return None
        if time.time_ns() - st.st_mtime_ns > RACY_NS:  # as in digest: a file just written may change unseen
            with self._lock:
                self._records[path] = [st.st_ino, st.st_mtime_ns, st.st_size, obj]
                self._dirty = True
        return obj

    def forget(self, path: Path) -> None:
        with self._lock:
            if self._files.pop(str(path), None) is not None:
                self._dirty = True

    def imports(self, digest: str) -> list | None:
        with self._lock:
            return self._imports.get(digest)

    def set_imports(self, digest: str, found: list) -> None:
        with self._lock:
            self._imports[digest] = found
            self._dirty = True

    def distribution(self, env: str, name: str) -> str | None:
        """Which distribution provides import name ("" for none), as found under the same environment."""
        with self._lock:
            return self._dists.get(env, {}).get(name)

    def set_distribution(self, env: str, name: str, dist: str) -> None:
        with self._lock:
            found = self._dists.pop(env, {})
            found[name] = dist
            self._dists[env] = found  # newest last
            for old in list(self._dists)[:-_ENVS_KEPT]:
                del self._dists[old]
            self._dirty = True

    def validated(self, digest: str) -> dict | None:
        with self._lock:
            return self._manifests.get(digest)

    def set_validated(self, digest: str, data: dict) -> None:
        with self._lock:
            self._manifests.pop(digest, None)
            self._manifests[digest] = data  # newest last; a shared cache dir serves a few manifests
            for old in list(self._manifests)[:-_MANIFESTS_KEPT]:
                del self._manifests[old]
            self._dirty = True

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        with self._lock:
            files = {k: v for k, v in self._files.items() if os.path.exists(k)}
            live = {v[3] for v in files.values()}
            imports = {k: v for k, v in self._imports.items() if k in live}
            records = {k: v for k, v in self._records.items() if os.path.exists(k)}
            data = json.dumps({"version": STATE_VERSION, "files": files, "imports": imports, "manifests": self._manifests,
                               "dists": {"envs": self._dists}, "records": records}, separators=(",", ":"))
            self._dirty = False
        try:
            atomic_write_bytes(self.path, data.encode())
        except OSError:
            pass  # a read-only cache keeps working, only slower
