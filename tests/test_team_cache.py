"""Caches a team can share: umask modes, another filesystem, read-only caches, a second user, old formats pruned."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import make_project, run_cli, statuses

PKG_PARENT = str(Path(__file__).resolve().parent.parent)
# A second user cannot run this virtualenv's interpreter when it lies under /root (0700): run both users' builds
# with the system's Python of the same minor version on this virtualenv's packages.
SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}")
NOBODY = 65534
TEAM_GID = 4242


@pytest.fixture
def mask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        for p in [folder, *folder.rglob("*")]:
            if p.name.endswith(".lock"):
                continue  # filelock's own files
            out[str(p)] = oct(stat.S_IMODE(p.lstat().st_mode))
    return out


def test_everything_written_follows_the_umask(tmp_path: Path, mask: None, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("AITUNE_CACHE_DIR", str(cache))
    root = make_project(tmp_path / "p")
    code, out, data = run_cli(root, "build", "mlp_export", "--json")
    assert code == 0 and statuses(data) == {"mlp_export": "built"}, out
    modes = _modes(cache, root / "build")
    assert (cache / "state-v2.json").is_file() and any(p.endswith("entry.json") for p in modes)
    wrong = {p: m for p, m in modes.items() if m != ("0o755" if Path(p).is_dir() else "0o644")}
    assert not wrong, wrong


def test_cache_root_carries_gitignore_and_old_formats_are_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("AITUNE_CACHE_DIR", str(cache))
    (cache / "store-v0/objects/ab/abcd").mkdir(parents=True)
    (cache / "store-v0/objects/ab/abcd/model.pt2").write_bytes(b"old")
    (cache / "state-v1.json").write_text("{}")
    (cache / "releases-v1").mkdir()  # not ours to prune
    root = make_project(tmp_path / "p")
    code, out, _ = run_cli(root, "build", "mlp_export")
    assert code == 0, out
    assert (cache / ".gitignore").read_text() == "*\n" and (cache / "CACHEDIR.TAG").is_file()
    assert not (cache / "store-v0").exists() and not (cache / "state-v1.json").exists()
    assert (cache / "store-v1").is_dir() and (cache / "state-v2.json").is_file() and (cache / "releases-v1").is_dir()
    assert not list((cache / "store-v1/tmp").iterdir())


def test_cache_on_another_filesystem_than_the_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temp folder")
    cache = Path(tempfile.mkdtemp(prefix="aitune-keys-", dir=shm))
    try:
        monkeypatch.setenv("AITUNE_CACHE_DIR", str(cache))
        root = make_project(tmp_path / "p")
        code, out, data = run_cli(root, "build", "mlp_export", "--json")
        assert code == 0 and statuses(data) == {"mlp_export": "built"}, out
        shutil.rmtree(root / "build")
        code, out, data = run_cli(root, "build", "mlp_export", "--json")
        assert code == 0 and statuses(data) == {"mlp_export": "cached"}, out
        assert data["targets"][0]["reason"] == "restored from cache"
        assert (root / "build/mlp_export/model.pt2").stat().st_dev != cache.stat().st_dev
        # --cache-readonly builds into a private temp folder (the system's, on yet another device than /dev/shm)
        code, out, data = run_cli(root, "build", "adder_export", "--cache-readonly", "--json")
        assert code == 0 and statuses(data) == {"adder_export": "built"}, out
        assert (root / "build/adder_export/model.pt2").is_file()
        assert len(list((cache / "store-v1/objects").rglob("entry.json"))) == 1  # nothing was added
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _as_user(uid: int, gid: int, umask: int):
    def become() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        os.umask(umask)
    return become


def _cli_as(uid: int, gid: int, root: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    import sysconfig

    env = {"PYTHONPATH": f"{PKG_PARENT}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin", "HOME": str(root),
           "AITUNE_CACHE_DIR": str(cache)}
    return subprocess.run([str(SYSTEM_PYTHON), "-m", "aitune_build", "-C", str(root), *args], capture_output=True,
                          text=True, env=env, preexec_fn=_as_user(uid, gid, 0o002))


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder others can reach (pytest's tmp_path is private to root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a build as a second user")
    if not SYSTEM_PYTHON.is_file():
        pytest.skip(f"needs {SYSTEM_PYTHON}, which a second user can run")
    base = Path(tempfile.mkdtemp(prefix="aitune-keys-team-"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _project_for(base: Path, name: str, uid: int) -> Path:
    root = make_project(base / name)
    for p in [root, *root.rglob("*")]:
        os.chown(p, uid, -1)
    return root


@pytest.mark.slow
def test_second_user_with_group_writable_shared_cache_gets_cached(shared: Path) -> None:
    cache = shared / "team-cache"
    cache.mkdir()
    os.chown(cache, 0, TEAM_GID)
    os.chmod(cache, 0o2775)  # setgid: everything below belongs to the team's group
    first = _project_for(shared, "alice", 0)
    proc = _cli_as(0, TEAM_GID, first, cache, "build", "mlp_export", "--json")
    assert proc.returncode == 0 and '"status": "built"' in proc.stdout, proc.stdout + proc.stderr
    entry = next((cache / "store-v1/objects").rglob("entry.json"))
    assert stat.S_IMODE(entry.stat().st_mode) == 0o664 and entry.stat().st_gid == TEAM_GID

    second = _project_for(shared, "bob", NOBODY)
    proc = _cli_as(NOBODY, TEAM_GID, second, cache, "build", "mlp_export", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"status": "cached"' in proc.stdout and "restored from cache" in proc.stdout, proc.stdout
    assert (second / "build/mlp_export/model.pt2").stat().st_uid == NOBODY
    # and bob builds what alice had not: into the shared cache, readable by the team
    proc = _cli_as(NOBODY, TEAM_GID, second, cache, "build", "adder_export", "--json")
    assert proc.returncode == 0 and '"status": "built"' in proc.stdout, proc.stdout + proc.stderr
    assert len(list((cache / "store-v1/objects").rglob("entry.json"))) == 2


@pytest.mark.slow
def test_cache_the_user_cannot_write_builds_into_a_private_temp(shared: Path) -> None:
    cache = shared / "readonly-cache"
    cache.mkdir()
    (cache / "store-v1").mkdir()
    os.chmod(cache, 0o755)  # root's: others may read it only
    second = _project_for(shared, "bob", NOBODY)
    proc = _cli_as(NOBODY, NOBODY, second, cache, "build", "mlp_export", "--json")
    assert proc.returncode == 0 and '"status": "built"' in proc.stdout, proc.stdout + proc.stderr
    assert (second / "build/mlp_export/model.pt2").is_file() and (second / "build/mlp_export/build.json").is_file()
    assert sorted(p.name for p in cache.rglob("*")) == ["store-v1"]
