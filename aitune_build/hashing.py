"""Content digests with a stat cache: an unchanged file costs a stat, not a read.

The state file maps an absolute path to (inode, mtime_ns, size, xxh3-128 digest), a source file's digest to the
imports found in it, so an unchanged source is neither read nor parsed again, and a manifest's digest to its
validated form, so an unchanged aitune.toml is not validated again.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import xxhash

from .fsutil import atomic_write_bytes

STATE_VERSION = 2
_MANIFESTS_KEPT = 4
_CHUNK = 8 << 20
_RACY_NS = 2_000_000_000


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
        self._dists: dict[str, Any] = {"env": None, "map": {}}  # top-level import name -> distribution ("" for none)
        if path is not None:
            try:
                data = json.loads(path.read_bytes())
                if data.get("version") == STATE_VERSION:
                    self._files, self._imports, self._manifests = data["files"], data["imports"], data["manifests"]
                    dists = data.get("dists")
                    if isinstance(dists, dict) and isinstance(dists.get("map"), dict):
                        self._dists = dists
            except (OSError, ValueError, KeyError, TypeError):
                pass

    def digest(self, path: Path) -> str:
        key = str(path)
        st = os.stat(path)
        sig = [st.st_ino, st.st_mtime_ns, st.st_size]
        with self._lock:
            hit = self._files.get(key)
            if hit is not None and hit[:3] == sig:
                return hit[3]
        digest = hash_file(path)
        # A file written in the last moments may change again within the clock's granularity without its
        # (mtime, size) changing ("racily clean" in git's words): hash it again next time rather than trust it.
        if time.time_ns() - st.st_mtime_ns > _RACY_NS:
            with self._lock:
                self._files[key] = sig + [digest]
                self._dirty = True
        return digest

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
            return self._dists["map"].get(name) if self._dists.get("env") == env else None

    def set_distribution(self, env: str, name: str, dist: str) -> None:
        with self._lock:
            if self._dists.get("env") != env:
                self._dists = {"env": env, "map": {}}
            self._dists["map"][name] = dist
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
            data = json.dumps({"version": STATE_VERSION, "files": files, "imports": imports, "manifests": self._manifests,
                               "dists": self._dists}, separators=(",", ":"))
            self._dirty = False
        try:
            atomic_write_bytes(self.path, data.encode())
        except OSError:
            pass  # a read-only cache keeps working, only slower
