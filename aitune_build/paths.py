"""Where aitune-build may write and delete: only inside folders it created and marked.

    <out_dir>/.aitune-out      written when the tool creates (or adopts an empty) out_dir
    <cache_dir>/CACHEDIR.TAG   written when the tool creates a cache (https://bford.info/cachedir/)

Every delete or overwrite checks that its path lies strictly inside such a folder. out_dir and cache_dir are checked
when a project is opened: never `/`, empty, the project folder or one that holds it, never a source package (or a
folder holding one), never each other.
"""

from __future__ import annotations

import os
import threading
import re
from pathlib import Path

from .errors import AituneError, UserError

OUT_MARKER = ".aitune-out"
CACHEDIR_TAG_NAME = "CACHEDIR.TAG"
CACHEDIR_SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"
CACHEDIR_TAG = (
    f"{CACHEDIR_SIGNATURE}\n"
    "# This file is a cache directory tag created by aitune-build.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)
# What the tool writes at a cache root (any format version): `clean --cache` removes these and nothing else.
_CACHE_OWNED = re.compile(r"(store|releases)-v\d+|state-v\d+\.json|\.state-v\d+\.json\..*\.tmp|CACHEDIR\.TAG|\.gitignore")


class NotOwned(AituneError):
    """A delete or overwrite outside what the tool created: refused (a bug or a hostile layout, never done)."""


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def check_layout(root: Path, out_dir: tuple[str, str, Path], cache_dir: tuple[str, str, Path],
                 sources: list[Path]) -> None:
    """Raise UserError for an out_dir/cache_dir (each (key, value as written, resolved path)) that is unsafe."""
    root = root.resolve()
    srcs = [s.resolve() for s in sources]
    resolved = []
    for key, raw, path in (out_dir, cache_dir):
        if "\0" in raw:
            raise UserError(f"{key}: a path may not contain a NUL character")
        if not raw.strip():
            raise UserError(f"{key}: must not be empty (the default is '{'build' if 'out' in key else '.aitune'}')")
        p = Path(os.path.realpath(path))
        resolved.append(p)
        if p.parent == p:
            raise UserError(f"{key}: '{raw}' is the filesystem root; name a folder of its own, e.g. 'build'")
        if _inside(root, p):
            what = "the project folder" if p == root else "a folder that holds the project"
            raise UserError(f"{key}: '{raw}' is {what}; name a folder of its own, e.g. 'build'")
        for s in srcs:
            if _inside(s, p) or _inside(p, s):
                rel = s.relative_to(root) if _inside(s, root) else s
                raise UserError(f"{key}: '{raw}' overlaps the project's sources ({rel}); name a folder of its own")
        if p.exists() and not p.is_dir():
            raise UserError(f"{key}: '{raw}' is a file, not a folder")
    (okey, oraw, _), (ckey, craw, _) = out_dir, cache_dir
    o, c = resolved
    if _inside(o, c) or _inside(c, o):
        raise UserError(f"{okey} and {ckey}: '{oraw}' and '{craw}' overlap; outputs and cache need folders of their own")


def source_paths(root: Path, factories: list[str], files: list[str]) -> list[Path]:
    """The top-level package (or module file) of each factory, and the given files (weights, samples, manifest)."""
    out = []
    for f in factories:
        top = f.split(":")[0].split(".")[0]
        pkg = root / top
        out.append(pkg if pkg.is_dir() else pkg.with_suffix(".py"))
    out += [root / f for f in files]
    return out


def ensure_out_dir(out_dir: Path) -> None:
    """Create out_dir with its marker, or adopt an existing one that is empty or holds only target folders the tool
    wrote (build.json/build.log inside); anything else is refused: its files are not ours to overwrite."""
    marker = out_dir / OUT_MARKER
    if marker.is_file():
        return
    with _OUT_DIR_LOCK:  # the executor's threads materialise at once: one of them creates the marker
        if marker.is_file():
            return
        if out_dir.exists():
            # the marker itself may appear meanwhile: another process adopting the same folder
            foreign = [p.name for p in out_dir.iterdir() if p.name != OUT_MARKER and not (
                p.is_dir() and ((p / "build.json").is_file() or (p / "build.log").is_file() or not any(p.iterdir())))]
            if foreign:
                raise UserError(f"project.out_dir: {out_dir} holds files aitune-build did not write ({foreign[0]}); "
                                "choose another out_dir or empty that folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        from .fsutil import atomic_write_bytes

        atomic_write_bytes(marker, b"This folder holds aitune-build outputs; `aitune-build clean` deletes in it.\n")


_OUT_DIR_LOCK = threading.Lock()


def owns_out_dir(out_dir: Path) -> bool:
    return (out_dir / OUT_MARKER).is_file()


def ensure_cache_root(cache_dir: Path) -> None:
    """Create the cache root and its CACHEDIR.TAG (left alone when present)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tag = cache_dir / CACHEDIR_TAG_NAME
    if not tag.exists():
        from .fsutil import atomic_write_bytes

        atomic_write_bytes(tag, CACHEDIR_TAG.encode())


def is_cache_root(cache_dir: Path) -> bool:
    try:
        return (cache_dir / CACHEDIR_TAG_NAME).read_text(errors="replace").startswith(CACHEDIR_SIGNATURE)
    except OSError:
        return False


def remove_owned(path: Path, owner: Path) -> bool:
    """Delete path (file or folder) when it lies strictly inside owner, a folder the tool marked. True if it existed."""
    owner_r, path_r = owner.resolve(), Path(os.path.realpath(path.parent)) / path.name
    if path_r == owner_r or not _inside(path_r, owner_r) or path.name in ("", ".", ".."):
        raise NotOwned(f"refusing to delete {path}: not inside {owner}")
    if not (owns_out_dir(owner_r) or is_cache_root(owner_r) or is_cache_root(owner_r.parent)):
        raise NotOwned(f"refusing to delete {path}: {owner} carries no aitune-build marker")
    if path.is_symlink() or path.is_file():
        path.unlink()
        return True
    if path.is_dir():
        import shutil  # not on a no-op build's path

        shutil.rmtree(path)
        return True
    return False


def clean_cache(cache_dir: Path) -> list[Path]:
    """Remove what the tool wrote at a cache root (store, unpacked releases, state, tag); leave everything else."""
    if not cache_dir.exists():
        return []
    if not is_cache_root(cache_dir):
        raise UserError(f"{cache_dir} is not an aitune-build cache (no CACHEDIR.TAG written by it); nothing removed")
    removed = []
    for p in sorted(cache_dir.iterdir()):
        if _CACHE_OWNED.fullmatch(p.name) and p.name not in (CACHEDIR_TAG_NAME, ".gitignore"):
            if remove_owned(p, cache_dir):
                removed.append(p)
    left = [p for p in cache_dir.iterdir() if p.name not in (CACHEDIR_TAG_NAME, ".gitignore")]
    if not left:
        for name in (".gitignore", CACHEDIR_TAG_NAME):
            (cache_dir / name).unlink(missing_ok=True)
        try:
            cache_dir.rmdir()
        except OSError:
            pass
    return removed


def io_problem(e: OSError) -> str:
    """One line for an OSError met while building: what happened, where, and what to do."""
    import errno

    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"disk full{where}: {e.strerror}; free space (or shrink the cache: aitune-build gc --max-size ...) and build again"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where}: {e.strerror}; for a read-only cache pass --cache-readonly"
    if e.errno == errno.ENOENT:
        return f"a folder disappeared during the build{where} (was `aitune-build clean` run meanwhile?); build again"
    return f"{type(e).__name__}{where}: {e.strerror or e}"
