"""Warm worker processes: the imports are paid once per build, not once per target.

Each compile still runs in a process of its own (a segfault or an OOM kill fails that target only, and its output
goes to that target's build.log), but the process is *forked* from a fork server that has already imported torch
and the modules the build's backends need (`Backend.preload`) — and never initialised CUDA.

    build process ──socket──> fork server (python -m aitune_build.workers FD MODULES...; imports done, no CUDA)
                                 └─ fork ─> one child per target: fd 1/2 → build.log, worker.main(job), exit

- One server per build process (`Workers`), started at the first target that needs building: a no-op build starts
  none. Concurrent builds of different projects each have their own server. (There used to be one server per
  backend family: a build with Torch-TensorRT and export targets paid the servers' `import torch` twice, in line.)
- A child exits after its target, so nothing it did (CUDA context, Inductor/TensorRT globals, imported user
  modules, memory) reaches the next target. CUDA is initialised only in children: the server checks after its
  imports that the CUDA driver is not initialised, and refuses to serve otherwise.
- The server forgets nothing it must not: it reaps its children and reports their exit status; when the build
  process goes away (its socket closes) it kills its children and exits. `Workers.interrupt()` (Ctrl-C) kills the
  running children at once.
- Spares (the Torch-TensorRT family): importing torch_tensorrt initialises CUDA, so the server cannot preload it
  and each child pays its import (7–9 s on an H200 host). When more targets of the family are pending, the server
  forks a *spare* for the GPU a job was given (same CUDA_VISIBLE_DEVICES): it imports the family's libraries
  (`SPARE_IMPORTS`) while that GPU's current target compiles, then waits for the next job of that family on that
  GPU. It compiles nothing until it has one, so a GPU still runs one compile at a time; a spare left unused at the
  end is killed with the server. At the build's first compile, each GPU that a target of the family will need gets
  a spare at once (`Workers.prime`), and the scheduler starts GPU targets without such imports (export) first, so
  the first import runs beside them rather than in line.
- Where fork is not available (not Linux, `AITUNE_WORKERS=subprocess`, or the server could not start), a worker is
  a fresh `python -m aitune_build.worker` process as before, and build.log says why.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build's scheduler reads SPARE_IMPORTS
if TYPE_CHECKING:
    from typing import Any

# What every worker imports besides its backends' `preload` (run_job's own modules).
COMMON_PRELOAD = ("aitune_build.worker", "aitune_build.check", "aitune_build.inputs", "aitune_build.factory")
ENV_MODE = "AITUNE_WORKERS"  # "subprocess": no fork server
# Per backend family: libraries the server must not import (they initialise CUDA) but a spare child imports ahead.
SPARE_IMPORTS = {"torch_tensorrt": ("torch_tensorrt",)}


def family_of(kind: str) -> str:
    return "torch_tensorrt" if kind.startswith("torch_tensorrt") else "torch"


def preload_for(kinds: set[str] | frozenset[str]) -> list[str]:
    """The modules the server imports: those of the build's backends, in a stable order."""
    from .backends import backend_for

    found: list[str] = []
    for kind in sorted(kinds):
        cls = backend_for(kind)
        for name in (*cls.preload, cls.__module__):
            if name not in found:
                found.append(name)
    return found + [m for m in COMMON_PRELOAD if m not in found]


def fork_unavailable() -> str | None:
    """Why workers are plain processes here; None when a fork server can be used."""
    if os.environ.get(ENV_MODE, "").lower() == "subprocess":
        return f"{ENV_MODE}=subprocess"
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return f"fork is not available on {sys.platform}"
    return None


def worker_env() -> dict[str, str]:
    """The workers' environment: this checkout's package first on PYTHONPATH, byte-code caching on."""
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parent.parent)
    # Absolute: an empty or relative entry means this process's working directory, which a persistent server's
    # worker does not share (and which a server's identity must not follow).
    given = [os.path.abspath(e) for e in env["PYTHONPATH"].split(os.pathsep)] if env.get("PYTHONPATH") else []
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent, *given])
    env.pop("AITUNE_KILL_AT", None)  # the fault-injection hook (faults.py) counts the build process's checkpoints only
    env["PYTHONSAFEPATH"] = "1"  # `python -m` would put the cwd first on sys.path: a project json.py would shadow json
    return env


class Interrupted(Exception):
    """The build was interrupted: no new worker starts."""


class Workers:
    """The build's worker processes: `run()` runs one job in a fresh child and returns its exit code."""

    def __init__(self, kinds: set[str] | frozenset[str] = frozenset(), server_idle_s: float | None = None,
                 server_kinds: set[str] | frozenset[str] = frozenset()) -> None:
        self.kinds = set(kinds)  # the backend kinds this build may run: what the server preloads
        self.server_idle_s = server_idle_s  # a persistent build server that idles this long (daemon.py); None: per build
        self.server_kinds = set(server_kinds) | self.kinds  # what a persistent server preloads (the whole manifest's)
        self._server_now: _ForkServer | str | None = None  # the server, or why there is none
        self._lock = threading.Lock()
        self._plain: set[Any] = set()  # running plain subprocesses and starting servers, for interrupt()
        self._interrupted = False
        self._attach_failed = ""  # why the persistent build server could not be used, for build.log

    def run(self, job: Path, log: Path, kind: str, env: dict[str, str], more: bool = False) -> int:
        """Run `python -m aitune_build.worker JOB` logic in a fresh process with ENV set on top of ours (before CUDA
        starts: CUDA_VISIBLE_DEVICES); its stdout/stderr go to LOG (truncated). Returns the exit code. more: other
        targets of this family are pending, so a spare for ENV is worth forking (families with SPARE_IMPORTS)."""
        if self._interrupted:
            raise Interrupted()
        self.kinds.add(kind)
        server = self._server()
        if self._interrupted:
            raise Interrupted()
        if isinstance(server, _ForkServer):
            late = list(SPARE_IMPORTS.get(family_of(kind), ()))
            with open(log, "wb") as f:
                if server.persistent:
                    up = time.time() - (server.since or time.time())
                    f.write(f"aitune-build: worker forked from the persistent build server (pid {server.pid}, up "
                            f"{up:.0f} s)\n".encode())
                else:
                    f.write(f"aitune-build: worker forked from the warm torch server (pid {server.pid})\n".encode())
                    if self._attach_failed:
                        f.write(f"aitune-build: {self._attach_failed}\n".encode())
            try:
                return server.run(job, log, env, late, spare=more and bool(late))
            except _ServerGone:
                pass  # died under us (killed?): the job's result is missing, reported as a crash
            return _LOST
        with open(log, "wb") as f:
            f.write(f"aitune-build: worker in a fresh process ({server})\n".encode())
        return run_plain(job, log, env, self._track, append=True)

    def prime(self, env: dict[str, str], kind: str) -> None:
        """A target of KIND will run with ENV later: where its family imports libraries late (SPARE_IMPORTS), a spare
        for ENV starts importing them now, beside whatever runs meanwhile. Best effort: no server, nothing to do."""
        late = list(SPARE_IMPORTS.get(family_of(kind), ()))
        if not late or self._interrupted:
            return
        server = self._server()
        if isinstance(server, _ForkServer):
            try:
                server.prime(env, late)
            except _ServerGone:
                pass

    def _server(self) -> _ForkServer | str:
        with self._lock:
            server = self._server_now
            if isinstance(server, _ForkServer) and not server.alive():  # killed: start another one
                server.close()
                server = None
            if server is None:
                server = fork_unavailable()
                if server is None and self.server_idle_s is not None:
                    server = _ForkServer.attach(preload_for(self.server_kinds), self._track, self.server_idle_s,
                                                lambda: self._interrupted)
                    if isinstance(server, str):  # noted in build.log; this build starts a server of its own
                        self._attach_failed = server
                        server = None
                if server is None:
                    server = _ForkServer.start(preload_for(self.kinds), self._track)
                self._server_now = server
            return server

    def _track(self, proc: Any, running: bool) -> None:
        if running:
            self._plain.add(proc)
            if self._interrupted:
                proc.kill()
        else:
            self._plain.discard(proc)

    def interrupt(self) -> None:
        """Ctrl-C: kill every running worker now; later run() calls raise Interrupted."""
        import signal

        self._interrupted = True  # without the lock: a thread may hold it while a server starts
        server = self._server_now
        if isinstance(server, _ForkServer):
            server.kill_children()
        for proc in list(self._plain):  # plain workers and servers still importing
            try:
                proc.send_signal(signal.SIGKILL)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            server, self._server_now = self._server_now, None
        if isinstance(server, _ForkServer):
            server.close()

    def pids(self) -> list[int]:
        """Process id of the fork server, if one runs (tests)."""
        return [self._server_now.pid] if isinstance(self._server_now, _ForkServer) else []


_LOST = -9  # exit code reported when the server died before telling a child's status
_SERVER_PID = 0  # in a forked child: the server's pid (its parent)


def run_plain(job: Path, log: Path, env: dict[str, str], track: Any = None, append: bool = False) -> int:
    """A fresh `python -m aitune_build.worker JOB` process, its output in LOG; its exit code."""
    import subprocess

    with open(log, "ab" if append else "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "aitune_build.worker", str(job)], stdout=logf,
                                stderr=subprocess.STDOUT, env={**worker_env(), **env})
    if track is not None:
        track(proc, True)
    try:
        return proc.wait()
    finally:
        if track is not None:
            track(proc, False)


class _ServerGone(Exception):
    pass


class _ForkServer:
    """Client side of one fork server: requests go out as JSON lines, a reader thread dispatches the replies."""

    def __init__(self, proc: Any, sock: Any, reader: Any, ready: dict[str, Any]):
        # proc: the server process this build started and owns; None for a persistent server (not ours to wait for)
        self.proc, self.sock, self.pid = proc, sock, ready.get("pid") if proc is None else proc.pid
        self.persistent = bool(ready.get("persistent"))
        self.since = ready.get("since")
        self._file = reader
        self.import_seconds = ready.get("imports", 0.0)
        self._send_lock = threading.Lock()
        self._waiters: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._next = 0
        self._gone = False
        self._reader = threading.Thread(target=self._read, name="aitune-forkserver", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, preload: list[str], track: Any) -> _ForkServer | str:
        """A ready server for this build, or why none could start (the reason is written to each build.log)."""
        ready = cls._spawn(preload, track)
        if isinstance(ready, str):
            return ready
        proc, ours, reader, hello = ready
        return cls(proc, ours, reader, hello)

    @classmethod
    def attach(cls, preload: list[str], track: Any, idle_s: float, cancelled: Any = lambda: False) -> _ForkServer | str:
        """The user's persistent build server for this toolchain (daemon.py), started if none answers; or why not.
        cancelled(): the build was interrupted (stop waiting for another build that is starting the server)."""
        from . import daemon

        env = worker_env()
        try:
            path = daemon.socket_path(preload, env)
        except OSError as e:
            return f"no persistent build server: {e}"

        def start() -> str | None:
            ready = cls._spawn(preload, track, listen=(str(path), idle_s))
            if isinstance(ready, str):
                return ready
            proc, ours, reader, _ = ready
            reader.close()
            ours.close()
            track(proc, False)
            return None

        sock = daemon.connect(path, start, cancelled)
        if isinstance(sock, str):
            return f"no persistent build server: {sock}"
        sock.settimeout(60)  # a server that accepted answers at once; one that does not is of no use
        reader = sock.makefile("rb")
        try:
            hello = json.loads(reader.readline() or b"{}")
        except (OSError, ValueError):
            hello = {}
        if not hello.get("ready"):
            sock.close()
            return "no persistent build server: it closed the connection"
        sock.settimeout(None)
        server = cls(None, sock, reader, hello)
        umask = os.umask(0)
        os.umask(umask)
        try:
            server._send({"base_env": env, "umask": umask})
        except _ServerGone:
            server.close()
            return "no persistent build server: it closed the connection"
        return server

    @staticmethod
    def _spawn(preload: list[str], track: Any, listen: tuple[str, float] | None = None) -> tuple[Any, Any, Any, dict] | str:
        """Start a server process; wait for its report. listen: (socket path, idle seconds) of a persistent one,
        started in a session of its own (Ctrl-C in the terminal is for the builds, not for it)."""
        import socket
        import subprocess
        import tempfile

        ours, theirs = socket.socketpair()
        errors = tempfile.TemporaryFile() if listen is None else \
            os.fdopen(os.open(f"{listen[0]}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        env = worker_env()
        if listen is not None:  # only what names it (daemon.identity): no build's CI job ids, cache folder, ...
            from .daemon import server_env

            env = server_env(env)
        try:
            args = [str(theirs.fileno()), *preload]
            if listen is not None:
                args = ["--listen", listen[0], str(listen[1]), *args]
            proc = subprocess.Popen([sys.executable, "-m", "aitune_build.workers", *args],
                                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=errors,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=listen is not None)
        except OSError as e:
            ours.close()
            errors.close()
            return f"fork server could not start: {e}"
        finally:
            theirs.close()
        track(proc, True)
        try:
            reader = ours.makefile("rb")
            line = reader.readline()
        finally:
            if listen is None:
                track(proc, False)
        try:
            ready = json.loads(line) if line else {}
        except ValueError:
            ready = {}
        if not ready.get("ready"):
            ours.close()
            if listen is not None:
                track(proc, False)
            proc.wait()
            if listen is None:
                errors.seek(0)
                tail = errors.read().decode(errors="replace").strip().splitlines()[-3:]
            else:
                tail = Path(f"{listen[0]}.log").read_text(errors="replace").strip().splitlines()[-3:]
            errors.close()
            why = ready.get("refused") or " / ".join(tail) or f"exit code {proc.returncode}"
            return f"fork server unavailable: {why}"
        errors.close()
        return proc, ours, reader, ready

    def alive(self) -> bool:
        return not self._gone and (self.proc is None or self.proc.poll() is None)

    def _send(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\n").encode()
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError:
                raise _ServerGone() from None

    def run(self, job: Path, log: Path, env: dict[str, str], late: list[str] = (), spare: bool = False) -> int:
        """Run JOB in a child with ENV; late: the modules its job imports that the server could not (SPARE_IMPORTS):
        a spare that imported them for ENV takes the job. spare: fork another such spare for ENV now."""
        with self._cond:
            self._next += 1
            rid = self._next
            self._waiters[rid] = {}
        try:
            self._send({"id": rid, "job": str(job), "log": str(log), "cwd": os.getcwd(), "env": env, "late": list(late),
                        "spare": spare})
            with self._cond:
                while "rc" not in self._waiters[rid] and not self._gone:
                    self._cond.wait()
                if "rc" not in self._waiters[rid]:
                    raise _ServerGone()
                return self._waiters[rid]["rc"]
        finally:
            with self._cond:
                self._waiters.pop(rid, None)

    def prime(self, env: dict[str, str], late: list[str]) -> None:
        """Fork a spare for ENV that imports LATE now, for a job that has not come yet (none if one is waiting)."""
        self._send({"prime": True, "env": env, "late": list(late)})

    def _read(self) -> None:
        try:
            for line in self._file:
                msg = json.loads(line)
                with self._cond:
                    w = self._waiters.get(msg.get("id"))
                    if w is not None:
                        w.update(msg)
                        self._cond.notify_all()
        except Exception:  # a broken line or socket: the server is of no further use
            pass
        with self._cond:
            self._gone = True
            self._cond.notify_all()

    def kill_children(self) -> None:
        import signal

        with self._cond:
            pids = [w["pid"] for w in self._waiters.values() if "pid" in w and "rc" not in w]
        for pid in pids:  # directly: the server may be busy; it reaps them
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self._send({"kill": True})
        except _ServerGone:
            pass

    def close(self) -> None:
        import socket

        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # the server sees EOF: kills any child left, exits
        except OSError:
            pass
        self.sock.close()
        if self.proc is None:  # a persistent server: it kills this build's children and spares, and stays
            return
        try:
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


# ---- the server process -------------------------------------------------------------------------------------------

def _cuda_initialised() -> bool:
    """Whether this process has initialised the CUDA driver (after which a forked child cannot use CUDA).

    Asks libcuda only if it is already loaded: cuDeviceGetCount returns CUDA_ERROR_NOT_INITIALIZED (3) before cuInit."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    if "libcuda.so" not in maps:
        return False
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        n = ctypes.c_int(0)
        return lib.cuDeviceGetCount(ctypes.byref(n)) != 3
    except OSError:
        return False


def serve(fd: int, preload: list[str], listen: str | None = None, idle_s: float = 0.0) -> int:
    """The server process. fd: a connected socket; the server reports {"ready"} or {"refused"} on it. Without
    LISTEN that socket is the one client (a build), and the server exits when it closes. With LISTEN (a persistent
    build server, `daemon.py`), fd is only for the report: clients connect to the Unix socket LISTEN, and the server
    exits once it has had no client and no child for IDLE_S seconds."""
    import importlib
    import select
    import signal
    import socket

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the build process's to handle (and the children's)
    # torch.cuda.is_available() through NVML, which does not initialise CUDA: libraries call it at import.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    first = socket.socket(fileno=fd)

    def send(sock: Any, msg: dict[str, Any]) -> None:
        sock.sendall((json.dumps(msg) + "\n").encode())

    t0 = time.perf_counter()
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError as e:
            send(first, {"refused": f"cannot import {name}: {e}"})
            return 1
    imports = time.perf_counter() - t0
    if _cuda_initialised():
        send(first, {"refused": "CUDA was initialised while importing the backend libraries; a forked child could not use it"})
        return 1
    listener = None
    if listen is not None:
        from . import daemon

        try:
            listener = daemon.bind(listen)
        except OSError as e:
            send(first, {"refused": f"cannot listen on {listen}: {e}"})
            return 1
        os.chdir("/")  # no build's folder is held; each child changes to its own build's
    global _SERVER_PID
    _SERVER_PID = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    conns: dict[int, _Conn] = {}  # fileno -> client
    children: dict[int, tuple[_Conn, int]] = {}  # pid -> (client, request id)
    reaping: set[int] = set()  # killed children and spares not yet reaped
    hello = {"ready": True, "imports": imports, "modules": len(sys.modules), "pid": os.getpid(),
             "persistent": listener is not None, "since": time.time()}
    send(first, hello)
    if listener is None:
        conns[first.fileno()] = _Conn(first)
    else:
        first.close()
        stopping: list[int] = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))  # `aitune-build server stop`
    last_busy = time.monotonic()

    def pipes() -> list[int]:  # what a forked process closes: every client's spare pipes
        return [w for c in conns.values() for _, w in c.spares.values()]

    def socks() -> list[Any]:
        return [c.sock for c in conns.values()] + ([listener] if listener is not None else [])

    def kill_all(conn: _Conn, gone: bool) -> None:  # a client's children and spares; gone: no reply is owed
        for pid, (owner, _) in children.items():
            if owner is conn:
                _kill(pid)
                if gone:
                    reaping.add(pid)
        for spid, wfd in conn.spares.values():
            _kill(spid)
            os.close(wfd)
            reaping.add(spid)
        conn.spares.clear()

    def drop(conn: _Conn) -> None:  # the client is gone or done: nothing it started may outlive it
        conns.pop(conn.sock.fileno(), None)
        kill_all(conn, gone=True)
        conn.sock.close()

    def fork_spare(conn: _Conn, env: dict[str, str], late: list[str]) -> tuple[int, int]:
        r, w = os.pipe()
        spid = os.fork()
        if spid == 0:
            os.close(w)
            os._exit(_spare(env, conn.base_env, conn.umask, late, r, socks(), wake_r, wake_w, *pipes()))
        os.close(r)
        return spid, w

    def handle(conn: _Conn, req: dict[str, Any]) -> None:
        conn.active = True
        if "base_env" in req:  # a persistent server's client: its environment and umask, for its children
            conn.base_env, conn.umask = req["base_env"], req.get("umask")
            return
        if req.get("stop"):  # `aitune-build server stop`
            if listener is not None:
                stopping.append(1)
            return
        if req.get("kill"):  # Ctrl-C in the build: its children's exit codes still go back to it
            kill_all(conn, gone=False)
            return
        late = req.get("late") or []
        env_key = json.dumps([req.get("env") or {}, late], sort_keys=True)
        if req.get("prime"):  # a spare for a job still to come, forked now: its imports run beside other work
            if late and env_key not in conn.spares:
                conn.spares[env_key] = fork_spare(conn, req.get("env") or {}, late)
            return
        spare = conn.spares.pop(env_key, None) if late else None
        pid = -1
        if spare is not None:  # a spare for this GPU imported the job's `late` already: the job goes down its pipe
            pid, wfd = spare
            try:
                os.write(wfd, (json.dumps(req) + "\n").encode())
            except OSError:
                pid = -1  # it died meanwhile (reaped above or soon): fork as usual
            os.close(wfd)
        if pid == -1:
            job = {**req, "base_env": conn.base_env, "umask": conn.umask}
            try:
                pid = os.fork()
            except OSError as e:  # EAGAIN, ENOMEM: this job fails, with the reason in its log; the server goes on
                with open(req["log"], "ab") as f:
                    f.write(f"aitune-build: the build server could not fork a worker: {e}\n".encode())
                send(conn.sock, {"id": req["id"], "rc": 1})
                return
            if pid == 0:
                os._exit(_child(job, None, socks(), wake_r, wake_w, *pipes()))
        children[pid] = (conn, req["id"])
        send(conn.sock, {"id": req["id"], "pid": pid})
        if req.get("spare") and late and env_key not in conn.spares:
            conn.spares[env_key] = fork_spare(conn, req.get("env") or {}, late)

    while True:
        if listener is not None and stopping:  # no new builds; those connected finish first
            if daemon.retire(listen, listener):
                listener.close()
                listener = None
        if not conns and not children and not reaping:
            if listener is None:
                break
            if time.monotonic() - last_busy >= idle_s and daemon.retire(listen, listener):
                break
        elif children or any(c.active for c in conns.values()):  # not a `server status` probe
            last_busy = time.monotonic()
        readable, _, _ = select.select([wake_r] + socks(), [], [], 1.0)
        if wake_r in readable:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
        while children or reaping or any(c.spares for c in conns.values()):
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                reaping.clear()
                break
            if pid == 0:
                break
            reaping.discard(pid)
            for c in conns.values():  # a spare that died before its job (its import crashed, a signal): forgotten
                for env_key, (spid, wfd) in list(c.spares.items()):
                    if spid == pid:
                        del c.spares[env_key]
                        os.close(wfd)
            owner, rid = children.pop(pid, (None, None))
            if owner is not None and owner.sock.fileno() in conns:
                try:
                    send(owner.sock, {"id": rid, "rc": os.waitstatus_to_exitcode(status)})
                except OSError:  # the client is gone: as at EOF, nothing of its may outlive it
                    drop(owner)
        if listener is not None and listener in readable:
            try:
                sock, _ = listener.accept()
            except OSError:
                pass
            else:
                if daemon.peer_uid(sock) != os.getuid():  # the folder is the user's alone; checked once more
                    sock.close()
                else:
                    conns[sock.fileno()] = _Conn(sock)
                    try:
                        send(sock, {**hello, "clients": len(conns)})
                    except OSError:
                        drop(conns[sock.fileno()])
        for conn in [c for c in conns.values() if c.sock in readable]:
            try:
                data = conn.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                drop(conn)
                continue
            conn.buf += data
            while b"\n" in conn.buf and conn.sock.fileno() in conns:
                line, conn.buf = conn.buf.split(b"\n", 1)
                try:
                    handle(conn, json.loads(line))
                except (OSError, ValueError, KeyError, TypeError) as e:  # one client's trouble is not the others'
                    print(f"aitune-build server: dropped a client: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    drop(conn)
    return 0


class _Conn:
    """One client of the server: its socket, its unread input, its spares, its environment (persistent server)."""

    def __init__(self, sock: Any):
        self.sock, self.buf = sock, b""
        self.spares: dict[str, tuple[int, int]] = {}  # [env, late] (JSON) -> (pid, write end of its job pipe)
        # A persistent server's client sends its environment: its children get exactly that (plus their GPU's).
        # None: one server per build, started with the build's environment.
        self.base_env: dict[str, str] | None = None
        self.umask: int | None = None
        self.active = False  # has sent something: a build, not a `server status` probe


def _kill(pid: int) -> None:
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _detach(socks: list[Any], fds: tuple[int, ...]) -> None:
    """In a forked process: undo the server's signal settings and close its sockets and pipes."""
    import signal

    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sock in socks:
        sock.close()
    for fd in fds:
        os.close(fd)
    try:  # if the server dies (killed, OOM), its children die too: none compiles on for a build that gave up on it
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != _SERVER_PID:  # it died before the above
        os._exit(1)


def _spare(env: dict[str, str], base_env: dict[str, str] | None, umask: int | None, late: list[str], jobs: int,
           socks: list[Any], *fds: int) -> int:
    """A child forked ahead of its job: set the GPU's environment, import LATE (output kept in a temp file, copied
    into the job's log), then wait for one job on the pipe JOBS and run it as `_child` does. EOF: no job, exit."""
    import importlib
    import tempfile

    try:
        _detach(socks, fds)
        _set_env(env, base_env, umask)  # before the imports start CUDA (CUDA_VISIBLE_DEVICES)
        out = tempfile.TemporaryFile()
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        t0 = time.perf_counter()
        failed = None
        for name in late:
            try:
                importlib.import_module(name)
            except BaseException as e:  # noqa: BLE001  (the job imports it again and reports)
                failed = f"{name}: {type(e).__name__}: {e}"
                break
        took = time.perf_counter() - t0
        sys.stdout.flush()
        sys.stderr.flush()
        with os.fdopen(jobs, "rb") as pipe:
            line = pipe.readline()
        if not line:
            return 0
        req = json.loads(line)
        out.seek(0)
        early = out.read()
        note = (f"aitune-build: spare worker: {', '.join(late)} imported ahead of this job in {took:.1f} s\n"
                if failed is None else f"aitune-build: spare worker: importing ahead failed ({failed})\n")
        with open(req["log"], "ab") as logf:
            logf.write(note.encode() + early)
    except BaseException:
        import traceback

        traceback.print_exc()  # into the spare's temp output, or the server's stderr before the redirect
        return 1
    return _child(req, time.time())


def _child(req: dict[str, Any], started: float | None, socks: list[Any] | None = None, *fds: int) -> int:
    """In the forked child (or a spare given its job): send fd 1/2 to the target's log, run the job."""
    import traceback

    started = started or time.time()
    try:
        if socks is not None:
            _detach(socks, fds)
        log = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.chdir(req["cwd"])
        _set_env(req.get("env") or {}, req.get("base_env"), req.get("umask"))  # before CUDA starts (CUDA_VISIBLE_DEVICES)
        from . import worker

        rc = worker.main([req["job"]], started)
    except BaseException:
        traceback.print_exc()
        rc = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    return rc


def _set_env(env: dict[str, str], base_env: dict[str, str] | None, umask: int | None = None) -> None:
    """A child's environment (and umask): its client's (a persistent server's client), or the server's own, plus ENV."""
    if umask is not None:
        os.umask(umask)
    if base_env is not None:
        nvml = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
        os.environ.clear()
        os.environ.update(base_env)
        if nvml is not None:
            os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", nvml)
    os.environ.update(env)


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "--listen":  # a persistent build server: --listen PATH IDLE_S FD MODULES...
        return serve(int(argv[3]), argv[4:], listen=argv[1], idle_s=float(argv[2]))
    return serve(int(argv[0]), argv[1:])


if __name__ == "__main__":
    code = _main(sys.argv[1:])
    # Its children are reaped by now. Skip the interpreter's shutdown: with torch imported it took ~1 s here (atexit
    # hooks, module teardown), which every build that compiled anything waited for in close().
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
