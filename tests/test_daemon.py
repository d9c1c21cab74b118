"""The persistent build server (AITUNE_BUILD_SERVER, daemon.py): real builds in real processes on the CPU.

Each test has its own XDG_RUNTIME_DIR, so its servers are its own; the fixture stops whatever is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import gone, make_project, sigint_default
from .test_tensorrt import gpu_project, needs_gpu  # noqa: F401  (the GPU project fixture)

PKG = str(Path(__file__).resolve().parent.parent)


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import shutil
    import tempfile

    run = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: a socket's path has at most 107 bytes
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    monkeypatch.delenv("AITUNE_WORKERS", raising=False)
    yield run
    for pid in _server_pids(run):  # a failed test must not leave a server behind
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(run, ignore_errors=True)


def test_a_runtime_folder_too_long_for_a_socket_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aitune_build import daemon

    long = tmp_path / ("x" * 80)
    long.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(long))
    assert daemon.folder() == Path(f"/tmp/aitune-build-{os.getuid()}")
    assert len(str(daemon.folder() / "server-0123456789abcdef01234567.sock.lock")) <= 107


def _server_pids(run: Path) -> list[int]:
    out = cli(Path("/tmp"), "server", "status", "--json", env={"XDG_RUNTIME_DIR": str(run)})
    return [s["pid"] for s in json.loads(out.stdout)["servers"]] if out.returncode == 0 else []


def cli(root: Path, *args: str, env: dict[str, str] | None = None, umask: int = 0o022) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": PKG, **(env or {})}
    return subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(root), *args], capture_output=True,
                          text=True, env=full, timeout=300, preexec_fn=lambda: os.umask(umask))


def first_line(root: Path, target: str) -> str:
    return (root / "build" / target / "build.log").read_text().splitlines()[0]


def server_pid(line: str) -> int:
    assert line.startswith("aitune-build: worker forked from the persistent build server (pid "), line
    return int(line.split("(pid ")[1].split(",")[0])


CWD_PROBE = """
import os, torch
class Probe(torch.nn.Module):
    def forward(self, x):
        return x * {factor}
def build():
    with open("seen.json", "w") as f:  # relative: the build's working directory, not the server's
        mask = os.umask(0); os.umask(mask)
        import json; json.dump({{"cwd": os.getcwd(), "mark": os.environ.get("AITUNE_TEST_MARK"),
                                 "threads": os.environ.get("OMP_NUM_THREADS"), "umask": mask}}, f)
    return Probe()
"""
PROBE_MANIFEST = """
[project]
name = "probe"
[modules.p]
factory = "models.probe:build"
inputs = [{ name = "x", shape = [2, 3] }]
[backends.exp]
kind = "export"
[targets.p_export]
module = "p"
backend = "exp"
"""


def probe_project(root: Path, factor: int) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "models/__init__.py").write_text("")
    (root / "models/probe.py").write_text(CWD_PROBE.format(factor=factor))
    (root / "aitune.toml").write_text(PROBE_MANIFEST)
    return root


def test_the_server_outlives_a_build_serves_the_next_one_of_another_project_and_stops(runtime: Path, tmp_path: Path) -> None:
    """Build, then build another project (same package name, other code, other folder): the second build's worker is
    forked from the same server, runs in the second project's folder with the second build's environment, and
    imports the second project's module, not the first one's. `server status` lists the server, `server stop` ends
    it and removes its socket."""
    env = {"AITUNE_BUILD_SERVER": "60"}
    one, two = probe_project(tmp_path / "one", 2), probe_project(tmp_path / "two", 3)
    started = cli(one, "server", "start", "--json")  # without the variable: builds that set it find this server
    assert started.returncode == 0, started.stderr
    pid = json.loads(started.stdout)["pid"]
    out = cli(one, "build", "--json", env=env)
    assert out.returncode == 0, out.stderr
    assert server_pid(first_line(one, "p_export")) == pid
    assert not gone(pid, 0.5), "the server left with its build"
    # A variable that cannot change what the server imports is not part of its identity: same server, and the
    # worker sees this build's value of it.
    out = cli(two, "build", "--json", env={**env, "AITUNE_TEST_MARK": "two"}, umask=0o027)
    assert out.returncode == 0, out.stderr
    assert server_pid(first_line(two, "p_export")) == pid
    seen = json.loads((two / "seen.json").read_text())
    assert Path(seen["cwd"]).resolve() == two.resolve()
    assert seen["mark"] == "two" and seen["umask"] == 0o027  # this build's, not the one that started the server
    import torch

    loaded = torch.export.load(str(two / "build/p_export/model.pt2")).module()
    assert torch.equal(loaded(x=torch.ones(2, 3)), torch.full((2, 3), 3.0))  # the second project's code, not the first's
    status = cli(tmp_path, "server", "status", "--json")
    assert [s["pid"] for s in json.loads(status.stdout)["servers"]] == [pid], status.stdout
    sock = Path(json.loads(status.stdout)["servers"][0]["socket"])
    assert sock.parent == runtime / "aitune-build" and oct(sock.parent.stat().st_mode & 0o777) == "0o700"
    stop = cli(tmp_path, "server", "stop")
    assert stop.returncode == 0 and f"pid {pid}" in stop.stdout, stop.stdout
    assert gone(pid, 10), "server stop did not stop it"
    assert not sock.exists()


@pytest.mark.slow
def test_another_environment_gets_another_server_and_an_idle_one_exits(runtime: Path, tmp_path: Path) -> None:
    """A variable that can change what the server imports or how (here OMP_NUM_THREADS, which torch reads at import)
    is part of the server's identity: a build with another value starts another server, and the child sees its own
    build's value. With AITUNE_BUILD_SERVER=10 a server exits 10 s after its last build, removing its socket."""
    root = probe_project(tmp_path / "p", 2)
    out = cli(root, "build", env={"AITUNE_BUILD_SERVER": "10", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    first = server_pid(first_line(root, "p_export"))
    assert json.loads((root / "seen.json").read_text())["threads"] == "1"
    out = cli(root, "build", "-f", env={"AITUNE_BUILD_SERVER": "10", "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    second = server_pid(first_line(root, "p_export"))
    assert second != first
    assert json.loads((root / "seen.json").read_text())["threads"] == "2"
    assert gone(first, 25) and gone(second, 25), "an idle server did not exit"
    assert not list((runtime / "aitune-build").glob("*.sock"))


@pytest.mark.slow
def test_a_killed_server_is_replaced_and_builds_at_once_share_one(runtime: Path, tmp_path: Path) -> None:
    """SIGKILL the server between builds: its socket file stays, the next build finds nobody answering, starts a new
    server and builds. Two builds started at the same moment (no server yet) start one server between them."""
    env = {"AITUNE_BUILD_SERVER": "60"}
    a, b = make_project(tmp_path / "a"), make_project(tmp_path / "b")
    out = cli(a, "build", "mlp_export", env=env)
    assert out.returncode == 0, out.stderr
    dead = server_pid(first_line(a, "mlp_export"))
    os.kill(dead, signal.SIGKILL)
    assert gone(dead, 10)
    full = {**os.environ, "PYTHONPATH": PKG, **env}
    procs = [subprocess.Popen([sys.executable, "-m", "aitune_build", "-C", str(root), "build", "-f", "mlp_export",
                               "adder_export"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full)
             for root in (a, b)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    pids = {server_pid(first_line(root, t)) for root in (a, b) for t in ("mlp_export", "adder_export")}
    assert len(pids) == 1 and dead not in pids, pids


def test_a_bad_setting_is_one_clear_error_and_an_unsafe_folder_falls_back(runtime: Path, tmp_path: Path) -> None:
    """AITUNE_BUILD_SERVER=soon: exit 2 naming the variable, nothing built. A socket folder that others may open
    (mode 0777) is not used: the build runs with a server of its own and its build.log says why."""
    root = probe_project(tmp_path / "p", 2)
    out = cli(root, "build", env={"AITUNE_BUILD_SERVER": "soon"})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "AITUNE_BUILD_SERVER" in out.stderr + out.stdout and "Traceback" not in out.stderr
    assert not (root / "build/p_export/model.pt2").exists()
    (runtime / "aitune-build").mkdir()
    (runtime / "aitune-build").chmod(0o777)
    out = cli(root, "build", env={"AITUNE_BUILD_SERVER": "60"})
    assert out.returncode == 0, out.stderr
    lines = (root / "build/p_export/build.log").read_text().splitlines()
    assert lines[0].startswith("aitune-build: worker forked from the warm torch server"), lines[:2]
    assert "no persistent build server" in lines[1] and "not a folder only this user can open" in lines[1], lines[:2]
    assert not list((runtime / "aitune-build").glob("*.sock"))


SLEEPY = "import os, pathlib, time\n\ndef build():\n    pathlib.Path(os.environ['AITUNE_TEST_SLEEP_MARK']).write_text(str(os.getpid()))\n    time.sleep(300)\n"


def sleepy_project(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """(root, mark, env): a project whose `sleepy_export` factory writes its pid to MARK and sleeps; ENV builds it
    with a build server."""
    root = probe_project(tmp_path / "p", 2)
    (root / "models/sleepy.py").write_text(SLEEPY)
    (root / "aitune.toml").write_text((root / "aitune.toml").read_text() + (
        '\n[modules.sleepy]\nfactory = "models.sleepy:build"\ninputs = [{ name = "x", shape = [2] }]\n'
        '[targets.sleepy_export]\nmodule = "sleepy"\nbackend = "exp"\n'))
    mark = tmp_path / "mark"
    return root, mark, {**os.environ, "PYTHONPATH": PKG, "AITUNE_BUILD_SERVER": "60", "AITUNE_TEST_SLEEP_MARK": str(mark)}


def test_ctrl_c_kills_the_builds_worker_in_the_server_and_the_server_stays(runtime: Path, tmp_path: Path) -> None:
    """The worker is the server's child, in the server's session, so the terminal's Ctrl-C does not reach it: the
    build kills it (and its spares) itself. The build stops promptly, stores nothing, and the server serves on."""
    root, mark, env = sleepy_project(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "aitune_build", "-C", str(root), "build", "sleepy_export"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=sigint_default)
    try:
        deadline = time.monotonic() + 120
        while not (mark.exists() and mark.read_text()) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert mark.exists(), proc.communicate()[0]
        child, server = int(mark.read_text()), server_pid(first_line(root, "sleepy_export"))
        assert child != server
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 10, "not prompt"
        assert proc.returncode != 0, out
        assert gone(child, 5), "the worker outlived its build"
        assert not gone(server, 1), "the server went with the build"
        assert not (root / "build/sleepy_export/build.json").exists()
        out2 = cli(root, "build", "p_export", env={"AITUNE_BUILD_SERVER": "60", "AITUNE_TEST_SLEEP_MARK": str(mark)})
        assert out2.returncode == 0, out2.stderr
        assert server_pid(first_line(root, "p_export")) == server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_servers_identity_names_what_it_imports_and_not_the_build_s_folder(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from aitune_build import daemon

    env = {"PYTHONPATH": PKG, "PATH": "/usr/bin", "AITUNE_CACHE_DIR": str(tmp_path / "c1"), "OMP_NUM_THREADS": "2"}
    first = daemon.identity(["torch"], env)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "new-file").write_text("")  # the working directory changes under every build
    assert daemon.identity(["torch"], env) == first
    assert daemon.identity(["torch"], {**env, "AITUNE_CACHE_DIR": str(tmp_path / "c2")}) == first  # the build's own
    assert daemon.identity(["torch"], {**env, "OMP_NUM_THREADS": "4"}) != first  # torch reads it at import
    assert daemon.identity(["torch"], {**env, "LD_LIBRARY_PATH": "/opt/lib"}) != first
    assert daemon.identity(["torch", "torch._inductor.compile_fx"], env) != first


def test_a_client_that_breaks_off_or_talks_junk_does_not_take_the_server_down(runtime: Path, tmp_path: Path) -> None:
    """The server is shared: a build killed right after sending a job (its reply cannot be delivered) or a client
    sending a line that is not a request is dropped alone; a build connected at the same time goes on, and the next
    one still finds the server."""
    import socket

    from aitune_build.workers import _ForkServer

    good = _ForkServer.attach(["json"], lambda *_: None, 30)
    assert isinstance(good, _ForkServer) and good.persistent, good
    path = next((runtime / "aitune-build").glob("*.sock"))
    try:
        for line in (b'{"id": 1, "job": "/nonexistent.json", "log": "%s", "cwd": "/", "env": {}}\n' % str(tmp_path / "a.log").encode(),
                     b"this is not json\n", b'{"no": "id"}\n'):
            rogue = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            rogue.connect(str(path))
            rogue.makefile("rb").readline()  # the hello
            rogue.sendall(line)
            rogue.close()  # gone before the reply
        time.sleep(0.5)
        assert good.alive()
        assert good.run(tmp_path / "missing.json", tmp_path / "b.log", {}) == 1  # its job ran and failed on its own
        assert "FileNotFoundError" in (tmp_path / "b.log").read_text()
        again = _ForkServer.attach(["json"], lambda *_: None, 30)
        assert isinstance(again, _ForkServer) and again.pid == good.pid
        again.close()
    finally:
        good.close()


@pytest.mark.slow
def test_workers_die_with_a_killed_server(runtime: Path, tmp_path: Path) -> None:
    """SIGKILL the server while a build's worker runs: the worker dies with it (it would otherwise compile on for a
    build that reported it lost), and the build reports the target as crashed."""
    root, mark, env = sleepy_project(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "aitune_build", "-C", str(root), "build", "--json", "sleepy_export"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (mark.exists() and mark.read_text()) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert mark.exists(), proc.communicate()
        child, server = int(mark.read_text()), server_pid(first_line(root, "sleepy_export"))
        os.kill(server, signal.SIGKILL)
        assert gone(child, 5), "the worker outlived its server"
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, (out, err)
        assert json.loads(out)["targets"][0]["status"] == "failed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_empty_or_relative_pythonpath_entry_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`export PYTHONPATH=$PYTHONPATH:/x` leaves an empty entry, which means the working directory: a persistent
    server's worker has another one, and the server's identity must not follow that folder's mtime."""
    from aitune_build import daemon
    from aitune_build.workers import worker_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep + "rel")
    entries = worker_env()["PYTHONPATH"].split(os.pathsep)
    assert entries[1:] == [str(tmp_path), str(tmp_path / "rel")], entries
    before = daemon.identity(["json"], worker_env())
    (tmp_path / "aitune.lock").write_text("{}")  # a build rewrites files in its folder
    assert daemon.identity(["json"], worker_env()) == before


def test_what_servers_gone_for_a_day_left_is_removed_and_nothing_else(tmp_path: Path) -> None:
    from aitune_build import daemon

    base = tmp_path / "f"
    base.mkdir()
    old, fresh, live, held = (base / f"server-{n}.sock" for n in ("old", "fresh", "live", "held"))
    for sock in (old, fresh, live, held):
        Path(f"{sock}.lock").write_text("")
        Path(f"{sock}.log").write_text("")
    live.write_text("")  # its socket is there: its server may still run
    day_ago = time.time() - 2 * 86400
    for sock in (old, live, held):
        os.utime(f"{sock}.lock", (day_ago, day_ago))
    import fcntl

    fd = os.open(f"{held}.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a build of that toolchain is starting its server
    try:
        removed = daemon.prune(base, keep=base / "server-new.sock")
    finally:
        os.close(fd)
    assert sorted(removed) == ["server-old.sock.lock", "server-old.sock.log"], removed
    assert all(Path(f"{s}.lock").exists() for s in (fresh, live, held))


@pytest.mark.gpu
@needs_gpu
def test_torch_tensorrt_targets_build_in_the_persistent_server_and_rebuild_from_it(runtime: Path,
                                                                                   gpu_project: Path) -> None:  # noqa: F811
    """On a GPU: an export target and a Torch-TensorRT target built by children of one persistent server, the TRT one
    in a spare that imported torch_tensorrt ahead (the server itself never does: it would start CUDA, and it refuses
    to serve then); a `-f` rebuild of the TRT target forks from the same server, and its engine passes the check."""
    env = {"AITUNE_BUILD_SERVER": "120",  # torch_tensorrt may come from PYTHONPATH (the GPU machine's wheels)
           "PYTHONPATH": os.pathsep.join(p for p in (PKG, os.environ.get("PYTHONPATH")) if p)}
    names = ["cnn_export", "cnn_aot32"]
    out = cli(gpu_project, "build", "-k", "--json", "--gpus", "0", *names, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert {t["name"]: t["status"] for t in json.loads(out.stdout)["targets"]} == dict.fromkeys(names, "built")
    pids = {server_pid(first_line(gpu_project, n)) for n in names}
    assert len(pids) == 1, pids
    (pid,) = pids
    second = (gpu_project / "build/cnn_aot32/build.log").read_text().splitlines()[1]
    assert second.startswith("aitune-build: spare worker: torch_tensorrt imported ahead"), second
    assert not gone(pid, 0.5), "the server left with its build"
    again = cli(gpu_project, "build", "-f", "--json", "--gpus", "0", "cnn_aot32", env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    (rebuilt,) = json.loads(again.stdout)["targets"]
    assert rebuilt["status"] == "built", rebuilt
    assert server_pid(first_line(gpu_project, "cnn_aot32")) == pid
    rec = json.loads((gpu_project / "build/cnn_aot32/build.json").read_text())
    assert rec["gpu"]["index"] == "0" and all(v["passed"] for v in rec["check"]["variants"].values()), rec["check"]
    stop = cli(gpu_project, "server", "stop", env=env)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert gone(pid, 20), "server stop did not stop it"
