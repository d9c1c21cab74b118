"""Release archives: byte-for-byte reproducible .tar.gz of built targets, and their verification.

Layout: aitune.lock, SHA256SUMS, targets/<name>/<artifact files>, targets/<name>/build.json. Entries are sorted,
mtimes fixed (SOURCE_DATE_EPOCH, else 0), owners 0/root-less, modes 0644/0755, and the gzip header carries no time
or name: the same built artifacts give the same bytes on any day, in any checkout folder.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import posixpath
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import UserError
from .fsutil import atomic_write_bytes
from .lockfile import LOCK_FORMAT, LOCK_NAME, entry_for, render
from .outputs import read_record
from .plan import select
from .project import Project

SUMS = "SHA256SUMS"
# Fields of build.json that say when or how a folder was filled, not what it holds: left out of archives.
_VOLATILE = ("materialised_at", "built_at", "timings", "source")


def _mtime() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return 0
    try:
        return int(value)
    except ValueError:
        raise UserError(f"SOURCE_DATE_EPOCH must be an integer, got '{value}'") from None


def archive_members(project: Project, targets: list[str], candidates: bool = False) -> dict[str, bytes]:
    """{archive path: bytes} for the named targets (default all) and their upstreams; each must be built and intact.

    A tuned target ships its winner (and selection.json); candidates=True adds each of its built candidates "T@B"."""
    import json

    from .outputs import holds

    man = project.manifest.model

    def current(name: str) -> dict[str, Any] | None:
        rec = read_record(project.target_dir(name))
        return rec if rec is not None and holds(project.target_dir(name), rec, rec["key"], project.state) else None

    # Named targets (and their upstreams) must be built; by default, every target that is.
    names = select(man, targets) if targets else [n for n in select(man, []) if current(n) is not None]
    if not names:
        raise UserError("nothing is built yet: run `aitune-build build` first")
    if candidates:
        from .manifest import candidate_target

        built = [candidate_target(n, b) for n in names for b in man.targets[n].candidates or ()]
        names += [c for c in built if current(c) is not None]
    files: dict[str, bytes] = {}
    lock_targets: dict[str, Any] = {}
    for name in names:
        folder = project.target_dir(name)
        rec = current(name)
        if rec is None:
            raise UserError(f"target '{name}' is not built (or its output was modified): run `aitune-build build {name}` first")
        for fname in sorted(rec["files"]):
            files[f"targets/{name}/{fname}"] = (folder / fname).read_bytes()
        clean = {k: v for k, v in rec.items() if k not in _VOLATILE}
        files[f"targets/{name}/build.json"] = (json.dumps(clean, indent=2, sort_keys=True) + "\n").encode()
        lock_targets[name] = entry_for(rec)
    files[LOCK_NAME] = render({"format": LOCK_FORMAT, "targets": dict(sorted(lock_targets.items()))})
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {path}\n" for path, data in sorted(files.items()))
    files[SUMS] = sums.encode()
    return files


def write_archive(project: Project, targets: list[str], output: Path, candidates: bool = False) -> str:
    files = archive_members(project, targets, candidates)
    mtime = _mtime()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(PurePosixPath(p).parent) for p in files} - {"."} | {"targets"})
        entries = [(d, None) for d in dirs] + [(p, files[p]) for p in files]
        for path, data in sorted(entries, key=lambda e: e[0]):
            info = tarfile.TarInfo(path)
            info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, "", ""
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    gz = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=0, compresslevel=9) as f:
        f.write(raw.getvalue())
    data = gz.getvalue()
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, data)
    return hashlib.sha256(data).hexdigest()


def _safe_name(name: str) -> bool:
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts and not name.startswith("/")


def read_archive(path: Path) -> tuple[dict[str, bytes] | None, str | None]:
    """({path: bytes}, None) for a well-formed archive, else (None, the first problem)."""
    try:
        tar = tarfile.open(path, mode="r:gz")
    except (OSError, tarfile.TarError, EOFError) as e:
        return None, f"cannot read archive: {e}"
    files: dict[str, bytes] = {}
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError, zlib_error()) as e:
            return None, f"cannot read archive: {e}"
        for m in members:
            if not _safe_name(m.name):
                return None, f"unsafe path in archive: {m.name}"
            if m.issym() or m.islnk():
                target = posixpath.normpath(posixpath.join(posixpath.dirname(m.name), m.linkname)) if m.issym() else m.linkname
                if posixpath.isabs(m.linkname) or target.startswith("..") or not _safe_name(target):
                    return None, f"link escapes the archive: {m.name} -> {m.linkname}"
                return None, f"links are not allowed in a release archive: {m.name} -> {m.linkname}"
            if m.isdir():
                continue
            if not m.isfile():
                return None, f"not a regular file: {m.name}"
            try:
                files[posixpath.normpath(m.name)] = tar.extractfile(m).read()  # type: ignore[union-attr]
            except (tarfile.TarError, OSError, EOFError, zlib_error()) as e:
                return None, f"cannot read {m.name}: {e}"
    return files, None


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


def verify_files(files: dict[str, bytes]) -> str | None:
    """The first problem with an archive's contents, or None."""
    import json

    if SUMS not in files:
        return f"{SUMS} is missing"
    listed: dict[str, str] = {}
    for line in files[SUMS].decode(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        if not name:
            return f"{SUMS}: malformed line: {line!r}"
        listed[name] = digest
    for name, digest in sorted(listed.items()):
        if name not in files:
            return f"{name}: listed in {SUMS} but missing from the archive"
        if hashlib.sha256(files[name]).hexdigest() != digest:
            return f"{name}: sha256 does not match {SUMS}"
    extra = sorted(set(files) - set(listed) - {SUMS})
    if extra:
        return f"{extra[0]}: in the archive but not listed in {SUMS}"
    if LOCK_NAME not in files:
        return f"{LOCK_NAME} is missing"
    try:
        lock = json.loads(files[LOCK_NAME])
    except ValueError as e:
        return f"{LOCK_NAME}: not valid JSON: {e}"
    if lock.get("format") != LOCK_FORMAT:
        return f"{LOCK_NAME}: unknown format {lock.get('format')!r}"
    for name, entry in sorted(lock.get("targets", {}).items()):
        art = f"targets/{name}/{entry['artifact']['name']}"
        if art not in files:
            return f"{art}: locked artifact of '{name}' is missing"
        if hashlib.sha256(files[art]).hexdigest() != entry["artifact"]["sha256"]:
            return f"{art}: sha256 differs from {LOCK_NAME}"
        try:
            rec = json.loads(files[f"targets/{name}/build.json"])
        except (KeyError, ValueError):
            return f"targets/{name}/build.json is missing or unreadable"
        if rec.get("key") != entry["key"]:
            return f"targets/{name}/build.json: key differs from {LOCK_NAME}"
    return None


def verify_archive(path: Path) -> str | None:
    files, problem = read_archive(path)
    return problem if problem else verify_files(files)  # type: ignore[arg-type]


def unpack_verified(path: Path, cache_dir: Path) -> Path:
    """Verify the archive and unpack it once under the cache (keyed by its sha256); return the folder."""
    from .fsutil import atomic_write_bytes as write

    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    dest = cache_dir / "releases-v1" / digest
    if (dest / SUMS).is_file():
        return dest
    files, problem = read_archive(path)
    problem = problem or verify_files(files)  # type: ignore[arg-type]
    if problem:
        raise UserError(f"{path}: not a valid release archive: {problem}")
    tmp = dest.with_name(f".{digest}.{os.getpid()}.tmp")
    for name, content in files.items():  # type: ignore[union-attr]
        write(tmp / name, content)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process unpacked it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return dest
