"""aitune.lock: per target its key, the digests of the key's components, the artifact's digests and the toolchain.

Sorted, indented JSON (diff-friendly), format-versioned, written next to the manifest by every successful build
and only when its content changes. `build --locked` compares instead of writing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .fsutil import atomic_write_bytes, read_json
from .keys import canonical_json, diff_components
from .outputs import BuildRecord
from .status import DONE
from .project import Project

LOCK_FORMAT = 1
LOCK_NAME = "aitune.lock"
_PER_FILE = ("sources", "packages", "weights", "samples", "toolchain")


def lock_path(project: Project) -> Path:
    return project.manifest.path.with_name(LOCK_NAME)


def read_lock(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if data is None or data.get("format") != LOCK_FORMAT:
        return {"format": LOCK_FORMAT, "targets": {}}
    return data


def component_digests(components: dict[str, Any]) -> dict[str, Any]:
    """Files and toolchain kept one by one (readable diffs); other components as one digest each."""
    import xxhash

    return {k: (v if k in _PER_FILE else xxhash.xxh3_64_hexdigest(canonical_json(v).encode())) for k, v in sorted(components.items())}


def entry_for(record: dict[str, Any]) -> dict[str, Any]:
    art = BuildRecord(record).artifact_file()
    entry = {
        "key": record["key"],
        "backend": record["backend"],
        "components": component_digests(record["components"]),
        "artifact": {"name": record["artifact"], "sha256": art["sha256"], "xxh3": art["xxh3"], "size": art["size"]},
        "toolchain": record["toolchain"],
    }
    if "selection" in record:  # a tuned target: its winner pinned per GPU model (tune.py), merged across machines
        entry["tuned"] = {record["selection"]["device"]: {"winner": record["selection"]["winner"], "key": record["key"],
                                                          "artifact_sha256": art["sha256"]}}
    return entry


def render(lock: dict[str, Any]) -> bytes:
    return (json.dumps(lock, indent=2, sort_keys=True) + "\n").encode()


def update(project: Project, results: list[Any]) -> None:
    path = lock_path(project)
    old_bytes = path.read_bytes() if path.exists() else b""
    lock = read_lock(path)
    targets = {n: e for n, e in lock["targets"].items() if n in project.manifest.model.targets}
    changed = len(targets) != len(lock["targets"])
    for r in results:
        if r.status in DONE and r.record.get("files"):
            old = targets.get(r.name)
            rec = BuildRecord(r.record)
            if old is not None and old["key"] == rec.key and old["artifact"]["sha256"] == rec.artifact_sha256():
                continue  # the key covers every component: the entry would come out the same
            targets[r.name] = entry_for(r.record)
            if old is not None and "tuned" in targets[r.name]:
                targets[r.name]["tuned"] = {**old.get("tuned", {}), **targets[r.name]["tuned"]}
            changed = True
    if not changed:
        return
    new = render({"format": LOCK_FORMAT, "targets": dict(sorted(targets.items()))})
    if new != old_bytes and targets:
        atomic_write_bytes(path, new)


def _locked_key(project: Project, name: str, locked: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The key `name` would have now, taking a `from` edge's upstream artifact as the lock pins it."""
    up = project.manifest.model.targets[name].from_
    up_digest = None
    if up is not None and up in locked:
        up_digest = locked[up]["artifact"]["xxh3"]
    return project.fingerprinter.key(name, up_digest)


def check_locked(project: Project, order: list[str]) -> dict[str, list[str]]:
    """{target: [differences]} for every target whose key would differ from aitune.lock."""
    path = lock_path(project)
    if not path.exists():
        return {n: [f"{LOCK_NAME} does not exist; build once without --locked and commit it"] for n in order}
    locked = read_lock(path)["targets"]
    problems: dict[str, list[str]] = {}
    from .backends import backend_for

    for name in order:
        spec = project.manifest.model.targets[name]
        if name not in locked:
            configs = [project.manifest.model.backends[b] for b in (spec.candidates or [spec.backend])]
            if any(backend_for(c.kind)(c).unavailable() is None for c in configs):  # one that can't build here can't be locked here
                problems[name] = [f"not in {LOCK_NAME}"]
            continue
        key, comps = _locked_key(project, name, locked)
        if key != locked[name]["key"] and key not in {p["key"] for p in locked[name].get("tuned", {}).values()}:
            problems[name] = diff_components(locked[name]["components"], component_digests(comps)) or ["key differs"]
    return problems


def artifact_drift(project: Project, results: list[Any]) -> dict[str, dict[str, Any]]:
    """For `build --locked`: targets whose key matches aitune.lock but whose artifact bytes do not.

    The key pins the inputs; the lock also pins the sha256 of what they built. A rebuild on a cache miss gives other
    bytes when the backend is not deterministic (TensorRT times tactics), which is expected, or when a backend
    that should be deterministic is not, which is a reproducibility bug."""
    from .backends import backend_for

    locked = read_lock(lock_path(project))["targets"]
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        entry = locked.get(r.name)
        if r.status not in DONE or entry is None or entry["key"] != r.key or not r.record.get("files"):
            continue
        got = BuildRecord(r.record).artifact_sha256()
        if got != entry["artifact"]["sha256"]:
            kind = r.record["backend"]  # the backend kind that built it (a tuned target's winner)
            out[r.name] = {"locked": entry["artifact"]["sha256"], "built": got, "deterministic": backend_for(kind).deterministic,
                           "backend": kind}
    return out


def compare(project: Project, found: dict[str, Any]) -> dict[str, str]:
    """For `status`: which targets are out of date with respect to aitune.lock."""
    path = lock_path(project)
    if not path.exists():
        return {}
    locked = read_lock(path)["targets"]
    out: dict[str, str] = {}
    for name in found:
        if name not in locked:
            out[name] = "not in lock"
            continue
        key, comps = _locked_key(project, name, locked)
        if key != locked[name]["key"] and key not in {p["key"] for p in locked[name].get("tuned", {}).values()}:
            diff = diff_components(locked[name]["components"], component_digests(comps))
            out[name] = "differs: " + "; ".join(diff[:3]) + (" ..." if len(diff) > 3 else "")
    return out
