"""The persistent build server (opt-in: AITUNE_BUILD_SERVER): a fork server that outlives the build that started it.

One build's fork server (workers.py) pays `import torch` and the backends' modules once per build: 4-12 s before the
first target compiles. Set `AITUNE_BUILD_SERVER=1` (or a number of seconds) and the server stays up after the
build, so the next build of an edit-rebuild loop, of a CI job's second step, or of a benchmark, forks its workers
at once. As Bazel's and Gradle's servers do:

- one server per user and *toolchain*: its socket's name is a digest of the interpreter, the modules it preloads
  (those of every backend kind the project's manifest uses, so that building any of its targets finds it), the
  environment variables that can change what it imports (`IDENTITY_PREFIXES`: PYTHONPATH, LD_LIBRARY_PATH, CUDA_*,
  TORCH*, OMP_*, ...), the mtimes of the folders on its sys.path (a `pip install` changes them) and aitune-build's
  own source files. Change any of these and the next build starts another server; the old one exits when idle.
  Each worker gets its own build's environment, whole.
- it exits after its idle time (`AITUNE_BUILD_SERVER=1`: 600 s; `AITUNE_BUILD_SERVER=N`: N seconds, N >= 10) with
  no build connected and no worker running; `aitune-build server stop` stops them now.
- its socket lives in a folder only the user can open (`$XDG_RUNTIME_DIR/aitune-build`, else, or where that path
  is too long for a socket, `/tmp/aitune-build-<uid>`; mode 0700, checked): no other user can run jobs in it.
- the server runs with only the variables above, in `/`, so no build's CI job ids, cache folder or working
  directory stay with it; a connecting process must be the user's (SO_PEERCRED).
- everything else is as for one build's server: CUDA is never initialised in it; each target runs in a child forked
  for it, with the build's whole environment, working directory and umask; a build that goes away takes its
  children and spares with it; concurrent builds share the server, each with its own children; a client that
  sends junk or vanishes mid-request is dropped alone; children die with a killed server (PR_SET_PDEATHSIG).
- not carried over from a build: resource limits, CPU affinity and cgroup of the build process; the cgroup is part
  of the identity (a CI or batch job's servers are its own), limits and affinity are the starting build's.
- starting and retiring are serialised by a lock file beside the socket, so a build never connects to a server that
  is about to exit, and two builds starting at once start one server. A build that starts a server removes the lock
  files (and logs) of servers gone for a day.
- the idle time is that of the build that started the server; a later build's AITUNE_BUILD_SERVER=N does not
  change it (a value that differs only there still finds the same server).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterator

ENV = "AITUNE_BUILD_SERVER"
DEFAULT_IDLE_S = 600.0
MAX_FOLDER = 107 - 1 - 36 - len(".lock")  # the socket path's limit, less the socket's name
# The environment variables that can change what the server imports or how (the interpreter's, the loader's, CUDA's,
# torch's and its compilers', threads, locale, caches): part of its identity. Its children get their own build's
# environment, whole, so that the rest (AITUNE_CACHE_DIR, a CI job's ids, ...) need not start another server.
IDENTITY_PREFIXES = ("PYTHON", "LD_", "PATH", "CUDA", "NVIDIA", "TORCH", "PYTORCH", "TRITON", "TENSORRT", "TRT",
                     "ATEN_", "OMP_", "MKL_", "KMP_", "OPENBLAS", "NCCL", "GLIBC_TUNABLES", "MALLOC_", "CC", "CXX",
                     "CFLAGS", "CPATH", "LIBRARY_PATH", "HOME", "USER", "TMPDIR", "XDG_CACHE_HOME", "LANG", "LC_",
                     "TZ", "VIRTUAL_ENV", "CONDA_PREFIX")
LOCK_WAIT_S = 300.0  # at most this long for another build that is starting the server (an import of torch and more)


def idle_seconds() -> float | None:
    """The idle time asked for by AITUNE_BUILD_SERVER; None: off (one server per build). Raises ValueError on junk."""
    raw = os.environ.get(ENV, "").strip().lower()
    if raw in ("", "0", "off", "no", "false"):
        return None
    if raw in ("1", "on", "yes", "true"):
        return DEFAULT_IDLE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 10 or value == float("inf"):
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: give 1 (keep a build server up 600 s after the last build), a "
                         "number of seconds of at least 10, or 0 (no build server)")
    return value


def folder() -> Path:
    """The user's socket folder, created 0700; raises OSError if it is not the user's alone."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "aitune-build" if runtime and _owned(runtime) else None
    if base is None or len(str(base)) > MAX_FOLDER:  # a socket's path has at most 107 bytes
        base = Path(f"/tmp/aitune-build-{os.getuid()}")
    base.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(base)
    import stat

    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise OSError(f"{base} is not a folder only this user can open (owner {st.st_uid}, mode {oct(st.st_mode & 0o777)})")
    return base


def _owned(folder: str) -> bool:
    try:
        st = os.stat(folder)
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def server_env(env: dict[str, str]) -> dict[str, str]:
    """The environment a server is started with: only what names it (each child gets its own build's whole)."""
    return {k: v for k, v in env.items() if k.startswith(IDENTITY_PREFIXES)}


def identity(preload: list[str], env: dict[str, str]) -> str:
    """The digest that names a server: what decides what its children would import and run. ENV: the workers'
    environment (workers.worker_env: PYTHONPATH entries absolute)."""
    pkg = Path(__file__).resolve().parent
    sources = []
    for f in sorted(pkg.rglob("*.py")):
        st = f.stat()
        sources.append((str(f.relative_to(pkg)), st.st_mtime_ns, st.st_size))
    # The installed packages' folders with their mtimes (an install or uninstall changes them). Not sys.path[0] (the
    # script's folder or, for `python -m`, the working directory: a worker has neither), and PYTHONPATH's entries by
    # name only, in `env` below (a project folder there changes its mtime on every build).
    given = set(env.get("PYTHONPATH", "").split(os.pathsep))
    paths = []
    for entry in sys.path[1:]:
        if not entry or os.path.abspath(entry) in given:
            continue
        try:
            paths.append((entry, os.stat(entry).st_mtime_ns))
        except OSError:
            paths.append((entry, None))
    try:
        cgroup = Path("/proc/self/cgroup").read_text()  # a CI job's or batch job's cgroup: its server dies with it
    except OSError:
        cgroup = ""
    what = {"python": sys.executable, "version": sys.version, "preload": preload, "sources": sources, "paths": paths,
            "env": server_env(env), "cgroup": cgroup, "uid": os.getuid()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def socket_path(preload: list[str], env: dict[str, str]) -> Path:
    return folder() / f"server-{identity(preload, env)}.sock"  # 36 bytes


class _Lock:
    """An exclusive flock on PATH.lock: starting a server and retiring one are serialised by it. wait: for at most
    LOCK_WAIT_S, polling, and not past cancelled() (raises TimeoutError); else raises OSError at once."""

    def __init__(self, path: Path | str, wait: bool = True, cancelled: Any = lambda: False):
        import fcntl
        import time

        self.fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError:
                if not wait or cancelled() or time.monotonic() > deadline:
                    os.close(self.fd)
                    if not wait:
                        raise
                    raise TimeoutError(f"another build has been starting the build server for {LOCK_WAIT_S:.0f} s "
                                       "or was interrupted") from None
                time.sleep(0.05)

    def release(self) -> None:
        os.close(self.fd)  # releases the flock


def bind(path: str) -> Any:
    """In the server: listen on PATH (a stale socket file there is replaced; the starting build holds the lock)."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(64)
    _bound[sock.fileno()] = _file_id(path)
    return sock


_bound: dict[int, tuple[int, int] | None] = {}  # listener's fd -> (device, inode) of the socket file it created


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _is_ours(path: str, listener: Any) -> bool:
    """Whether PATH is still the socket file this server bound (not removed, not another server's since)."""
    mine = _bound.get(listener.fileno())
    return mine is not None and _file_id(path) == mine


def retire(path: str, listener: Any) -> bool:
    """Stop listening, unless a build is connecting right now (it is accepted and served first). True: the socket
    is gone (ours removed, or replaced by another server's)."""
    import select

    if not _is_ours(path, listener):
        return True
    try:
        lock = _Lock(path, wait=False)
    except OSError:
        return False  # a build is starting or connecting: stay
    try:
        if select.select([listener], [], [], 0)[0]:
            return False  # one connected just before: serve it
        if _is_ours(path, listener):
            os.unlink(path)
            try:
                if os.path.getsize(f"{path}.log") == 0:  # kept where the server wrote something: its errors
                    os.unlink(f"{path}.log")
            except OSError:
                pass
        return True
    finally:
        lock.release()


def prune(base: Path, keep: Path, older_than_s: float = 86400.0) -> list[str]:
    """Remove what servers gone for a day left in BASE (a lock file per identity, a log they wrote): only files
    whose socket is gone, untouched for OLDER_THAN_S, and, for a lock, not held by anyone (taken before removal).
    Called by a build that is starting a server. Returns the names removed."""
    import time

    removed = []
    cutoff = time.time() - older_than_s
    for lock in base.glob("server-*.sock.lock"):
        sock = Path(str(lock)[: -len(".lock")])
        try:
            if sock == keep or sock.exists() or lock.stat().st_mtime > cutoff:
                continue
            held = _Lock(sock, wait=False)
        except OSError:
            continue  # gone meanwhile, or held: a build of that toolchain is starting its server right now
        try:
            for f in (Path(f"{sock}.log"), lock):
                try:
                    f.unlink()
                    removed.append(f.name)
                except FileNotFoundError:
                    pass
        finally:
            held.release()
    return removed


def peer_uid(sock: Any) -> int:
    """The user id of the process at the other end of a Unix socket (SO_PEERCRED); -1 if unknown."""
    import socket
    import struct

    try:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (OSError, AttributeError):
        return -1
    return uid


def connect(path: Path, start: Any, cancelled: Any = lambda: False) -> Any:
    """A socket connected to the server at PATH; start(): spawn one and wait until it listens (returns a reason
    string if it could not), called under the lock when none answers. Returns the socket or the reason."""
    import socket

    try:
        lock = _Lock(path, cancelled=cancelled)
    except TimeoutError as e:
        return str(e)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError:
            sock.close()
        prune(path.parent, keep=path)
        why = start()
        if isinstance(why, str):
            return why
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except OSError as e:
            sock.close()
            return f"the build server started but does not accept connections: {e}"
        return sock
    finally:
        lock.release()


def servers(stop: bool = False) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The user's build servers that answer: (socket, hello). stop: ask each to stop (it takes no new build and
    exits once the builds connected to it end) — over its socket, so no other process can be hit by mistake."""
    import socket

    try:
        base = folder()
    except OSError:
        return
    for path in sorted(base.glob("server-*.sock")):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            sock.connect(str(path))
            hello = json.loads(sock.makefile("rb").readline() or b"{}")
            if stop:
                sock.sendall(b'{"stop": true}\n')
        except (OSError, ValueError):
            continue
        finally:
            sock.close()
        yield path, hello
