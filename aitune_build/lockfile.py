"""aitune.lock: per target its key, the key's components, the artifact and the toolchain.

Sorted, indented JSON (diff-friendly), format-versioned, named after the manifest (`aitune.toml` -> `aitune.lock`,
`other.toml` -> `other.lock`), written next to it by every successful build and only when its content changes.
`build --locked` compares instead of writing.

What is pinned (so that building a fresh clone leaves the committed lock as it is):
- every target's key and its components as plain values (files by digest, fields by value), so that `--locked`
  and `status` name the changed field (`module.args.d_out: added (4)`);
- the artifact's sha256/xxh3/size only for backends whose builds are bit-for-bit deterministic (`export`,
  `eager`); for the others (AOTInductor, TensorRT) the lock names the artifact file and says `"pinned": false`,
  because a rebuild on another machine gives other bytes for the same key.

Concurrent builds of one project (disjoint targets) read-modify-write the lock under an exclusive `flock` on the
manifest's folder, so neither loses the other's entries; no lock file is left next to the manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .fsutil import atomic_write_bytes
from .keys import canonical_json, diff_components
from .outputs import BuildRecord
from .project import Project
from .status import DONE

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any

LOCK_FORMAT = 2
LOCK_NAME = "aitune.lock"  # inside release archives; a project's lock is named after its manifest (lock_path)
_PER_FILE = ("sources", "packages", "weights", "samples", "toolchain")


class LockError(UserError):
    """A lock file that cannot be read: names the file and what is wrong."""


def lock_path(project: Project) -> Path:
    return project.manifest.path.with_suffix(".lock")


def _display(project: Project) -> str:
    return str(Path(project.manifest.display).with_suffix(".lock"))


def read_lock(path: Path, display: str | None = None) -> dict[str, Any]:
    """The lock's content ({"format", "targets"}); empty when the file does not exist; a LockError when malformed."""
    shown = display or str(path)
    fix = f"fix it, or delete it and run `aitune-build build` to write a new one"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {"format": LOCK_FORMAT, "targets": {}}
    except OSError as e:
        raise LockError(f"{shown}: cannot read: {e.strerror}") from None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise LockError(f"{shown}: not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise LockError(f"{shown}: expected a JSON object with 'format' and 'targets'; {fix}")
    fmt = data.get("format")
    if fmt not in (1, LOCK_FORMAT):
        raise LockError(f"{shown}: format: unknown lock format {fmt!r} (this aitune-build reads 1 and {LOCK_FORMAT}); {fix}")
    targets = data.get("targets")
    if not isinstance(targets, dict):
        raise LockError(f"{shown}: targets: " + ("missing" if targets is None else "expected an object") + f"; {fix}")
    for name, entry in targets.items():
        if not isinstance(entry, dict):
            raise LockError(f"{shown}: targets.{name}: expected an object; {fix}")
        for field, kind in (("key", str), ("artifact", dict), ("components", dict)):
            if field not in entry:
                raise LockError(f"{shown}: targets.{name}.{field}: missing; {fix}")
            if not isinstance(entry[field], kind):
                raise LockError(f"{shown}: targets.{name}.{field}: expected {'a string' if kind is str else 'an object'}; {fix}")
    return data


def _read(project: Project) -> dict[str, Any]:
    return read_lock(lock_path(project), _display(project))


def component_digests(components: dict[str, Any]) -> dict[str, Any]:
    """Format 1's components: files and toolchain one by one, other components as one digest each."""
    import xxhash

    return {k: (v if k in _PER_FILE else xxhash.xxh3_64_hexdigest(canonical_json(v).encode())) for k, v in sorted(components.items())}


def entry_for(record: dict[str, Any], pin_artifact: bool = True) -> dict[str, Any]:
    """A lock entry for a build record; pin_artifact=False leaves out the artifact's digests (see the module doc)."""
    art = BuildRecord(record).artifact_file()
    artifact: dict[str, Any] = {"name": record["artifact"]}
    if pin_artifact:
        artifact.update(sha256=art["sha256"], xxh3=art["xxh3"], size=art["size"])
    else:
        artifact["pinned"] = False
    entry = {
        "key": record["key"],
        "backend": record["backend"],
        "components": dict(sorted(record["components"].items())),
        "artifact": artifact,
        "toolchain": record["toolchain"],
    }
    if "selection" in record:  # a tuned target: its winner pinned per GPU model (tune.py), merged across machines
        entry["tuned"] = {record["selection"]["device"]: {"winner": record["selection"]["winner"], "key": record["key"],
                                                          "artifact_sha256": art["sha256"] if pin_artifact else None}}
    return entry


def _pins(entry: dict[str, Any], key: str) -> bool:
    """Whether a lock entry pins key: its own key, or, for a tuned target, its winner's key on any device it pins."""
    return key == entry["key"] or key in {p["key"] for p in entry.get("tuned", {}).values()}


def render(lock: dict[str, Any]) -> bytes:
    return (json.dumps(lock, indent=2, sort_keys=True) + "\n").encode()


def _deterministic(kind: str) -> bool:
    from .backends import backend_for

    return backend_for(kind).deterministic


@dataclass(frozen=True)
class LockSnapshot:
    """The lock as check_readable read it, and the (inode, mtime_ns, size) it had then (None: unknown or too fresh
    to trust, as hashing.StateCache says of a file written in the last moments)."""

    content: dict[str, Any]
    signature: tuple[int, int, int] | None


def _signature(path: Path) -> tuple[int, int, int] | None:
    import os
    import time

    from .hashing import RACY_NS

    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size) if time.time_ns() - st.st_mtime_ns > RACY_NS else None


def check_readable(project: Project) -> LockSnapshot:
    """Read the project's lock now, before building: a LockError when it is malformed. update() takes the result
    and reads the file again only when it changed meanwhile (a no-op build of many targets reads it once)."""
    signature = _signature(lock_path(project))  # before reading: a change after it is seen by update()
    return LockSnapshot(_read(project), signature)


def update(project: Project, results: list[Any], seen: LockSnapshot | None = None) -> None:
    """Record the built/cached targets of `results`, keeping every other target's entry (read-modify-write under an
    exclusive lock, so two builds of one project on disjoint targets both land). seen: check_readable's snapshot,
    used when the file is as it was then."""
    fresh = {r.name: r.record for r in results if r.status in DONE and r.record.get("files")}
    path = lock_path(project)
    with _exclusive(path.parent):
        unchanged = seen is not None and seen.signature is not None and _signature(path) == seen.signature
        lock = seen.content if unchanged else _read(project)  # type: ignore[union-attr]
        targets = {n: e for n, e in lock["targets"].items() if n in project.manifest.model.targets}
        for name, rec in fresh.items():
            old = targets.get(name)
            targets[name] = entry_for(rec, pin_artifact=_deterministic(rec["backend"]))
            if old is not None and "tuned" in targets[name]:  # a tuned target's winners, one per device, merged
                targets[name]["tuned"] = {**old.get("tuned", {}), **targets[name]["tuned"]}
        if not targets or (lock["format"] == LOCK_FORMAT and lock["targets"] == targets):
            return  # nothing to write; comparing values is cheaper than rendering (indented JSON is encoded in Python)
        atomic_write_bytes(path, render({"format": LOCK_FORMAT, "targets": dict(sorted(targets.items()))}))


class _exclusive:
    """An exclusive flock on a folder (released on close, also when the process dies); creates no file."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self) -> None:
        import fcntl
        import os

        self.fd: int | None = None
        try:
            self.fd = os.open(self.folder, os.O_RDONLY)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock: write unlocked, as before, rather than not at all
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    def __exit__(self, *exc: object) -> None:
        import os

        if self.fd is not None:
            os.close(self.fd)


_SAME_INPUTS = "key differs with the same inputs: the key schema changed (a newer aitune-build); rebuild and commit the lock"


def _locked_key(project: Project, name: str, locked: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The key `name` would have now, taking a `from` edge's upstream artifact as the lock pins it."""
    up = project.manifest.model.targets[name].from_
    up_digest = None
    if up is not None and up in locked:
        up_digest = locked[up]["artifact"].get("xxh3")
        if up_digest is None:  # not pinned: take the upstream's component from the entry itself
            up_digest = locked[name]["components"].get("upstream", {}).get("artifact")
    return project.fingerprinter.key(name, up_digest)


def _diff(locked_entry: dict[str, Any], comps: dict[str, Any]) -> list[str]:
    """Field-level differences between a lock entry's components and the current ones."""
    old = locked_entry["components"]
    new = dict(comps)
    lines: list[str] = []
    for k, v in old.items():  # format 1 kept some components as a digest only: compare those as digests
        if isinstance(v, str) and k not in _PER_FILE and k in new:
            if component_digests({k: new.pop(k)})[k] != v:
                lines.append(f"{k} changed (the lock keeps only its digest: rebuild to record its fields)")
            old = {kk: vv for kk, vv in old.items() if kk != k}
    return diff_components(old, new) + lines


def check_locked(project: Project, order: list[str]) -> dict[str, list[str]]:
    """{target: [differences]} for every target whose key would differ from the lock."""
    path = lock_path(project)
    name_ = path.name
    if not path.exists():
        return {n: [f"{name_} does not exist; build once without --locked and commit it"] for n in order}
    locked = _read(project)["targets"]
    problems: dict[str, list[str]] = {}
    from .backends import backend_for

    for name in order:
        spec = project.manifest.model.targets[name]
        if name not in locked:
            configs = [project.manifest.model.backends[b] for b in (spec.candidates or [spec.backend])]
            if any(backend_for(c.kind)(c).unavailable() is None for c in configs):  # one that can't build here can't be locked here
                problems[name] = [f"not in {name_}"]
            continue
        key, comps = _locked_key(project, name, locked)
        if not _pins(locked[name], key):
            problems[name] = _diff(locked[name], comps) or [_SAME_INPUTS]
    return problems


def artifact_drift(project: Project, results: list[Any]) -> dict[str, dict[str, Any]]:
    """For `build --locked`: targets whose key matches the lock but whose artifact bytes differ from the pinned ones.

    Only deterministic backends' artifacts are pinned; a difference there is a reproducibility bug."""
    locked = _read(project)["targets"]
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        entry = locked.get(r.name)
        if r.status not in DONE or entry is None or entry["key"] != r.key or not r.record.get("files"):
            continue
        want = entry["artifact"].get("sha256")
        got = BuildRecord(r.record).artifact_sha256()
        if want is not None and got != want:
            kind = r.record["backend"]
            out[r.name] = {"locked": want, "built": got, "deterministic": _deterministic(kind), "backend": kind}
    return out


def compare(project: Project, found: dict[str, Any]) -> dict[str, str]:
    """For `status`: which targets are out of date with respect to the lock, naming the changed fields."""
    path = lock_path(project)
    if not path.exists():
        return {}
    locked = _read(project)["targets"]
    out: dict[str, str] = {}
    for name in found:
        if name not in locked:
            out[name] = "not in lock"
            continue
        key, comps = _locked_key(project, name, locked)
        if not _pins(locked[name], key):
            diff = _diff(locked[name], comps) or [_SAME_INPUTS]
            out[name] = "differs: " + "; ".join(diff[:3]) + (" ..." if len(diff) > 3 else "")
    return out
