"""Injected faults with real mechanisms: a full disk (small tmpfs mounts), a read-only cache (a read-only mount),
SIGKILL at every checkpoint of build, package and gc (aitune_build.faults), gc racing a build."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import make_project

REPO = Path(__file__).resolve().parent.parent


def cli(root: Path, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real command line in a child process (so that SIGKILL and mounts act on a real process)."""
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(root), *args], capture_output=True,
                          text=True, env=full, timeout=timeout)


def no_traceback(p: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr


class Tmpfs:
    def __init__(self, path: Path, size: str):
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): needs root")
        self.path = path

    def fill(self, leave: int = 0) -> Path:
        """Fill the file system (in a child process, as another program would), leaving about `leave` bytes free."""
        filler = self.path / ".filler"
        st = os.statvfs(self.path)
        free = st.f_bavail * st.f_frsize
        count = max(0, free - leave) if leave else free + (1 << 20)
        subprocess.run(["sh", "-c", f"head -c {count} /dev/zero > '{filler}'"], capture_output=True)
        return filler

    def readonly(self, ro: bool = True) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if ro else 'rw'}", str(self.path)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def mounts():
    made: list[Tmpfs] = []

    def make(path: Path, size: str) -> Tmpfs:
        t = Tmpfs(path, size)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def _touch_source(root: Path) -> None:
    f = root / "models/adder.py"
    f.write_text(f.read_text() + f"# edit {time.time_ns()}\n")
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - 10_000_000_000))


def _intact(out: Path, target: str) -> dict:
    """The build.json of out/target, after checking that every file it lists has its recorded digest."""
    rec = json.loads((out / target / "build.json").read_text())
    for name, want in rec["files"].items():
        assert hashlib.sha256((out / target / name).read_bytes()).hexdigest() == want["sha256"], name
    return rec


def _loads(root: Path, *targets: str) -> None:
    """Every target loads in a fresh process and computes the right thing."""
    code = ("import torch, aitune_build as a\n"
            f"for t in {list(targets)!r}:\n"
            f"    m = a.load(t, manifest={str(root / 'aitune.toml')!r}, strict=True)\n"
            "    x = torch.randn(3)\n"
            "    out = m(x, x) if t == 'adder_export' else m(torch.randn(3, 4))\n"
            "    assert (torch.equal(out, x + x) if t == 'adder_export' else out.shape == (3, 2)), t\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_disk_full_in_the_store_and_in_the_outputs(tmp_path: Path, mounts, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    root = make_project(tmp_path / "proj")
    cache = mounts(tmp_path / "cache", "4m")
    out = mounts(tmp_path / "out", "4m")
    toml = root / "aitune.toml"
    toml.write_text(toml.read_text().replace('name = "t"', f'name = "t"\ncache_dir = "{cache.path}"\nout_dir = "{out.path}/b"'))
    p = cli(root, "build", "adder_export")
    assert p.returncode == 0, p.stderr
    outs = out.path / "b"
    before = _intact(outs, "adder_export")

    # 1. the store's file system is full: the worker cannot write the artifact
    _touch_source(root)
    filler = cache.fill()
    p = cli(root, "build", "adder_export")
    no_traceback(p)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "No space left on device" in p.stdout + p.stderr or "is full" in p.stdout + p.stderr, p.stdout + p.stderr
    assert _intact(outs, "adder_export")["key"] == before["key"]  # the previous output is intact
    entries = [e for e in (cache.path / "store-v1/objects").rglob("entry.json")]
    assert len(entries) == 1  # no partial entry for the new key
    filler.unlink()

    # 2. the outputs' file system is full: materialising fails, the previous output stays
    filler = out.fill()
    p = cli(root, "build", "adder_export")
    no_traceback(p)
    assert p.returncode == 1 and ("disk full" in p.stdout or "is full" in p.stdout), p.stdout + p.stderr
    assert _intact(outs, "adder_export")["key"] == before["key"]
    assert not [f for f in (out.path / "b/adder_export").iterdir() if f.name.endswith(".tmp")]
    filler.unlink()
    p = cli(root, "build", "adder_export")
    assert p.returncode == 0 and "restored from cache" in p.stdout, p.stdout + p.stderr
    _loads(root, "adder_export")

    # 3. package onto a full disk: clear error, the archive there before is intact, no temp left
    archive = out.path / "r.tar.gz"
    assert cli(root, "package", "-o", str(archive)).returncode == 0
    first = archive.read_bytes()
    _touch_source(root)
    assert cli(root, "build", "adder_export").returncode == 0
    filler = out.fill(leave=2048)
    p = cli(root, "package", "-o", str(archive))
    no_traceback(p)
    assert p.returncode == 1 and "disk full" in p.stderr, p.stdout + p.stderr
    assert archive.read_bytes() == first and not [f for f in out.path.iterdir() if f.name.endswith(".tmp")]
    filler.unlink()


@pytest.mark.slow
def test_read_only_cache_without_the_flag_builds_into_a_private_temp(tmp_path: Path, mounts, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only mount: no PermissionError traceback; the build reads the cache and builds privately."""
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    root = make_project(tmp_path / "proj")
    cache = mounts(tmp_path / "cache", "16m")
    toml = root / "aitune.toml"
    toml.write_text(toml.read_text().replace('name = "t"', f'name = "t"\ncache_dir = "{cache.path}"'))
    assert cli(root, "build", "adder_export").returncode == 0
    assert cli(root, "clean").returncode == 0
    cache.readonly()
    p = cli(root, "build", "adder_export")  # restored from the read-only cache
    no_traceback(p)
    assert p.returncode == 0, p.stdout + p.stderr
    _touch_source(root)
    p = cli(root, "build", "adder_export")  # a miss: built in a private temp, materialised, cache untouched
    no_traceback(p)
    assert p.returncode == 0, p.stdout + p.stderr
    _intact(root / "build", "adder_export")


def _kill_points(root: Path, log: Path, *args: str) -> list[str]:
    log.unlink(missing_ok=True)
    p = cli(root, *args, env={"AITUNE_KILL_AT": "1000000", "AITUNE_KILL_LOG": str(log)})
    assert p.returncode == 0, p.stdout + p.stderr
    return log.read_text().split("\n")[:-1] if log.exists() else []


@pytest.mark.slow
def test_sigkill_at_every_checkpoint_of_build_package_and_gc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    root = make_project(tmp_path / "proj")
    log = tmp_path / "points.log"
    assert cli(root, "build", "adder_export").returncode == 0
    archive = tmp_path / "r.tar.gz"
    commands = {
        "build": ("build", "--force", "adder_export"),
        "package": ("package", "-o", str(archive)),
        "gc": ("gc", "--max-size", "0"),
    }
    killed = 0
    points: set[str] = set()
    for what, args in commands.items():
        reached = _kill_points(root, log, *args)
        assert reached, what
        if what == "gc":
            assert cli(root, "build", "adder_export").returncode == 0  # refill the cache gc just emptied
        for n in range(1, len(reached) + 1):
            if what == "gc" and not list((root / ".aitune/store-v1/objects").rglob("entry.json")):
                assert cli(root, "build", "--force", "adder_export").returncode == 0  # something for gc to remove
            if what == "package" and archive.exists():
                good = archive.read_bytes()
            else:
                good = None
            p = cli(root, *args, env={"AITUNE_KILL_AT": str(n)})
            if p.returncode == 0 and n == len(reached) and reached[-1].endswith(" atomic-write"):
                # the run's last write (the stat cache's state file) happens only when it changed: a state left by
                # an earlier kill may not need it. Every point before it was killed; nothing to recover here.
                no_traceback(p)
                continue
            assert p.returncode == -9, (what, n, p.stdout + p.stderr)
            killed += 1
            points.add(f"{what}:{reached[n - 1].split(' ', 1)[1]}")
            # the next run recovers
            if what == "package":
                assert archive.exists() is False or archive.read_bytes() == good or cli(root, "verify", str(archive)).returncode == 0
                p = cli(root, *args)
                assert p.returncode == 0, p.stdout + p.stderr
                assert cli(root, "verify", str(archive)).returncode == 0
            else:
                p = cli(root, "build", "adder_export")
                assert p.returncode == 0, (what, n, p.stdout + p.stderr)
                no_traceback(p)
                _intact(root / "build", "adder_export")
    assert killed >= 20, (killed, sorted(points))
    _loads(root, "adder_export")
    leftovers = [p for p in (root / ".aitune/store-v1/tmp").iterdir()]
    assert all(time.time() - p.stat().st_mtime < 600 for p in leftovers)  # only fresh ones; gc's grace removes the rest


@pytest.mark.slow
def test_gc_racing_a_build_removes_nothing_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    root = make_project(tmp_path / "proj")
    assert cli(root, "build", "adder_export", "mlp_eager").returncode == 0
    for _ in range(3):
        assert cli(root, "clean").returncode == 0
        full = {**os.environ, "PYTHONPATH": str(REPO)}
        build = subprocess.Popen([sys.executable, "-m", "aitune_build", "-C", str(root), "build", "-j", "2"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full)
        while build.poll() is None:
            no_traceback(cli(root, "gc", "--max-size", "0"))
        out, err = build.communicate()
        assert "Traceback" not in out + err, out + err
        assert build.returncode in (0, 1), out + err
        p = cli(root, "build")
        assert p.returncode == 0, p.stdout + p.stderr
        _intact(root / "build", "adder_export")
        _intact(root / "build", "mlp_eager")
    _loads(root, "adder_export", "mlp_eager")


@pytest.mark.slow
def test_clean_racing_a_build_fails_cleanly_or_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    root = make_project(tmp_path / "proj")
    full = {**os.environ, "PYTHONPATH": str(REPO)}
    for clean_args in (["clean"], ["clean", "--cache"]):
        build = subprocess.Popen([sys.executable, "-m", "aitune_build", "-C", str(root), "build", "--force", "adder_export", "mlp_eager"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full)
        while build.poll() is None:
            no_traceback(cli(root, *clean_args))
        out, err = build.communicate()
        assert "Traceback" not in out + err, out + err
        assert build.returncode in (0, 1), out + err
        p = cli(root, "build", "adder_export", "mlp_eager")
        assert p.returncode == 0, p.stdout + p.stderr
    _loads(root, "adder_export", "mlp_eager")
