"""The shared remote cache against a real S3 server (SeaweedFS `weed mini`, started here) and a shared folder.

No mocks: builds are real torch builds, the server is a real S3 implementation on loopback, outages are real
(killed server, wrong credentials, missing bucket).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from aitune_build.cli import main

from .conftest import MANIFEST, make_project

WEED = Path(sys.executable).with_name("weed")
BUCKET = "aitune"
CREDS = {"AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": "sk"}


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class S3Server:
    """`weed mini` on loopback with every port it opens chosen free (two instances, or other people's, don't
    collide); stopped by its PID."""

    def __init__(self, root: Path):
        self.root = root
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> S3Server:
        self.root.mkdir(parents=True, exist_ok=True)
        names = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "filer.port", "filer.port.grpc",
                 "volume.port", "volume.port.grpc", "admin.port", "admin.port.grpc")
        ports = dict(zip(names, free_ports(len(names))))
        self.port = ports["s3.port"]
        args = [str(WEED), "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.root}", "-webdav=false",
                "-admin.ui=false", "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-filer.localSocket={self.root}/filer.sock", f"-s3.localSocket={self.root}/s3.sock",
                *(f"-{k}={v}" for k, v in ports.items())]
        env = {**os.environ, **CREDS, "S3_BUCKET": BUCKET}
        self.log = open(self.root / "weed.log", "wb")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited: {(self.root / 'weed.log').read_text()[-2000:]}")
            if self._bucket_ready():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("weed mini did not serve S3 within 60 s")

    def _bucket_ready(self) -> bool:
        import obstore
        from obstore.store import S3Store

        try:
            store = S3Store(BUCKET, endpoint=self.endpoint, client_options={"allow_http": True, "timeout": "2s"},
                            retry_config={"max_retries": 0}, access_key_id="ak", secret_access_key="sk", region="us-east-1")
            obstore.put(store, "ready", b"1")
            return True
        except Exception:
            return False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        if self.proc is not None:
            self.log.close()
        self.proc = None


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    server = S3Server(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture
def remote_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """Credentials and endpoint in the environment (the library's standard chain); a prefix of its own per test."""
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AITUNE_REMOTE_TIMEOUT", "3")
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    url = f"s3://{BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}-{time.monotonic_ns()}"
    monkeypatch.setenv("AITUNE_REMOTE_CACHE", url)
    return url


def cli(root: Path, *args: str) -> tuple[int, dict | None, str, str]:
    """(exit code, --json document or None, stdout, stderr)"""
    cwd = os.getcwd()
    try:
        r = CliRunner().invoke(main, ["-C", str(root), *args], catch_exceptions=False)
    finally:
        os.chdir(cwd)
    data = None
    if "--json" in args:
        try:
            data = json.loads(r.stdout)
        except ValueError:
            data = None
    return r.exit_code, data, r.stdout, r.stderr


def by_name(data: dict) -> dict[str, tuple[str, str | None]]:
    return {t["name"]: (t["status"], t.get("source")) for t in data["targets"]}


def clone(origin: Path, dest: Path) -> Path:
    """A fresh checkout: the committed files (sources, weights, aitune.toml, aitune.lock), no build/ nor cache."""
    shutil.copytree(origin, dest, ignore=shutil.ignore_patterns("build", ".aitune", "__pycache__"))
    return dest


def remote_objects(url: str) -> dict[str, tuple[int, str]]:
    import obstore

    from aitune_build.remote import object_store

    store = object_store(url)
    return {m["path"]: (m["size"], m["e_tag"]) for batch in obstore.list(store) for m in batch}


def file_digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test project, built once without a remote: tests push it to their own prefix instead of rebuilding."""
    root = make_project(tmp_path_factory.mktemp("origin") / "proj")
    saved = {k: os.environ.pop(k) for k in ("AITUNE_REMOTE_CACHE", "AITUNE_CACHE_DIR") if k in os.environ}
    try:
        code, data, out, err = cli(root, "build", "-j", "2", "--json")
        assert code == 0, (out, err)
    finally:
        os.environ.update(saved)
    return root


def warm(origin: Path, tmp_path: Path) -> Path:
    """A copy of the built origin (own cache) that pushes everything to this test's remote prefix."""
    root = tmp_path / "warm"
    shutil.copytree(origin, root)
    code, data, out, err = cli(root, "cache", "push", "--json")
    assert code == 0 and set(data["targets"].values()) == {"uploaded"}, (out, err)
    return root


# -- sharing --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_second_checkout_builds_nothing_and_gets_identical_bytes(remote_env: str, tmp_path: Path) -> None:
    first = make_project(tmp_path / "a")
    code, data, out, err = cli(first, "build", "-j", "2", "--json")
    assert code == 0, (out, err)
    assert {s for s, _ in by_name(data).values()} == {"built"} and {src for _, src in by_name(data).values()} == {"built"}
    assert data["remote"]["uploaded"] == 3 and data["remote"]["url"] == remote_env

    second = clone(first, tmp_path / "b")
    _, _, status_text, _ = cli(second, "status")
    assert status_text.count("up-to-date (remote)") == 3, status_text
    code, data, out, err = cli(second, "build", "--json")
    assert code == 0, (out, err)
    assert by_name(data) == {n: ("cached", "remote") for n in ("mlp_export", "mlp_eager", "adder_export")}
    assert not list((second / "build").rglob("build.log"))  # no worker ran
    for name in ("mlp_export", "adder_export"):
        assert file_digest(first / f"build/{name}/model.pt2") == file_digest(second / f"build/{name}/model.pt2")
    assert (first / "aitune.lock").read_bytes() == (second / "aitune.lock").read_bytes()  # the lock stays clean
    # the remote-fetched entry is a local entry now: a third build is a plain no-op, the remote untouched
    code, data, _, _ = cli(second, "build", "--json")
    assert by_name(data) == {n: ("cached", "local") for n in ("mlp_export", "mlp_eager", "adder_export")}
    assert "remote" not in data
    code, data, _, _ = cli(second, "cache", "stats", "--json")
    assert data["local"]["entries"] == 3 and data["remote"]["entries"] == 3 and data["remote"]["bytes"] > 0
    assert data["last_build"]["hits"] == 3 and data["last_build"]["uploaded"] == 0


@pytest.mark.slow
def test_explain_remote_names_the_component_that_differs(remote_env: str, origin: Path, tmp_path: Path) -> None:
    warm(origin, tmp_path)
    other = clone(origin, tmp_path / "other")
    code, data, out, _ = cli(other, "explain", "mlp_export", "--remote", "--json")
    assert code == 0 and data["holds"] and data["changes"] == [], out
    (other / "aitune.toml").write_text(MANIFEST.replace("args = { hidden = 8 }", "args = { hidden = 9 }"))
    code, data, out, _ = cli(other, "explain", "mlp_export", "--remote", "--json")
    assert not data["holds"] and data["changes"] == ["module.args.hidden: 8 -> 9"], out
    code, _, text, _ = cli(other, "status", "mlp_export")
    assert "up-to-date (remote)" not in text
    # a toolchain this remote never saw: still explained against the newest upload of the target
    (other / "aitune.toml").write_text(MANIFEST)
    (other / "models/helpers/deep.py").write_text("import torch\n\n\ndef act(x):\n    return torch.tanh(x)\n")
    code, _, text, _ = cli(other, "explain", "mlp_export", "--remote")
    assert "models/helpers/deep.py changed" in text and "not in the remote cache" in text


@pytest.mark.slow
def test_cache_pull_prefetches_for_an_offline_build(remote_env: str, origin: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    warm(origin, tmp_path)
    other = clone(origin, tmp_path / "other")
    code, data, out, err = cli(other, "cache", "pull", "--json")
    assert code == 0 and all(v.startswith("downloaded") for v in data["targets"].values()), (out, err)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # offline: nothing listens there
    code, data, out, err = cli(other, "build", "--json")
    assert code == 0 and {s for s, _ in by_name(data).values()} == {"cached"}
    assert {src for _, src in by_name(data).values()} == {"local"} and "warning" not in err


# -- corrupt entries ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_corrupt_or_truncated_remote_object_is_a_miss_rebuilt_and_replaced(remote_env: str, origin: Path,
                                                                            tmp_path: Path) -> None:
    import obstore

    from aitune_build.remote import object_store

    warm(origin, tmp_path)
    store = object_store(remote_env)
    recs = {n: json.loads((origin / f"build/{n}/build.json").read_text()) for n in ("mlp_export", "adder_export")}
    blob = lambda n: f"aitune-v1/blobs/{recs[n]['files']['model.pt2']['sha256'][:2]}/{recs[n]['files']['model.pt2']['sha256']}"  # noqa: E731
    good = bytes(obstore.get(store, blob("mlp_export")).bytes())
    obstore.put(store, blob("mlp_export"), bytes([good[0] ^ 0xFF]) + good[1:])  # same size, one byte flipped
    good2 = bytes(obstore.get(store, blob("adder_export")).bytes())
    obstore.put(store, blob("adder_export"), good2[: len(good2) // 2])  # truncated

    other = clone(origin, tmp_path / "other")
    code, data, out, err = cli(other, "build", "--json")
    assert code == 0, (out, err)
    assert by_name(data) == {"mlp_export": ("built", "built"), "adder_export": ("built", "built"), "mlp_eager": ("cached", "remote")}
    for n in ("mlp_export", "adder_export"):
        assert err.count(recs[n]["key"]) == 1, err  # reported once, with the key
    assert "does not match its checksum" in err and "truncated" in err
    assert data["remote"]["corrupt"] == 2 and data["remote"]["uploaded"] == 2

    third = clone(origin, tmp_path / "third")
    code, data, out, err = cli(third, "build", "--json")
    assert by_name(data) == {n: ("cached", "remote") for n in ("mlp_export", "mlp_eager", "adder_export")}, (out, err)
    assert file_digest(third / "build/mlp_export/model.pt2") == recs["mlp_export"]["files"]["model.pt2"]["sha256"]


def test_an_index_naming_paths_outside_the_entry_is_never_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aitune_build.remote import RemoteCache
    from aitune_build.store import ArtifactStore

    shared = tmp_path / "shared"
    key = "ab" * 16
    sha = hashlib.sha256(b"x").hexdigest()
    for name in ("../../outside", "/etc/passwd", "a/../../b"):
        idx = {"format": 1, "key": key, "files": {name: {"size": 1, "xxh3": "0", "sha256": sha}},
               "meta": {"key": key, "artifact": name, "components": {}}}
        p = shared / f"aitune-v1/entries/{key[:2]}/{key}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(idx))
        (shared / f"aitune-v1/blobs/{sha[:2]}").mkdir(parents=True, exist_ok=True)
        (shared / f"aitune-v1/blobs/{sha[:2]}/{sha}").write_bytes(b"x")
        seen: list[str] = []
        remote = RemoteCache(f"file://{shared}", "read", ArtifactStore(tmp_path / "cache"), "t", report=seen.append)
        assert remote.fetch(key) is None
        assert len(seen) == 1 and "unsafe path" in seen[0] and key in seen[0], seen
    assert not (tmp_path / "outside").exists()


# -- outages --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_server_killed_mid_build_finishes_locally_with_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = S3Server(tmp_path / "own-seaweedfs").start()
    try:
        root = make_project(tmp_path / "proj")
        env = {**os.environ, **CREDS, "AWS_ENDPOINT_URL": server.endpoint, "AWS_REGION": "us-east-1",
               "AITUNE_REMOTE_CACHE": f"s3://{BUCKET}/killed", "AITUNE_REMOTE_TIMEOUT": "2",
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        env.pop("AITUNE_CACHE_DIR", None)
        proc = subprocess.Popen([sys.executable, "-m", "aitune_build", "-C", str(root), "build", "--json"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not list((root / "build").glob("*/build.json")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        server.stop()  # the first target is built: the rest build without the remote
        out, err = proc.communicate(timeout=300)
    finally:
        server.stop()
    assert proc.returncode == 0, (out, err)
    data = json.loads(out)
    assert {s for s, _ in by_name(data).values()} == {"built"}
    assert err.count("warning:") == 1 and "unavailable" in err and f"s3://{BUCKET}/killed" in err, err
    assert data["remote"]["available"] is False


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["wrong-credentials", "missing-bucket"])
def test_wrong_credentials_or_missing_bucket_warn_once_and_build_locally(remote_env: str, tmp_path: Path, origin: Path,
                                                                         monkeypatch: pytest.MonkeyPatch, problem: str) -> None:
    if problem == "wrong-credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        url = remote_env
    else:
        url = "s3://no-such-bucket-here/x"
        monkeypatch.setenv("AITUNE_REMOTE_CACHE", url)
    other = clone(origin, tmp_path / "other")
    code, data, out, err = cli(other, "build", "adder_export", "--json")
    assert code == 0 and by_name(data) == {"adder_export": ("built", "built")}, (out, err)
    assert err.count("warning:") == 1 and f"remote cache {url} unavailable" in err, err
    assert "not-the-secret" not in err + out


@pytest.mark.slow
def test_credentials_in_a_url_are_never_printed(remote_env: str, tmp_path: Path, origin: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AITUNE_REMOTE_CACHE", "s3://AKIDSECRET:hunter2@no-such-bucket/x?token=hunter3")
    other = clone(origin, tmp_path / "other")
    code, data, out, err = cli(other, "build", "adder_export", "--json")
    assert code == 0 and data["remote"]["url"] == "s3://***@no-such-bucket/x"
    everything = out + err + (other / "aitune.lock").read_text() + (other / "build/adder_export/build.json").read_text()
    assert "hunter" not in everything and "AKIDSECRET" not in everything


@pytest.mark.parametrize("line,message", [
    ('remote_cache = "s3://ak:sk@bucket/x"', "project.remote_cache: credentials do not belong in aitune.toml"),
    ('remote_cache = "team-bucket/aitune"', "project.remote_cache: expected a URL such as s3://bucket/prefix"),
    ('remote_cache = "s3://b/x"\nremote_cache_mode = "rw"', "project.remote_cache_mode"),
])
def test_bad_remote_settings_are_one_line_naming_the_key(tmp_path: Path, line: str, message: str) -> None:
    root = make_project(tmp_path / "proj", MANIFEST.replace('name = "t"', f'name = "t"\n{line}'))
    code, _, out, err = cli(root, "status")
    assert code == 2 and f"aitune.toml: {message}" in err and "Traceback" not in err, err
    assert "sk@" not in err


@pytest.mark.slow
def test_without_obstore_one_warning_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    root = make_project(tmp_path / "proj")
    env = {**os.environ, "AITUNE_REMOTE_CACHE": f"file://{tmp_path / 'shared'}", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    probe = ("import sys\nsys.modules['obstore'] = None  # as where the [remote] extra is not installed\n"
             "from aitune_build.cli import main\nmain(sys.argv[1:])\n")
    out = subprocess.run([sys.executable, "-c", probe, "-C", str(root), "build", "adder_export", "--json"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("warning:") == 1 and "pip install 'aitune-build[remote]'" in out.stderr
    assert by_name(json.loads(out.stdout)) == {"adder_export": ("built", "built")}


# -- read-only, concurrency ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flag", "manifest"])
def test_read_only_mode_leaves_the_bucket_unchanged(remote_env: str, tmp_path: Path, origin: Path, how: str) -> None:
    warm(origin, tmp_path)
    before = remote_objects(remote_env)
    other = clone(origin, tmp_path / "other")
    (other / "models/helpers/deep.py").write_text("import torch\n\n\ndef act(x):\n    return torch.tanh(x)\n")  # mlp_*: a miss
    args = ["build", "--json"]
    if how == "flag":
        args.append("--remote-readonly")
    else:
        text = (other / "aitune.toml").read_text().replace('name = "t"', 'name = "t"\nremote_cache_mode = "read"')
        (other / "aitune.toml").write_text(text)
    code, data, out, err = cli(other, *args)
    assert code == 0, (out, err)
    assert by_name(data) == {"mlp_export": ("built", "built"), "mlp_eager": ("built", "built"), "adder_export": ("cached", "remote")}
    assert data["remote"]["mode"] == "read" and data["remote"]["uploaded"] == 0
    assert remote_objects(remote_env) == before
    if how == "manifest":
        code, _, _, err = cli(other, "cache", "push")
        assert code == 2 and "read-only" in err


_UPLOADER = """
import pathlib, sys, time
from aitune_build.store import ArtifactStore
from aitune_build.remote import RemoteCache
cache, url, content, go, key = sys.argv[1:]
store = ArtifactStore(pathlib.Path(cache))
tmp = store.new_tmp()
(tmp / "model.bin").write_bytes(content.encode() * 300_000)  # 3 MB: a few parts in flight
entry = store.put(key, tmp, {"key": key, "artifact": "model.bin", "components": {"toolchain": {}}})
remote = RemoteCache(url, "read-write", store, "t")
while not pathlib.Path(go).exists():
    time.sleep(0.001)
print(remote.upload_now(entry, "t"))
"""


@pytest.mark.slow
def test_two_processes_uploading_one_key_leave_one_complete_entry(remote_env: str, tmp_path: Path) -> None:
    from aitune_build.remote import RemoteCache
    from aitune_build.store import ArtifactStore

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for round_ in range(3):
        key = hashlib.md5(f"{remote_env}{round_}".encode()).hexdigest()
        go = tmp_path / f"go{round_}"
        # different bytes under one key, as two non-deterministic TensorRT builds of the same inputs give
        procs = [subprocess.Popen([sys.executable, "-c", _UPLOADER, str(tmp_path / f"c{round_}{w}"), remote_env, w, str(go), key],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in "AB"]
        time.sleep(1.5)
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        assert any(o[0].strip() == "True" for o in outs), outs
        seen: list[str] = []
        entry = RemoteCache(remote_env, "read", ArtifactStore(tmp_path / f"reader{round_}"), "t", report=seen.append).fetch(key)
        assert entry is not None and not seen, seen
        assert (entry.path / "model.bin").read_bytes() in (b"A" * 300_000, b"B" * 300_000)


# -- lock and releases -----------------------------------------------------------------------------------------------

AOT_MANIFEST = MANIFEST + """
[backends.aot]
kind = "inductor_aot"

[targets.mlp_aoti]
from = "mlp_export"
backend = "aot"
"""


@pytest.mark.slow
def test_locked_build_of_a_fresh_checkout_against_a_warm_remote(remote_env: str, tmp_path: Path) -> None:
    first = make_project(tmp_path / "a", AOT_MANIFEST)
    code, data, out, err = cli(first, "build", "-j", "2", "--json")
    assert code == 0, (out, err)
    lock = (first / "aitune.lock").read_bytes()
    # what the first checkout built (the lock pins only deterministic backends' bytes: export and eager here)
    pins = {n: json.loads((first / f"build/{n}/build.json").read_text())["files"][e["artifact"]["name"]]["sha256"]
            for n, e in json.loads(lock)["targets"].items()}
    assert "mlp_aoti" in pins
    assert all(e["artifact"].get("sha256") in (None, pins[n]) for n, e in json.loads(lock)["targets"].items())

    fresh = clone(first, tmp_path / "fresh")
    code, data, out, err = cli(fresh, "build", "--locked", "--json")
    assert code == 0, (out, err)
    assert by_name(data) == {n: ("cached", "remote") for n in ("mlp_export", "mlp_aoti", "mlp_eager", "adder_export")}
    assert "lock_artifacts" not in data
    assert (fresh / "aitune.lock").read_bytes() == lock
    for name, sha in pins.items():
        rec = json.loads((fresh / f"build/{name}/build.json").read_text())
        assert file_digest(fresh / f"build/{name}" / rec["artifact"]) == sha, name
    # a plain build leaves the lock alone too, and a release packaged from remote-fetched entries is the original's
    code, data, _, _ = cli(fresh, "build", "--json")
    assert (fresh / "aitune.lock").read_bytes() == lock
    for root in (first, fresh):
        code, _, out, err = cli(root, "package", "-o", str(root / "release.tar.gz"))
        assert code == 0, (out, err)
    assert (first / "release.tar.gz").read_bytes() == (fresh / "release.tar.gz").read_bytes()
    code, _, out, _ = cli(fresh, "verify", str(fresh / "release.tar.gz"))
    assert code == 0, out


# -- a shared folder -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_file_remote_on_a_shared_folder(tmp_path: Path, origin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    shared = tmp_path / "nfs" / "aitune"
    monkeypatch.setenv("AITUNE_REMOTE_CACHE", f"file://{shared}")
    warm(origin, tmp_path)
    assert len(list(shared.rglob("*.json"))) == 6  # 3 entries + 3 target pointers
    # what the remote says about the key's inputs is not believed: the record keeps the components computed here
    key = json.loads((origin / "build/mlp_eager/build.json").read_text())["key"]
    index = shared / f"aitune-v1/entries/{key[:2]}/{key}.json"
    forged = json.loads(index.read_text())
    forged["meta"]["components"]["module"]["factory"] = "os:system"
    index.write_text(json.dumps(forged))
    other = clone(origin, tmp_path / "other")
    code, data, out, err = cli(other, "build", "--json")
    assert code == 0 and by_name(data) == {n: ("cached", "remote") for n in ("mlp_export", "mlp_eager", "adder_export")}, (out, err)
    assert json.loads((other / "build/mlp_eager/build.json").read_text())["components"]["module"]["factory"] == "models.mlp:build"
    assert file_digest(other / "build/adder_export/model.pt2") == file_digest(origin / "build/adder_export/model.pt2")
    probe = ("import sys\nfrom aitune_build.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    assert e.code == 0, e.code\nassert 'torch' not in sys.modules\nprint('no torch')\n")
    for args in (["build"], ["status"], ["explain", "mlp_export", "--remote"], ["cache", "stats"]):
        r = subprocess.run([sys.executable, "-c", probe, "-C", str(other), *args], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert r.returncode == 0 and "no torch" in r.stdout, (args, r.stdout, r.stderr)
    code, data, _, _ = cli(other, "cache", "prune", "--remote", "--older-than", "0s", "--json")
    assert code == 0 and data["entries_removed"] == 3 and data["blobs_removed"] == 3
    assert not [p for p in shared.rglob("*") if p.is_file() and "/entries/" in str(p)]


# -- uploads that overlap the check ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_early_upload_appears_only_when_committed_with_the_bytes_sent(remote_env: str, tmp_path: Path) -> None:
    import obstore

    from aitune_build.remote import EARLY_MIN, RemoteCache, object_store
    from aitune_build.store import ArtifactStore

    remote = RemoteCache(remote_env, "read-write", ArtifactStore(tmp_path / "cache"), "t")
    store = object_store(remote_env)
    data = os.urandom(EARLY_MIN + (3 << 20) + 17)
    good = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (tmp_path / "a.bin").write_bytes(data)
    listing = lambda: {m["path"] for batch in obstore.list(store) for m in batch}  # noqa: E731

    early = remote.upload_early(tmp_path, "a.bin")
    early.withdraw()  # the check failed
    assert early.future.result() is False and listing() == set()
    early = remote.upload_early(tmp_path, "a.bin")
    assert early.commit({**good, "sha256": "0" * 64}) is False and listing() == set()  # the store holds other bytes
    early = remote.upload_early(tmp_path, "a.bin")
    (tmp_path / "a.bin").unlink()  # the store renames the folder meanwhile: the open file is what is sent
    while not (early.future.running() or early.future.done()):  # one not started yet is cancelled by commit instead
        time.sleep(0.001)
    assert early.commit(good) is True
    assert listing() == {remote.blob_path(good["sha256"])}
    assert bytes(obstore.get(store, remote.blob_path(good["sha256"])).bytes()) == data
    assert remote.upload_early(tmp_path, "a.bin") is None  # gone
    # withdrawn while sending: it stops there, not after sending all but the last piece
    big = os.urandom(64 << 20)
    (tmp_path / "b.bin").write_bytes(big)
    early = remote.upload_early(tmp_path, "b.bin")
    deadline = time.monotonic() + 60
    while early.streamed == 0 and not early.future.done() and time.monotonic() < deadline:
        time.sleep(0.001)
    early.withdraw()
    assert early.future.result() is False and listing() == {remote.blob_path(good["sha256"])}
    assert 0 < early.streamed <= len(big) // 2, early.streamed
    remote.finish()


BIG_MODELS = {
    "models/big.py": "import torch\n\n\nclass Big(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                     "        self.register_buffer('w', torch.arange(2_000_000, dtype=torch.float32))\n\n"
                     "    def forward(self, x):\n        return x + self.w[:64]\n\n\ndef build():\n    return Big()\n",
    # the same size, but its output depends on hidden state the export cannot see: its check fails
    "models/noisy.py": "import torch\n\n\nclass Noisy(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                       "        self.register_buffer('w', torch.zeros(2_000_000))\n\n"
                       "    def forward(self, x):\n        return x + torch.rand(x.shape) + self.w[:64]\n\n\ndef build():\n    return Noisy()\n",
}


@pytest.mark.slow
def test_a_big_artifact_is_sent_during_its_check_and_a_failed_check_sends_nothing(remote_env: str, tmp_path: Path) -> None:
    import obstore

    from aitune_build.remote import object_store

    root = make_project(tmp_path / "proj")
    for path, text in BIG_MODELS.items():
        (root / path).write_text(text)
    with open(root / "aitune.toml", "a") as f:
        for m in ("big", "noisy"):
            f.write(f'\n[modules.{m}]\nfactory = "models.{m}:build"\ninputs = [{{ name = "x", shape = [64] }}]\n'
                    f'[targets.{m}_export]\nmodule = "{m}"\nbackend = "exp"\n')
    code, data, out, err = cli(root, "build", "big_export", "noisy_export", "-k", "-j", "2", "--json")
    assert code == 1 and by_name(data) == {"big_export": ("built", "built"), "noisy_export": ("failed", None)}, (out, err)
    assert data["remote"]["uploaded"] == 1 and data["remote"]["sent_during_check"] == 1, data["remote"]

    store = object_store(remote_env)
    objects = {m["path"] for batch in obstore.list(store) for m in batch}
    rec = json.loads((root / "build/big_export/build.json").read_text())
    named = {f"aitune-v1/blobs/{f['sha256'][:2]}/{f['sha256']}" for f in rec["files"].values()}
    assert {p for p in objects if "/blobs/" in p} == named  # nothing of the target whose check failed
    assert [p for p in objects if "/entries/" in p] == [f"aitune-v1/entries/{rec['key'][:2]}/{rec['key']}.json"]

    other = clone(root, tmp_path / "other")
    code, data, out, err = cli(other, "build", "big_export", "--json")
    assert by_name(data) == {"big_export": ("cached", "remote")}, (out, err)
    assert file_digest(other / "build/big_export/model.pt2") == rec["files"]["model.pt2"]["sha256"]


@pytest.mark.slow
def test_an_early_upload_that_never_started_is_cancelled_not_waited_for(remote_env: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import obstore

    import aitune_build.remote as remote_mod
    from aitune_build.remote import EARLY_MIN, RemoteCache, object_store
    from aitune_build.store import ArtifactStore

    monkeypatch.setattr(remote_mod, "_EARLY_SLOTS", 1)  # every slot held by an upload waiting for its check
    remote = RemoteCache(remote_env, "read-write", ArtifactStore(tmp_path / "cache"), "t")
    for n in "ab":
        (tmp_path / f"{n}.bin").write_bytes(os.urandom(EARLY_MIN + 1))
    waiting = remote.upload_early(tmp_path, "a.bin")
    queued = remote.upload_early(tmp_path, "b.bin")
    data = (tmp_path / "b.bin").read_bytes()
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(queued.commit({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})))
    t.start()
    t.join(60)  # before the fix: blocked until `waiting` had its verdict, which here comes only after this commit
    waiting.withdraw()
    t.join()
    assert got == [False] and queued.file.closed  # the caller uploads it the usual way
    remote.finish()
    assert not [m for batch in obstore.list(object_store(remote_env)) for m in batch]
