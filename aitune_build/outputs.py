"""Materialised outputs: <out_dir>/<target>/ holds the artifact files, build.json and build.log.

Files are copied in atomically, one by one, and build.json (the record that says which key the folder holds) is
written last; until then the folder still describes the previous good build.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .faults import checkpoint
from .fsutil import temp_beside, atomic_write_json, read_json
from .hashing import StateCache, hash_file

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any

BUILD_FORMAT = 1
RECORD = "build.json"
LOG = "build.log"
FAILURE = "last-failure.json"  # the last failed build of this target (when, why); removed by the next success
_KEEP = {RECORD, LOG, FAILURE, "candidates"}  # candidates/: a tuned target's candidate builds (materialised on their own)


class CorruptCopy(Exception):
    pass


class BuildRecord:
    """A build.json (or a lock's or store entry's copy of it), typed where code reads it. `data` stays the plain
    JSON object that is written, compared and printed."""

    def __init__(self, data: dict[str, Any]):
        self.data = data

    @property
    def key(self) -> str | None:
        return self.data.get("key")

    @property
    def artifact(self) -> str:
        return self.data["artifact"]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.data.get("files", {})

    @property
    def components(self) -> dict[str, Any]:
        return self.data.get("components", {})

    def artifact_file(self) -> dict[str, Any]:
        """The main artifact's {size, xxh3, sha256}."""
        return self.files[self.artifact]

    def artifact_digest(self) -> str:
        """The main artifact's xxh3: what a `from` target's key takes from its upstream."""
        return self.artifact_file()["xxh3"]

    def artifact_sha256(self) -> str:
        return self.artifact_file()["sha256"]


def read_record(folder: Path, state: StateCache | None = None) -> dict[str, Any] | None:
    """folder's build.json; with state, parsed again only when the file changed (a no-op build reads none)."""
    rec = read_json(folder / RECORD) if state is None else state.json_object(f"{folder}/{RECORD}")
    return rec if rec is not None and rec.get("format") == BUILD_FORMAT else None


def read_failure(folder: Path) -> dict[str, Any] | None:
    return read_json(folder / FAILURE)


def current_record(folder: Path, key: str, state: StateCache) -> dict[str, Any] | None:
    """folder's build.json when the folder holds an intact build of key."""
    rec = read_record(folder, state)
    return rec if holds(folder, rec, key, state) else None


def holds(folder: Path, rec: dict[str, Any] | None, key: str, state: StateCache) -> bool:
    """Whether folder, whose build.json is rec, holds an intact build of key (a stat per file when nothing changed)."""
    if rec is None or rec.get("key") != key:
        return False
    for name, want in rec.get("files", {}).items():
        f = f"{folder}/{name}"  # not folder / name: a no-op build does this per file of every target
        try:
            st = os.stat(f)
            if st.st_size != want["size"] or state.digest(f, st) != want["xxh3"]:
                return False
        except OSError:
            return False
    return True


def materialise(folder: Path, source: Path, files: dict[str, dict[str, Any]], record: dict[str, Any]) -> None:
    """Copy files into folder: every file to a temp name first (checked), then all renamed into place, build.json
    last. A failure (disk full, a corrupt source) leaves the previous build's files as they were."""
    import shutil  # not on a no-op build's path

    folder.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[str, str]] = []
    try:
        for name, want in files.items():
            dst = folder / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = temp_beside(dst)  # mode from the umask, not mkstemp's 0600 (a team reads these outputs)
            os.close(fd)
            staged.append((tmp, name))
            shutil.copyfile(source / name, tmp)
            checkpoint("materialise-staged")
            if hash_file(Path(tmp)) != want["xxh3"]:
                raise CorruptCopy(f"{name} copied from the cache does not match its checksum")
        for tmp, name in staged:
            os.replace(tmp, folder / name)
            checkpoint("materialise-replaced")
        staged = []
    finally:
        for tmp, _ in staged:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    tops = {name.split("/")[0] for name in files} | _KEEP
    from .paths import remove_owned

    for stale in folder.iterdir():
        if stale.name in tops or (stale.name.startswith(".") and not stale.name.endswith(".tmp")):
            continue
        remove_owned(stale, folder.parent)  # only inside an out_dir the tool created and marked
    checkpoint("materialise-record")
    atomic_write_json(folder / RECORD, {"format": BUILD_FORMAT, **record, "files": files, "materialised_at": time.time()})
