"""`build --executor ray` on a real local Ray cluster: a head node and a second node on this machine.

The cluster: head (1 CPU) and node2 (1 CPU, 1 fake GPU, custom resource `node2`, an nvidia-smi stub on its PATH);
both nodes have the test S3 server's credentials in their environment (nodes bring their own; the driver forwards
only where the remote is).
Started once for the module with `ray start` and stopped by PID (every process whose command line names the
cluster's temp folder), never with `ray stop`. The node-loss test kills node2's raylet, so it runs last.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from aitune_build.gpus import TEST_GPU_BOUND_ENV, GpuPlan
from aitune_build.hashing import StateCache
from aitune_build.keys import Fingerprinter, key_of
from aitune_build.manifest import load_manifest

from .conftest import run_cli, sigint_default
from .test_gpus import H100, fake_smi, uuid
from .test_remote import CREDS, remote_objects, s3  # noqa: F401 - s3: the SeaweedFS fixture

RAY = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
needs_ray = pytest.mark.skipif(RAY is None, reason="needs ray: pip install 'aitune-build[test]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ours(temp_dir: str) -> list[int]:
    """PIDs of the processes of our cluster: their command lines name its temp folder (or its session)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        if temp_dir.encode() in cmd:
            pids.append(int(d))
    return pids


def stop_cluster(temp_dir: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _ours(temp_dir):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + 10
        while _ours(temp_dir) and time.time() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if RAY is None:
        pytest.skip("needs ray: pip install 'aitune-build[test]'")
    temp_dir = tempfile.mkdtemp(prefix="ar", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **CREDS}
    env.pop("RAY_ADDRESS", None)
    smi = fake_smi(tmp_path_factory.mktemp("smi"), [H100])
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}", "--include-dashboard=false",
                        "--num-gpus=0", *common], env=env, check=True, capture_output=True, timeout=300)
        node2_env = {**env, "PATH": smi + os.pathsep + env["PATH"]}
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", "--num-gpus=1", '--resources={"node2": 1}', *common],
                       env=node2_env, check=True, capture_output=True, timeout=300)
        yield {"address": f"127.0.0.1:{port}", "temp_dir": temp_dir}
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


MANIFEST = """
[project]
name = "dist"

[backends.ref]
kind = "eager"

[backends.exp]
kind = "export"
"""

# The factory imports a project-local helper (the files must reach the nodes). `wait_for_peer` targets wait until
# another such target started, so only a build that runs them at once (on both 1-CPU nodes) passes;
# `die_on_node2` makes the first attempt on node2 hang, with a marker naming its raylet, until the node is killed.
PROBE = '''
import json, os, time
import torch
from models.shared import width

MARKS = {marks!r}


def _raylet():
    pid = os.getpid()
    for _ in range(6):
        pid = int(open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)[1].split()[1])
        cmd = open(f"/proc/{{pid}}/cmdline", "rb").read()
        if b"raylet/raylet" in cmd:
            return pid, b"node2,1" in cmd
    return None, False


def build(i=0, wait_for_peer=False, die_on_node2=False):
    t0 = time.time()
    if wait_for_peer:
        with open(os.path.join(MARKS, f"pid-{{i}}"), "w") as f:  # the worker process that builds this target
            f.write(str(os.getpid()))
        os.replace(os.path.join(MARKS, f"pid-{{i}}"), os.path.join(MARKS, f"started-{{i}}"))
        while not any(n.startswith("started-") and n != f"started-{{i}}" for n in os.listdir(MARKS)):
            if time.time() - t0 > 300:
                raise RuntimeError("no other target ran meanwhile")
            time.sleep(0.1)
    if die_on_node2:
        raylet, on_node2 = _raylet()
        done = os.path.join(MARKS, "killed-once")
        if on_node2 and not os.path.exists(done):
            open(done, "w").close()
            with open(os.path.join(MARKS, "raylet.json"), "w") as f:
                json.dump({{"raylet": raylet}}, f)
            parent = os.getppid()
            while os.getppid() == parent and time.time() - t0 < 600:  # until our Ray worker is gone
                time.sleep(0.2)
            os._exit(1)
    return torch.nn.Linear(width(), 2)


def big(n):
    torch.manual_seed(0)  # the same weights every time: a local build gives the same bytes
    return torch.nn.Linear(n, n)  # 4 n² bytes of weights
'''


def _project(root: Path, marks: Path, targets: dict[str, str]) -> Path:
    marks.mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True)
    (root / "models/__init__.py").write_text("")
    (root / "models/shared.py").write_text("def width():\n    return 4\n")
    (root / "models/probe.py").write_text(PROBE.format(marks=str(marks)))
    man = MANIFEST
    for i, (name, spec) in enumerate(targets.items()):
        backend, args = spec.split(" ", 1)
        factory, width = ("big", int(args.split()[1])) if args.startswith("big ") else ("build", 4)
        args = f"{{ n = {width} }}" if factory == "big" else args
        man += (f'\n[modules.m{i}]\nfactory = "models.probe:{factory}"\nargs = {args}\n'
                f'inputs = [{{ name = "input", shape = [2, {width}] }}]\n'
                f'\n[targets.{name}]\nmodule = "m{i}"\nbackend = "{backend}"\n')
    (root / "aitune.toml").write_text(man)
    return root


def _node_ids(temp_dir: str) -> dict[str, str]:
    """{"head": node id, "node2": node id}, read from the raylets' command lines."""
    found = {}
    for pid in _ours(temp_dir):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if not cmd[0].endswith(b"raylet/raylet"):
            continue
        node = next(a.split(b"=", 1)[1].decode() for a in cmd if a.startswith(b"--node_id="))
        found["node2" if any(b"node2,1" in a for a in cmd) else "head"] = node
    return found


@pytest.fixture
def ray_env(cluster, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    monkeypatch.delenv(TEST_GPU_BOUND_ENV, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", cluster["address"])
    return cluster


@pytest.mark.slow
@needs_ray
def test_cpu_targets_spread_over_both_nodes_with_the_projects_files(tmp_path: Path, ray_env) -> None:
    root = _project(tmp_path / "p", tmp_path / "marks", {
        "a": "ref { i = 1, wait_for_peer = true }", "b": "ref { i = 2, wait_for_peer = true }", "c": "exp { i = 3 }"})
    code, out, data = run_cli(root, "build", "--executor", "ray", "--json")
    assert code == 0, out
    assert [t["status"] for t in data["targets"]] == ["built"] * 3
    nodes = {t["name"]: json.loads((root / "build" / t["name"] / "build.json").read_text())["node"] for t in data["targets"]}
    ids = _node_ids(ray_env["temp_dir"])
    assert {nodes["a"], nodes["b"]} == {ids["head"], ids["node2"]}  # side by side: one on each node
    assert (root / "build/c/model.pt2").stat().st_size > 0
    local = Fingerprinter(load_manifest(root / "aitune.toml"), StateCache(None))
    assert {t["name"]: t["key"] for t in data["targets"]} == {n: key_of(local.components(n)) for n in ("a", "b", "c")}
    code, out, again = run_cli(root, "build", "--executor", "ray", "--json")
    assert code == 0 and {t["status"] for t in again["targets"]} == {"cached"}  # settled here: nothing shipped


@pytest.mark.slow
@needs_ray
def test_gpu_keys_name_the_clusters_gpu_and_two_runs_agree(tmp_path: Path, ray_env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TEST_GPU_BOUND_ENV, "eager")  # eager targets count as GPU targets (forwarded to the nodes)
    monkeypatch.setenv("PATH", fake_smi(tmp_path / "no-gpu-here", []) + os.pathsep + os.environ["PATH"])  # driver: no GPU
    root = _project(tmp_path / "p", tmp_path / "marks", {"g": "ref { i = 1 }", "c": "exp { i = 2 }"})
    runs = []
    for _ in range(2):
        code, out, data = run_cli(root, "build", "--executor", "ray", "--force", "--json")
        assert code == 0, out
        runs.append({t["name"]: t for t in data["targets"]})
    assert {n: t["key"] for n, t in runs[0].items()} == {n: t["key"] for n, t in runs[1].items()}
    ids = _node_ids(ray_env["temp_dir"])
    assert runs[0]["g"]["node"] == ids["node2"] and runs[0]["g"]["gpu"]["uuid"] == uuid(0)  # the only GPU node
    rec = json.loads((root / "build/g/build.json").read_text())
    assert rec["toolchain"]["gpu"] == {"name": H100[0], "compute_capability": "9.0"}
    # The same key as a build on that GPU computes locally.
    fp = Fingerprinter(load_manifest(root / "aitune.toml"), StateCache(None))
    fp.use_gpu_plan(GpuPlan({"name": H100[0], "compute_capability": "9.0"}))
    assert runs[0]["g"]["key"] == key_of(fp.components("g"))


def _sha(p: Path) -> str:
    import hashlib

    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.slow
@needs_ray
def test_an_artifact_larger_than_a_chunk_arrives_in_chunks_byte_identical(tmp_path: Path, ray_env,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AITUNE_RAY_CHUNK_BYTES", str(1 << 20))  # 1 MiB chunks; the artifacts are over 48 MiB
    monkeypatch.delenv("AITUNE_REMOTE_CACHE", raising=False)
    from_big = '\n[targets.of_big]\nfrom = "big"\nbackend = "ref"\n'  # the upstream goes to the node in chunks
    local = _project(tmp_path / "local", tmp_path / "marks", {"big": "exp big 3584"})  # the same targets, built here
    (local / "aitune.toml").write_text((local / "aitune.toml").read_text() + from_big)
    code, out, _ = run_cli(local, "build", "--json")
    assert code == 0, out
    root = _project(tmp_path / "p", tmp_path / "marks", {"big": "exp big 3584", "small": "exp { i = 1 }"})
    (root / "aitune.toml").write_text((root / "aitune.toml").read_text() + from_big)
    import tracemalloc

    import ray  # noqa: F401 - imported before measuring, as the local build imported ours

    tracemalloc.start()
    try:
        code, out, data = run_cli(root, "build", "--executor", "ray", "--json")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 0, out
    got = {t["name"]: t for t in data["targets"]}
    assert got["big"]["transfer"] == "chunks" and got["small"]["transfer"] == "inline"
    art = root / "build/big/model.pt2"
    assert art.stat().st_size > 48 << 20
    # This process never held an artifact whole: a chunk at a time, and the store's 8 MiB hashing buffer.
    assert peak < 24 << 20, f"the driver's Python heap peaked at {peak / 2**20:.1f} MiB"
    rec = json.loads((root / "build/big/build.json").read_text())
    assert rec["transfer"] == "chunks" and rec["files"]["model.pt2"]["sha256"] == _sha(art)
    assert "forked from the warm torch server" in (root / "build/big/build.log").read_text()
    assert _sha(art) == _sha(local / "build/big/model.pt2")  # byte-identical to a local build
    of_big = json.loads((root / "build/of_big/build.json").read_text())
    assert _sha(root / "build/of_big" / of_big["artifact"]) == _sha(local / "build/of_big" / of_big["artifact"])


@pytest.mark.slow
@needs_ray
def test_with_a_remote_cache_the_node_uploads_and_the_driver_downloads_verified(
        tmp_path: Path, ray_env, s3, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811 - the fixture
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # forwarded to the nodes; credentials are the nodes' own
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AITUNE_REMOTE_TIMEOUT", "5")
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)  # the driver's own, to read
    url = f"s3://aitune/ray-{time.monotonic_ns()}"
    monkeypatch.setenv("AITUNE_REMOTE_CACHE", url)
    monkeypatch.setenv("AITUNE_RAY_CHUNK_BYTES", str(1 << 20))
    root = _project(tmp_path / "p", tmp_path / "marks", {"big": "exp big 1024"})  # 4 MiB
    code, out, data = run_cli(root, "build", "--executor", "ray", "--json")
    assert code == 0, out
    [t] = data["targets"]
    assert t["status"] == "built" and t["transfer"] == "remote"  # not through the object store
    assert json.loads((root / "build/big/build.json").read_text())["transfer"] == "remote"
    art = root / "build/big/model.pt2"
    good = _sha(art)
    objects = remote_objects(url)
    assert f"aitune-v1/entries/{t['key'][:2]}/{t['key']}.json" in objects
    blob = f"aitune-v1/blobs/{good[:2]}/{good}"
    assert objects[blob][0] == art.stat().st_size
    stats = json.loads((root / ".aitune/remote-last-run.json").read_text())
    assert stats["hits"] == 1 and stats["bytes_down"] >= art.stat().st_size  # the driver fetched it from the remote
    assert stats["uploaded"] == 0  # the node uploaded it, not the driver
    # The remote's copy goes bad (same size, other bytes): a rebuild on the cluster must not serve it.
    import obstore

    from aitune_build.remote import object_store

    obstore.put(object_store(url), blob, b"x" * art.stat().st_size)
    code, out, data = run_cli(root, "build", "--executor", "ray", "--force", "--json")
    assert code == 1, out
    [t] = data["targets"]
    assert t["status"] == "failed" and "does not match" in t["reason"], t
    assert _sha(art) == good  # the output still holds the good build


def test_ray_missing_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    root = _project(tmp_path / "p", tmp_path / "marks", {"c": "exp { i = 1 }"})
    code, out, _ = run_cli(root, "build", "--executor", "ray")
    assert code == 2 and "pip install 'aitune-build[ray]'" in out and "Traceback" not in out
    (root / "aitune.toml").write_text((root / "aitune.toml").read_text().replace('name = "dist"', 'name = "dist"\nexecutor = "ray"'))
    code, out, _ = run_cli(root, "build")
    assert code == 2 and "pip install 'aitune-build[ray]'" in out


def test_a_transferred_artifact_is_checked_against_the_workers_digests(tmp_path: Path) -> None:
    from aitune_build.ray_executor import _receive
    from aitune_build.store import describe_files

    src = tmp_path / "src"
    src.mkdir()
    (src / "model.pt2").write_bytes(b"engine bytes")
    digests = describe_files(src)
    assert _receive({"model.pt2": b"engine bytes"}, digests, tmp_path / "ok") is None
    assert (tmp_path / "ok/model.pt2").read_bytes() == b"engine bytes"
    assert _receive({"model.pt2": b"engine bytez"}, digests, tmp_path / "bad") == "model.pt2 differs"
    assert not (tmp_path / "bad/model.pt2").exists()
    assert "outside" in _receive({"../x": b"engine bytes"}, {"../x": digests["model.pt2"]}, tmp_path / "esc")


def test_chunks_are_checked_as_they_arrive(tmp_path: Path) -> None:
    from aitune_build.ray_executor import _receive_chunks
    from aitune_build.store import describe_files

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    a, b = bytes(range(256)) * 40, b"second file"
    (src / "a.bin").write_bytes(a)
    (src / "sub/b.bin").write_bytes(b)
    digests = describe_files(src)
    chunks = [a[:4000], a[4000:8000], a[8000:], b]  # sorted names: a.bin, then sub/b.bin
    assert _receive_chunks(iter(chunks), digests, tmp_path / "ok") is None
    assert (tmp_path / "ok/a.bin").read_bytes() == a and (tmp_path / "ok/sub/b.bin").read_bytes() == b
    flipped = bytearray(chunks[1])
    flipped[7] ^= 1
    assert _receive_chunks(iter([chunks[0], bytes(flipped), *chunks[2:]]), digests, tmp_path / "bad") == "a.bin differs"
    assert not (tmp_path / "bad/a.bin").exists()
    assert "truncated" in _receive_chunks(iter(chunks[:2]), digests, tmp_path / "short")
    assert "longer" in _receive_chunks(iter([a + b"!", b]), digests, tmp_path / "long")
    assert "more data" in _receive_chunks(iter([*chunks, b"?"]), digests, tmp_path / "extra")


def test_a_node_removes_build_folders_that_killed_tasks_left(tmp_path: Path) -> None:
    from aitune_build.ray_executor import _remove_orphans

    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    old = time.time() - 7200
    for name, pid, mtime in (("aitune-ray-{}-orphan", dead.pid, old), ("aitune-ray-{}-young", dead.pid, None),
                             ("aitune-ray-{}-running", os.getpid(), old), ("other-{}", dead.pid, old)):
        d = tmp_path / name.format(pid)
        (d / "artifact").mkdir(parents=True)
        if mtime:
            os.utime(d, (mtime, mtime))
    assert _remove_orphans(tmp_path) == [f"aitune-ray-{dead.pid}-orphan"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"aitune-ray-{dead.pid}-young", f"aitune-ray-{os.getpid()}-running", f"other-{dead.pid}"])


@pytest.mark.slow
@needs_ray
def test_ctrl_c_cancels_outstanding_tasks(tmp_path: Path, ray_env) -> None:
    root = _project(tmp_path / "p", tmp_path / "marks", {"w": "ref { i = 1, wait_for_peer = true }"})  # waits forever
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "aitune_build", "-C", str(root), "build", "--executor", "ray"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=sigint_default)
    marks = tmp_path / "marks"
    deadline = time.time() + 300
    while not (marks / "started-1").exists():
        assert time.time() < deadline and proc.poll() is None, "the task never started"
        time.sleep(0.2)
    workers = [int((marks / "started-1").read_text())]  # the worker child that runs the target's factory
    assert _alive(workers[0])
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    deadline = time.time() + 120
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(_alive(p) for p in workers), "the cancelled task's worker still runs"
    assert not (root / "build/w/record.json").exists()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.slow
@needs_ray
def test_node_lost_mid_build_is_retried_on_another_node(tmp_path: Path, ray_env) -> None:
    # Runs last: it kills node2.
    marks = tmp_path / "marks"
    root = _project(tmp_path / "p", marks, {
        "x": "ref { i = 1, wait_for_peer = true, die_on_node2 = true }",
        "y": "ref { i = 2, wait_for_peer = true, die_on_node2 = true }"})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "aitune_build", "-C", str(root), "build", "--executor", "ray", "-k", "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ids = _node_ids(ray_env["temp_dir"])
    try:
        deadline = time.time() + 300
        while not (marks / "raylet.json").exists():
            assert time.time() < deadline and proc.poll() is None, "no target reached node2"
            time.sleep(0.2)
        time.sleep(0.2)
        os.kill(json.loads((marks / "raylet.json").read_text())["raylet"], signal.SIGKILL)  # node2 is lost
        out, err = proc.communicate(timeout=480)
    finally:
        proc.kill()
    assert out.strip().startswith("{"), (proc.returncode, out, err[-3000:])
    data = json.loads(out)
    got = {t["name"]: t for t in data["targets"]}
    assert proc.returncode == 0, (out, err)
    assert {t["status"] for t in got.values()} == {"built"}  # the lost target was retried ...
    assert {t["node"] for t in got.values()} == {ids["head"]}  # ... on the node that is left
