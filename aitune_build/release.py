"""Release archives: byte-for-byte reproducible .tar.gz of built targets, and their verification.

Layout: SHA256SUMS (first), aitune.lock, targets/<name>/<artifact files>, targets/<name>/build.json. Entries are
sorted, mtimes fixed (SOURCE_DATE_EPOCH, else 0), owners 0/root-less, modes 0644/0755, and the gzip header carries
no time or name: the same built artifacts give the same bytes on any day, in any checkout folder.

Everything streams: `package` reads each artifact once, in chunks, hashing it on the way into the tar (a file whose
bytes differ from its build.json is refused) and writes a temp file renamed into place; `verify` and `load(archive=)`
read the archive once, in chunks (a gzip bomb costs time, never memory), holding only SHA256SUMS, the lock and the
build.json files. An archive is data: its members are regular files and folders under the fixed layout, with names
that cannot escape the destination; nothing in it names code to run.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import warnings
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from .errors import UserError
from .faults import checkpoint
from .fsutil import temp_beside
from .lockfile import LOCK_FORMAT, LOCK_NAME, entry_for, render
from .outputs import read_record
from .plan import select
from .project import Project

SUMS = "SHA256SUMS"
RELEASES_DIR = "releases-v1"
VERIFIED = ".verified.json"  # in an unpacked folder: per file (inode, size, mtime_ns, ctime_ns) -> sha256 checked
# Fields of build.json that say when or how a folder was filled, not what it holds: left out of archives.
_VOLATILE = ("materialised_at", "built_at", "timings", "source")
_CHUNK = 1 << 20
_META_MAX = 16 << 20  # SHA256SUMS, aitune.lock and build.json are read into memory: never more than this each
_HEADER_MAX = 64 << 10  # pax / GNU long-name headers are read whole by tarfile: bound them first
_COMPONENT_MAX = 255  # bytes, as file systems allow
_PATH_MAX = 1024
_TRAILING_MAX = 1 << 20  # NUL padding after the tar's end (a tar pads to 10 KiB records)
_DIGEST = re.compile(r"[0-9a-f]{64}")


class BadArchive(Exception):
    """What is wrong with an archive (its message is the problem, one line)."""


def _mtime() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return 0
    try:
        return int(value)
    except ValueError:
        raise UserError(f"SOURCE_DATE_EPOCH must be an integer, got '{value}'") from None


# --- package ------------------------------------------------------------------------------------------------------


def _plan(project: Project, targets: list[str], candidates: bool = False) -> tuple[dict[str, bytes], dict[str, tuple[Path, int, str]]]:
    """(small members as bytes, {archive path: (file, size, sha256 from build.json)}) for the named targets (default:
    every built one) and their upstreams; each must be built and intact (by the stat cache; bytes checked later).
    A tuned target ships its winner (and selection.json); candidates=True adds each of its built candidates "T@B"."""
    from .outputs import holds

    man = project.manifest.model

    def current(name: str) -> dict[str, Any] | None:
        rec = read_record(project.target_dir(name))
        return rec if rec is not None and holds(project.target_dir(name), rec, rec["key"], project.state) else None

    names = select(man, targets) if targets else [n for n in select(man, []) if current(n) is not None]
    if not names:
        raise UserError("nothing is built yet: run `aitune-build build` first")
    if candidates:
        from .manifest import candidate_target

        built = [candidate_target(n, b) for n in names for b in man.targets[n].candidates or ()]
        names += [c for c in built if current(c) is not None]
    small: dict[str, bytes] = {}
    big: dict[str, tuple[Path, int, str]] = {}
    lock_targets: dict[str, Any] = {}
    for name in names:
        folder = project.target_dir(name)
        rec = current(name)
        if rec is None:
            raise UserError(f"target '{name}' is not built (or its output was modified): run `aitune-build build {name}` first")
        for fname, want in sorted(rec["files"].items()):
            big[f"targets/{name}/{fname}"] = (folder / fname, int(want["size"]), want["sha256"])
        clean = {k: v for k, v in rec.items() if k not in _VOLATILE}
        small[f"targets/{name}/build.json"] = (json.dumps(clean, indent=2, sort_keys=True) + "\n").encode()
        lock_targets[name] = entry_for(rec)
    small[LOCK_NAME] = render({"format": LOCK_FORMAT, "targets": dict(sorted(lock_targets.items()))})
    digests = {p: hashlib.sha256(d).hexdigest() for p, d in small.items()} | {p: b[2] for p, b in big.items()}
    small[SUMS] = "".join(f"{d}  {p}\n" for p, d in sorted(digests.items())).encode()
    return small, big


def archive_members(project: Project, targets: list[str], candidates: bool = False) -> dict[str, bytes]:
    """{archive path: bytes} (reads every artifact whole: for tests and small archives only)."""
    small, big = _plan(project, targets, candidates)
    return {**small, **{p: f.read_bytes() for p, (f, _, _) in big.items()}}


class _Hashing:
    """A binary stream that hashes what passes through it (reading from src, or writing to dst)."""

    def __init__(self, src: BinaryIO | None = None, dst: BinaryIO | None = None):
        self.src, self.dst, self.h, self.n = src, dst, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.src.read(size)  # type: ignore[union-attr]
        self.h.update(data)
        self.n += len(data)
        return data

    def write(self, data: bytes) -> int:
        self.h.update(data)
        self.n += len(data)
        return self.dst.write(data)  # type: ignore[union-attr]

    def flush(self) -> None:
        self.dst.flush()  # type: ignore[union-attr]


def _check_output(output: Path) -> None:
    """package -o never overwrites what it did not write: an existing file must be a release archive."""
    if output.is_dir():
        raise UserError(f"-o {output}: is a folder; name the archive file to write")
    if output.exists() or output.is_symlink():
        if output.is_symlink() or not _is_release(output):
            raise UserError(f"-o {output}: exists and is not a release archive written by aitune-build; "
                            "refusing to overwrite it (name a new file, or remove it yourself)")


def _is_release(path: Path) -> bool:
    """Whether path starts like an archive this module writes (SHA256SUMS as its first member)."""
    try:
        with open(path, "rb") as f, gzip.GzipFile(fileobj=f) as gz:
            first = tarfile.TarInfo.frombuf(gz.read(tarfile.BLOCKSIZE), tarfile.ENCODING, "surrogateescape")
            if first.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):  # a pax header first: look at the member after it
                gz.read(((first.size + 511) // 512) * 512)
                first = tarfile.TarInfo.frombuf(gz.read(tarfile.BLOCKSIZE), tarfile.ENCODING, "surrogateescape")
            return first.name == SUMS
    except (OSError, EOFError, tarfile.TarError, zlib.error):
        return False


def write_archive(project: Project, targets: list[str], output: Path, candidates: bool = False) -> str:
    """Write the archive (streaming) and return its sha256. Each artifact's bytes are checked against its build.json
    on the way in; a mismatch leaves nothing behind."""
    output = Path(output)
    _check_output(output)
    small, big = _plan(project, targets, candidates)
    for arc, (file, size, _) in big.items():
        try:
            st = file.stat()
        except OSError as e:
            raise UserError(f"{arc}: cannot read {file}: {e.strerror}; run `aitune-build build` again") from None
        if st.st_size != size:
            raise UserError(f"{file}: {st.st_size} bytes, its build.json says {size}: the output was modified; "
                            f"run `aitune-build build --force {arc.split('/')[1]}`")
    mtime = _mtime()
    dirs = sorted({str(PurePosixPath(p).parent) for p in [*small, *big]} - {"."} | {"targets"})
    entries = sorted([(d, "dir") for d in dirs] + [(p, "small") for p in small] + [(p, "big") for p in big])
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(output)  # the umask's mode from the start
    try:
        with os.fdopen(fd, "wb") as raw:
            out = _Hashing(dst=raw)
            with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:  # type: ignore[arg-type]
                with tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[arg-type]
                    for path, what in entries:
                        checkpoint("package-member")
                        info = tarfile.TarInfo(path)
                        info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, "", ""
                        if what == "dir":
                            info.type, info.mode = tarfile.DIRTYPE, 0o755
                            tar.addfile(info)
                        elif what == "small":
                            info.size, info.mode = len(small[path]), 0o644
                            tar.addfile(info, io.BytesIO(small[path]))
                        else:
                            file, size, want = big[path]
                            info.size, info.mode = size, 0o644
                            with open(file, "rb") as f:
                                src = _Hashing(src=f)
                                tar.addfile(info, src)  # type: ignore[arg-type]
                            if src.h.hexdigest() != want:
                                raise UserError(f"{file}: its bytes differ from its build.json (sha256 "
                                                f"{src.h.hexdigest()[:16]}…, recorded {want[:16]}…): the output was "
                                                f"modified; run `aitune-build build --force {path.split('/')[1]}`")
            raw.flush()
            os.fsync(raw.fileno())
        checkpoint("package-replace")
        os.replace(tmp, output)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return out.h.hexdigest()


# --- reading --------------------------------------------------------------------------------------------------------


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads pax and GNU long-name headers whole: refuse oversized ones before they are read."""

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                         tarfile.GNUTYPE_LONGLINK) and self.size > _HEADER_MAX:
            raise tarfile.SubsequentHeaderError(f"oversized extended header ({self.size} bytes)")
        return super()._proc_member(tf)  # type: ignore[misc]


def member_problem(m: tarfile.TarInfo, seen: set[str], files: set[str], parents: set[str]) -> str | None:
    """Why a member may not be in a release archive (or None); updates the seen/files/parents sets."""
    from .manifest import name_problem

    name = m.name
    if not name or name.startswith("/") or "\\" in name or "\0" in name or (len(name) > 1 and name[1] == ":"):
        return f"unsafe path in archive: {name!r}"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return f"unsafe path in archive: {name}"
    if len(name.encode("utf-8", "surrogateescape")) > _PATH_MAX or any(len(p.encode("utf-8", "surrogateescape")) > _COMPONENT_MAX for p in parts):
        return f"name too long in archive: {name[:60]}…"
    if m.issym() or m.islnk():
        import posixpath

        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname)) if m.issym() else m.linkname
        if posixpath.isabs(m.linkname) or target == ".." or target.startswith("../"):
            return f"link escapes the archive: {name} -> {m.linkname}"
        return f"links are not allowed in a release archive: {name} -> {m.linkname}"
    if not (m.isreg() or m.isdir()):
        return f"not a regular file or folder: {name} (devices, fifos and other special members are not allowed)"
    if name in seen:
        return f"duplicate member: {name}"
    seen.add(name)
    if m.isreg() and name in parents:
        return f"{name}: a file where the archive has a folder"
    for i in range(1, len(parts)):
        parent = "/".join(parts[:i])
        if parent in files:
            return f"{name}: inside {parent}, which is a file"
        parents.add(parent)
    if m.isreg():
        files.add(name)
    top = parts[0]
    if top in (SUMS, LOCK_NAME):
        if len(parts) != 1 or not m.isreg():
            return f"{name}: must be a file"
    elif top != "targets":
        return f"unexpected member outside targets/: {name}"
    elif len(parts) == 1:
        if not m.isdir():
            return "targets: must be a folder"
    else:
        # a tuned target's candidate ships as "T@B" (package --all-candidates): each half must be a name
        problem = next(filter(None, (name_problem(p) for p in parts[1].split("@", 1))), None)
        if problem:
            return f"targets/{parts[1]}: not a target name: {problem}"
        if len(parts) == 2 and not m.isdir():
            return f"{name}: a file where the archive has a target folder"
    return None


class _Scan:
    """One pass over an archive: each member checked, hashed (and written under dest when given)."""

    def __init__(self) -> None:
        self.meta: dict[str, bytes] = {}  # SHA256SUMS, aitune.lock, targets/*/build.json
        self.digests: dict[str, str] = {}  # every regular file: sha256
        self.sizes: dict[str, int] = {}


def _is_meta(name: str) -> bool:
    parts = name.split("/")
    return name in (SUMS, LOCK_NAME) or (len(parts) == 3 and parts[2] == "build.json")


def scan(path: Path, dest: Path | None = None) -> _Scan:
    """Read the archive once; raise BadArchive with the first problem. With dest, write its files under dest."""
    out = _Scan()
    seen: set[str] = set()
    files: set[str] = set()
    parents: set[str] = set()
    listed: dict[str, str] | None = None
    try:
        f = open(path, "rb")
    except OSError as e:
        raise BadArchive(f"cannot read archive: {e.strerror}") from None
    try:
        with f, gzip.GzipFile(fileobj=f) as gz:
            tar = tarfile.open(fileobj=gz, mode="r|", tarinfo=_BoundedTarInfo)  # type: ignore[arg-type]
            for i, m in enumerate(tar):
                problem = member_problem(m, seen, files, parents)
                if problem:
                    raise BadArchive(problem)
                if i == 0 and m.name != SUMS:
                    raise BadArchive(f"{SUMS} must be the archive's first member (found {m.name})")
                if dest is not None and m.isdir():
                    (dest / m.name).mkdir(parents=True, exist_ok=True)
                if not m.isreg():
                    continue
                if listed is not None and m.name not in listed:
                    raise BadArchive(f"{m.name}: in the archive but not listed in {SUMS}")
                src = tar.extractfile(m)
                h = hashlib.sha256()
                keep = _is_meta(m.name)
                if keep and m.size > _META_MAX:
                    raise BadArchive(f"{m.name}: {m.size} bytes, more than a {m.name.split('/')[-1]} can hold")
                buf = bytearray() if keep else None
                target = None
                if dest is not None:
                    (dest / m.name).parent.mkdir(parents=True, exist_ok=True)
                    target = open(dest / m.name, "xb")
                try:
                    while chunk := src.read(_CHUNK):  # type: ignore[union-attr]
                        h.update(chunk)
                        if buf is not None:
                            buf += chunk
                        if target is not None:
                            target.write(chunk)
                finally:
                    if target is not None:
                        target.close()
                out.digests[m.name], out.sizes[m.name] = h.hexdigest(), m.size
                if buf is not None:
                    out.meta[m.name] = bytes(buf)
                if m.name == SUMS:
                    listed = parse_sums(out.meta[SUMS])
            # The tar ended: what follows may only be its zero padding, then the gzip trailer (CRC and length,
            # checked by GzipFile on reaching the end).
            trailing = 0
            while chunk := gz.read(_CHUNK):
                trailing += len(chunk)
                if trailing > _TRAILING_MAX or chunk.count(0) != len(chunk):
                    raise BadArchive("data after the end of the tar archive")
    except BadArchive:
        raise
    except EOFError:
        raise BadArchive("truncated: the gzip stream ends before its end marker and trailer") from None
    except gzip.BadGzipFile as e:
        raise BadArchive(f"corrupt gzip data: {e}") from None
    except (tarfile.TarError, zlib.error) as e:
        raise BadArchive(f"cannot read archive: {e}") from None
    except OSError as e:
        raise BadArchive(f"cannot read archive: {e.strerror or e}") from None
    if SUMS not in out.meta:
        raise BadArchive(f"{SUMS} is missing")
    return out


def parse_sums(data: bytes) -> dict[str, str]:
    listed: dict[str, str] = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        if not name or not _DIGEST.fullmatch(digest):
            raise BadArchive(f"{SUMS}: malformed line: {line[:80]!r}")
        if name in listed:
            raise BadArchive(f"{SUMS}: {name} listed twice")
        listed[name] = digest
    return listed


def check_contents(s: _Scan) -> None:
    """Raise BadArchive with the first problem in a scanned archive's contents."""
    listed = parse_sums(s.meta[SUMS])
    for name, digest in sorted(listed.items()):
        if name not in s.digests:
            raise BadArchive(f"{name}: listed in {SUMS} but missing from the archive")
        if s.digests[name] != digest:
            raise BadArchive(f"{name}: sha256 does not match {SUMS}")
    extra = sorted(set(s.digests) - set(listed) - {SUMS})
    if extra:
        raise BadArchive(f"{extra[0]}: in the archive but not listed in {SUMS}")
    if LOCK_NAME not in s.meta:
        raise BadArchive(f"{LOCK_NAME} is missing")
    try:
        lock = json.loads(s.meta[LOCK_NAME])
    except (ValueError, RecursionError) as e:
        raise BadArchive(f"{LOCK_NAME}: not valid JSON: {str(e)[:200]}") from None
    if not isinstance(lock, dict) or lock.get("format") != LOCK_FORMAT:
        raise BadArchive(f"{LOCK_NAME}: unknown format {lock.get('format') if isinstance(lock, dict) else None!r}")
    targets = lock.get("targets")
    if not isinstance(targets, dict):
        raise BadArchive(f"{LOCK_NAME}: 'targets' is missing or not a table")
    in_archive = {n.split("/")[1] for n in s.digests if n.startswith("targets/")}
    for name in sorted(in_archive - set(targets)):
        raise BadArchive(f"targets/{name}: a target absent from the archive's {LOCK_NAME}")
    for name, entry in sorted(targets.items()):
        try:
            key, art_name, art_sha = entry["key"], entry["artifact"]["name"], entry["artifact"]["sha256"]
        except (KeyError, TypeError):
            raise BadArchive(f"{LOCK_NAME}: entry '{name}' lacks key or artifact name/sha256") from None
        if not all(isinstance(v, str) for v in (key, art_name, art_sha)) or "/" in art_name or art_name in ("", ".", ".."):
            raise BadArchive(f"{LOCK_NAME}: entry '{name}' is malformed")
        art = f"targets/{name}/{art_name}"
        if art not in s.digests:
            raise BadArchive(f"{art}: locked artifact of '{name}' is missing")
        if s.digests[art] != art_sha:
            raise BadArchive(f"{art}: sha256 differs from {LOCK_NAME}")
        try:
            rec = json.loads(s.meta[f"targets/{name}/build.json"])
        except (KeyError, ValueError, RecursionError):
            raise BadArchive(f"targets/{name}/build.json is missing or unreadable") from None
        if not isinstance(rec, dict) or rec.get("key") != key:
            raise BadArchive(f"targets/{name}/build.json: key differs from {LOCK_NAME}")


def verify_archive(path: Path) -> str | None:
    """The first problem with the archive at path, or None (reads it once, streaming)."""
    try:
        check_contents(scan(path))
    except BadArchive as e:
        return str(e)
    return None


# --- unpacking for load(archive=) -----------------------------------------------------------------------------------


def unpack_verified(path: Path, cache_dir: Path, state: Any = None) -> Path:
    """The verified, unpacked folder of the archive at path (under <cache>/releases-v1/, keyed by its digest).

    Unpacked once; re-verified on every call against the archive's SHA256SUMS: sizes and a per-file memo of
    (inode, size, mtime, ctime) when unchanged, full sha256 otherwise. A folder that no longer matches is discarded
    with a warning and unpacked again from the archive, never served."""
    from .hashing import StateCache
    from .paths import ensure_cache_root, remove_owned

    state = state or StateCache(None)
    try:
        digest = state.digest(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read archive: {e.strerror}") from None
    releases = cache_dir / RELEASES_DIR
    dest = releases / digest
    if dest.is_dir():
        problem = _recheck(path, dest)
        if problem is None:
            return dest
        warnings.warn(f"unpacked archive {dest} was modified ({problem}); unpacking it again", stacklevel=3)
        remove_owned(dest, cache_dir)
    try:
        ensure_cache_root(cache_dir)
        releases.mkdir(exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot unpack {path} into the cache {cache_dir}: {e.strerror}") from None
    _remove_dead_temps(releases)
    tmp = releases / f".{digest}.{os.getpid()}.tmp"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        s = scan(path, tmp)
        check_contents(s)
        _write_memo(tmp, parse_sums(s.meta[SUMS]))
        try:
            os.replace(tmp, dest)
        except OSError:  # another process unpacked it first
            pass
    except BadArchive as e:
        raise UserError(f"{path}: not a valid release archive: {e}") from None
    except OSError as e:
        raise UserError(f"cannot unpack {path} into {releases}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _remove_dead_temps(releases: Path) -> None:
    """Temp folders of unpacks whose process was killed: .<digest>.<pid>.tmp, owner gone, older than a minute."""
    import time

    from .store import _alive

    for p in releases.iterdir():
        m = re.fullmatch(r"\.[0-9a-f]+\.(\d+)\.tmp", p.name)
        try:
            if m and not _alive(int(m.group(1))) and time.time() - p.lstat().st_mtime > 60:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _stat_sig(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _write_memo(folder: Path, listed: dict[str, str]) -> None:
    from .fsutil import atomic_write_json

    memo = {name: _stat_sig((folder / name).lstat()) + [digest] for name, digest in listed.items()}
    try:
        atomic_write_json(folder / VERIFIED, memo)
    except OSError:
        pass  # a read-only cache: every load hashes in full


def _first_member(path: Path) -> bytes:
    """SHA256SUMS, read from the head of the archive (it is the first member)."""
    try:
        with open(path, "rb") as f, gzip.GzipFile(fileobj=f) as gz:
            tar = tarfile.open(fileobj=gz, mode="r|", tarinfo=_BoundedTarInfo)  # type: ignore[arg-type]
            m = tar.next()
            if m is None or m.name != SUMS or not m.isreg() or m.size > _META_MAX:
                raise BadArchive(f"{SUMS} is not the first member")
            return tar.extractfile(m).read()  # type: ignore[union-attr]
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
        raise BadArchive(f"cannot read archive: {e}") from None


def _recheck(archive: Path, folder: Path) -> str | None:
    """Why the unpacked folder no longer matches the archive's SHA256SUMS, or None."""
    from .hashing import sha256_file
    from .fsutil import read_json

    try:
        listed = parse_sums(_first_member(archive))
    except BadArchive as e:
        return str(e)
    memo = read_json(folder / VERIFIED) or {}
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir() or p.is_symlink()}
    extra = sorted(present - set(listed) - {SUMS, VERIFIED})
    if extra:
        return f"{extra[0]} is not part of the archive"
    changed = False
    for name, digest in listed.items():
        f = folder / name
        try:
            st = f.lstat()
        except OSError:
            return f"{name} is missing"
        if not os.path.isfile(f) or f.is_symlink():
            return f"{name} is not a regular file"
        sig = _stat_sig(st)
        if memo.get(name) == sig + [digest]:
            continue
        if sha256_file(f) != digest:
            return f"{name} does not match {SUMS}"
        memo[name] = sig + [digest]
        changed = True
    if changed:
        from .fsutil import atomic_write_json

        try:
            atomic_write_json(folder / VERIFIED, memo)
        except OSError:
            pass
    return None
