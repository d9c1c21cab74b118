"""Safety (issue 8): the tool deletes only what it created, an archive never runs code, no input gives a traceback."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
import socket
import tarfile
import time
import warnings
from pathlib import Path

import pytest

from .conftest import MANIFEST, age, make_project, run_cli

BASE = MANIFEST.split("[targets.mlp_export]")[0]


@pytest.fixture(scope="module")
def built_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with mlp_eager and adder_export built (cache inside it); tests take copies."""
    os.environ.pop("AITUNE_CACHE_DIR", None)
    root = make_project(tmp_path_factory.mktemp("built") / "proj")
    code, out, _ = run_cli(root, "build", "mlp_eager", "adder_export")
    assert code == 0, out
    return root


@pytest.fixture
def built(built_once: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    dst = tmp_path / "proj"
    shutil.copytree(built_once, dst, symlinks=True)
    return dst


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".aitune" not in p.parts and "build" not in p.parts}


def one_line_error(out: str, *expected: str) -> None:
    assert "Traceback" not in out, out
    assert out.count("\n") == 1, out
    for e in expected:
        assert e in out, out


# --- 1. own only what you created -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    (".", "names may not start with '.'"),
    ("..", "names may not start with '.'"),
    (".hidden", "names may not start with '.'"),
    ("t\n", "names may use letters"),
    ("a" * 300, "at most 100 characters"),
])
def test_hostile_target_names_are_manifest_errors(project: Path, name: str, expected: str) -> None:
    before = snapshot(project)
    text = BASE + f'[targets.{json.dumps(name)}]\nmodule = "mlp"\nbackend = "ref"\n'
    (project / "aitune.toml").write_text(text)
    before["aitune.toml"] = hashlib.sha256(text.encode()).hexdigest()
    for cmd in (["build"], ["clean"], ["status"]):
        code, out, _ = run_cli(project, *cmd)
        assert code == 2, out
        one_line_error(out, "aitune.toml: targets.", expected)
    assert snapshot(project) == before


@pytest.mark.parametrize("project_table, key, expected", [
    ('out_dir = "/"', "project.out_dir", "filesystem root"),
    ('out_dir = ""', "project.out_dir", "must not be empty"),
    ('out_dir = "."', "project.out_dir", "is the project folder"),
    ('out_dir = ".."', "project.out_dir", "holds the project"),
    ('out_dir = "models"', "project.out_dir", "overlaps the project's sources (models)"),
    ('out_dir = "models/out"', "project.out_dir", "overlaps the project's sources"),
    ('out_dir = "weights"', "project.out_dir", "overlaps the project's sources (weights/mlp.pt)"),
    ('out_dir = "aitune.toml"', "project.out_dir", "overlaps the project's sources (aitune.toml)"),
    ('out_dir = "afile"', "project.out_dir", "is a file"),
    ('cache_dir = "."', "project.cache_dir", "is the project folder"),
    ('cache_dir = "/"', "project.cache_dir", "filesystem root"),
    ('cache_dir = "models"', "project.cache_dir", "overlaps the project's sources"),
    ('cache_dir = "build"', "project.out_dir and project.cache_dir", "overlap"),
    ('cache_dir = "build/cache"', "project.out_dir and project.cache_dir", "overlap"),
    ('out_dir = "c/out"\ncache_dir = "c"', "project.out_dir and project.cache_dir", "overlap"),
])
def test_unsafe_out_dir_and_cache_dir_are_refused(project: Path, project_table: str, key: str, expected: str) -> None:
    (project / "afile").write_text("mine\n")
    (project / "aitune.toml").write_text(MANIFEST.replace('name = "t"', 'name = "t"\n' + project_table))
    before = snapshot(project)
    for cmd in (["build", "mlp_eager"], ["clean", "--cache"], ["status"]):
        code, out, _ = run_cli(project, *cmd)
        assert code == 2, out
        one_line_error(out, "aitune.toml: " + key, expected)
    assert snapshot(project) == before


def test_aitune_cache_dir_env_is_checked_too(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AITUNE_CACHE_DIR", str(project))
    code, out, _ = run_cli(project, "clean", "--cache")
    assert code == 2
    one_line_error(out, "AITUNE_CACHE_DIR", "is the project folder")
    assert (project / "aitune.toml").is_file() and (project / "models/mlp.py").is_file()


def test_clean_cache_removes_only_what_the_store_wrote(built: Path) -> None:
    shared = built.parent / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("the user's own file\n")
    (shared / "sub").mkdir()
    (shared / "sub/keep.bin").write_bytes(b"x")
    toml = built / "aitune.toml"
    toml.write_text(toml.read_text().replace('name = "t"', 'name = "t"\ncache_dir = "../shared"'))
    code, out, _ = run_cli(built, "build", "--force", "mlp_eager")
    assert code == 0, out
    assert (shared / "CACHEDIR.TAG").is_file() and (shared / "store-v1").is_dir()
    code, out, _ = run_cli(built, "clean", "--cache")
    assert code == 0, out
    assert sorted(p.relative_to(shared).as_posix() for p in shared.rglob("*")) == [".gitignore", "CACHEDIR.TAG", "notes.txt", "sub", "sub/keep.bin"]
    assert "notes.txt" not in out


def test_clean_cache_refuses_a_folder_without_cachedir_tag(project: Path) -> None:
    mine = project.parent / "mine"
    mine.mkdir()
    (mine / "store-v1").mkdir()
    (mine / "store-v1/data.txt").write_text("not the tool's\n")
    toml = project / "aitune.toml"
    toml.write_text(toml.read_text().replace('name = "t"', 'name = "t"\ncache_dir = "../mine"'))
    code, out, _ = run_cli(project, "clean", "--cache")
    assert code == 2
    one_line_error(out, "aitune.toml: project.cache_dir", "not an aitune-build cache")
    assert (mine / "store-v1/data.txt").is_file()


def test_clean_says_removed_only_for_what_existed_and_refuses_dotdot(built: Path) -> None:
    code, out, _ = run_cli(built, "clean", "adder_export")
    assert code == 0 and out.splitlines() == [f"removed {built / 'build/adder_export'}"], out
    code, out, _ = run_cli(built, "clean", "adder_export")
    assert code == 0 and out == "", out
    before = snapshot(built)
    code, out, _ = run_cli(built, "clean", "..")
    assert code == 2
    one_line_error(out, "unknown target '..'")
    assert snapshot(built) == before and (built / "build/mlp_eager/build.json").is_file()


def test_out_dir_with_foreign_files_is_not_adopted_or_cleaned(project: Path) -> None:
    toml = project / "aitune.toml"
    toml.write_text(toml.read_text().replace('name = "t"', 'name = "t"\nout_dir = "mine"'))
    (project / "mine").mkdir()
    (project / "mine/thesis.tex").write_text("years of work\n")
    (project / "mine/mlp_eager").mkdir()
    (project / "mine/mlp_eager/notes.txt").write_text("mine too\n")
    code, out, _ = run_cli(project, "build", "mlp_eager")
    assert code == 2 and "did not write (" in out, out
    code, out, _ = run_cli(project, "clean")
    assert code == 2 and "aitune.toml: project.out_dir" in out and "no .aitune-out marker" in out, out
    assert (project / "mine/thesis.tex").is_file() and (project / "mine/mlp_eager/notes.txt").is_file()


def test_out_dir_is_marked_when_created(built: Path) -> None:
    assert (built / "build/.aitune-out").is_file()
    assert (built / ".aitune/CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")


def test_package_refuses_to_overwrite_what_it_did_not_write(built: Path, tmp_path: Path) -> None:
    for victim in ("aitune.toml", "models/mlp.py", "weights/mlp.pt"):
        before = (built / victim).read_bytes()
        code, out, _ = run_cli(built, "package", "-o", victim)
        assert code == 2, out
        one_line_error(out, "refusing to overwrite")
        assert (built / victim).read_bytes() == before
    archive = tmp_path / "r.tar.gz"
    assert run_cli(built, "package", "-o", str(archive))[0] == 0
    first = archive.read_bytes()
    code, out, _ = run_cli(built, "package", "-o", str(archive))  # its own archive: overwritten (same bytes)
    assert code == 0 and archive.read_bytes() == first


def test_package_refuses_a_tampered_output_and_honours_the_umask(built: Path, tmp_path: Path) -> None:
    archive = tmp_path / "ok.tar.gz"
    old = os.umask(0o022)
    try:
        assert run_cli(built, "package", "-o", str(archive))[0] == 0
    finally:
        os.umask(old)
    assert archive.stat().st_mode & 0o777 == 0o644
    art = built / "build/adder_export/model.pt2"
    age(art)
    assert run_cli(built, "status")[0] == 0  # the stat cache now holds the artifact's digest
    st = art.stat()
    data = bytearray(art.read_bytes())
    data[200] ^= 1
    art.write_bytes(bytes(data))
    os.utime(art, ns=(st.st_atime_ns, st.st_mtime_ns))  # the stat cache cannot see it; the bytes can
    bad = tmp_path / "bad.tar.gz"
    code, out, _ = run_cli(built, "package", "adder_export", "-o", str(bad))
    assert code == 2, out
    one_line_error(out, "its bytes differ from its build.json")
    assert not bad.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --- 2. archives are data -------------------------------------------------------------------------------------------


def _edit_archive(src: Path, dst: Path, edit_build_json) -> None:
    """Rewrite an archive with an edited build.json and self-consistent SHA256SUMS (what an attacker would do)."""
    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    files = {m.name: d for m, d in members if d is not None}
    for name in list(files):
        if name.endswith("/build.json"):
            rec = json.loads(files[name])
            edit_build_json(rec)
            files[name] = json.dumps(rec).encode()
    files["SHA256SUMS"] = "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in sorted(files.items()) if n != "SHA256SUMS").encode()
    with tarfile.open(dst, "w:gz") as out:
        for m, d in members:
            if d is not None:
                d = files[m.name]
                m.size = len(d)
            out.addfile(m, io.BytesIO(d) if d is not None else None)


def test_archive_cannot_name_the_code_load_runs(built: Path, tmp_path: Path) -> None:
    import aitune_build

    good = tmp_path / "r.tar.gz"
    assert run_cli(built, "package", "mlp_eager", "-o", str(good))[0] == 0
    sentinel = tmp_path / "PWNED"
    evil = tmp_path / "evil.tar.gz"

    def hostile(rec: dict) -> None:
        rec["components"]["module"]["factory"] = "subprocess:getoutput"
        rec["components"]["module"]["args"] = {"cmd": f"touch {sentinel}"}

    _edit_archive(good, evil, hostile)
    assert run_cli(built, "verify", str(evil))[0] == 0  # self-consistent: verify cannot tell
    with pytest.raises(aitune_build.UserError, match="built from another module than modules.mlp"):
        aitune_build.load("mlp_eager", manifest=str(built / "aitune.toml"), archive=str(evil))
    with pytest.raises(aitune_build.UserError, match="pass manifest= of its project"):
        aitune_build.load("mlp_eager", manifest=str(tmp_path / "none.toml"), archive=str(evil))
    assert not sentinel.exists()
    m = aitune_build.load("mlp_eager", manifest=str(built / "aitune.toml"), archive=str(good))
    assert m(__import__("torch").randn(2, 4)).shape == (2, 2)


def test_unpacked_archive_is_verified_on_every_load(built: Path, tmp_path: Path) -> None:
    import torch

    import aitune_build

    archive = tmp_path / "r.tar.gz"
    assert run_cli(built, "package", "adder_export", "-o", str(archive))[0] == 0
    manifest = str(built / "aitune.toml")
    aitune_build.load("adder_export", manifest=manifest, archive=str(archive))
    (folder,) = (built / ".aitune/releases-v1").iterdir()
    art = folder / "targets/adder_export/model.pt2"
    data = bytearray(art.read_bytes())
    data[300] ^= 0xFF
    art.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="was modified .*model.pt2 does not match"):
        m = aitune_build.load("adder_export", manifest=manifest, archive=str(archive))
    x = torch.randn(4)
    assert torch.equal(m(x, x), x + x)
    (folder.parent / folder.name / "targets/adder_export/planted.so").write_bytes(b"\x7fELF")
    with pytest.warns(UserWarning, match="planted.so is not part of the archive"):
        aitune_build.load("adder_export", manifest=manifest, archive=str(archive))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aitune_build.load("adder_export", manifest=manifest, archive=str(archive))  # intact now: no warning


# --- 4. no traceback for any input ------------------------------------------------------------------------------


@pytest.mark.parametrize("edit, key, expected", [
    (lambda t: t.replace('factory = "models.mlp:build"', 'factory = "models.mlp:build"\nsources = ["/**"]'),
     "modules.mlp.sources[0]", "reaches outside the project"),
    (lambda t: t.replace('factory = "models.mlp:build"', 'factory = "models.mlp:build"\nsources = ["../**/*.py"]'),
     "modules.mlp.sources[0]", "reaches outside the project"),
    (lambda t: t.replace("args = { hidden = 8 }", "args = { hidden = 8, deep = " + "[" * 3000 + "]" * 3000 + " }"),
     "", "nested more than 64 levels deep"),
    (lambda t: t.replace("args = { hidden = 8 }", "args = { hidden = 8, deep = " + "{ a = " * 100 + "1" + " }" * 100 + " }"),
     "", "nested more than 64 levels deep"),
])
def test_hostile_manifest_values_are_one_line_errors(project: Path, edit, key: str, expected: str) -> None:
    toml = project / "aitune.toml"
    toml.write_text(edit(toml.read_text()))
    for cmd in (["build", "mlp_eager"], ["status"]):
        code, out, _ = run_cli(project, *cmd)
        assert code == 2, out
        one_line_error(out, "aitune.toml: " + key, expected)


def test_project_json_py_does_not_shadow_the_stdlib(project: Path) -> None:
    (project / "json.py").write_text("raise ImportError('the project json.py was imported')\n")
    (project / "random.py").write_text("raise ImportError('the project random.py was imported')\n")
    code, out, data = run_cli(project, "build", "--json", "mlp_eager")
    assert code == 0, out
    assert data["targets"][0]["status"] == "built"


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_orphan_tmp_folders_of_killed_builds_are_removed(built: Path) -> None:
    import re

    tmp = built / ".aitune/store-v1/tmp"
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32]
    old = time.time() - 3600
    orphan = tmp / f"build-{host}-{_dead_pid()}-abc"
    (orphan / "sub").mkdir(parents=True)
    (orphan / "sub/model.pt2").write_bytes(b"half")
    job = tmp / f"build-{host}-{_dead_pid()}-def.job.json"
    job.write_text("{}")
    live = tmp / f"build-{host}-{os.getpid()}-ghi"  # its owner (this process) is alive
    live.mkdir()
    young = tmp / f"build-{host}-{_dead_pid()}-jkl"  # owner gone but within the grace period
    young.mkdir()
    for p in (orphan, job, live):
        os.utime(p, (old, old))
    code, out, _ = run_cli(built, "gc", "--max-size", "10G")
    assert code == 0, out
    assert not orphan.exists() and not job.exists()
    assert live.exists() and young.exists()


# --- 5. load() ----------------------------------------------------------------------------------------------------


def test_load_warns_once_when_stale_and_raises_with_strict(built: Path) -> None:
    import aitune_build
    from aitune_build.runtime import StaleArtifact

    manifest = str(built / "aitune.toml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aitune_build.load("mlp_eager", manifest=manifest, strict=True)  # fresh: neither warns nor raises
    deep = built / "models/helpers/deep.py"
    deep.write_text(deep.read_text().replace("relu", "tanh"))
    age(deep)
    with pytest.warns(StaleArtifact, match="mlp_eager: the materialised artifact is stale .*models/helpers/deep.py changed"):
        aitune_build.load("mlp_eager", manifest=manifest)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aitune_build.load("mlp_eager", manifest=manifest)  # once
    with pytest.raises(aitune_build.UserError, match="stale"):
        aitune_build.load("mlp_eager", manifest=manifest, strict=True)


@pytest.mark.parametrize("target", ["mlp_eager", "adder_export"])
def test_load_checks_inputs_and_outputs_never_require_grad(built: Path, target: str) -> None:
    import torch

    import aitune_build

    m = aitune_build.load(target, manifest=str(built / "aitune.toml"))
    if target == "mlp_eager":
        good = {"x": torch.randn(3, 4)}
        wrong_dtype = {"x": torch.randn(3, 4, dtype=torch.float64)}
        wrong_shape = {"x": torch.randn(3, 5)}
        too_big = {"x": torch.randn(9, 4)}
    else:
        good = {"x": torch.randn(3), "y": torch.randn(3)}
        wrong_dtype = {"x": torch.randn(3, dtype=torch.float64), "y": torch.randn(3)}
        wrong_shape = {"x": torch.randn(3, 1), "y": torch.randn(3)}
        too_big = {"x": torch.randn(7), "y": torch.randn(7)}
    out = m(**good)
    assert out.requires_grad is False
    with pytest.raises(ValueError, match="input 'x' has dtype float64; the artifact takes float32"):
        m(**wrong_dtype)
    with pytest.raises(ValueError, match="input 'x' has shape"):
        m(**wrong_shape)
    with pytest.raises(ValueError, match="input 'x' has shape"):
        m(**too_big)


# --- 3. streaming archives: verify rejects what it must, in bounded memory ------------------------------------------


def _members(path: Path) -> list:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]


def _pack(members: list, path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m, d in members:
            tar.addfile(m, io.BytesIO(d) if d is not None else None)
    path.write_bytes(__import__("gzip").compress(raw.getvalue(), mtime=0))


def _file(name: str, data: bytes = b"abc", kind: bytes = tarfile.REGTYPE) -> tuple:
    i = tarfile.TarInfo(name)
    i.type, i.size = kind, len(data) if kind == tarfile.REGTYPE else 0
    return i, data if kind == tarfile.REGTYPE else None


def test_verify_rejects_broken_gzip_and_hostile_layouts_and_load_leaves_no_temp(built: Path, tmp_path: Path) -> None:
    import aitune_build

    good = tmp_path / "good.tar.gz"
    assert run_cli(built, "package", "adder_export", "-o", str(good))[0] == 0
    data = good.read_bytes()
    ms = _members(good)
    cases: dict[str, tuple[object, str]] = {
        "no_trailer": (data[:-8], "truncated"),
        "bad_crc": (data[:-8] + bytes(8), "corrupt gzip data"),
        "member_dot": ([*ms, _file(".", kind=tarfile.DIRTYPE)], "unsafe path in archive"),
        "file_for_folder": ([*ms, _file("targets/adder_export/model.pt2/x")], "inside targets/adder_export/model.pt2, which is a file"),
        "long_name": ([*ms, _file("targets/adder_export/" + "n" * 300)], "name too long"),
        "hardlink": ([*ms, (tarfile.TarInfo("targets/adder_export/h"), None)], "links are not allowed"),
        "device": ([*ms, _file("targets/adder_export/d", kind=tarfile.CHRTYPE)], "not a regular file or folder"),
        "duplicate": ([*ms, _file("targets/adder_export/model.pt2")], "duplicate member"),
        "absolute": ([*ms, _file("/abs")], "unsafe path"),
    }
    # a target absent from the archive's lock: its files are listed in SHA256SUMS (self-consistent) but not locked
    extra = {m.name: d for m, d in ms if d is not None}
    extra["targets/ghost/model.pt2"] = b"ghost"
    sums = "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in sorted(extra.items()) if n != "SHA256SUMS").encode()
    ghost = [(copy.copy(m), sums if m.name == "SHA256SUMS" else d) for m, d in ms]
    ghost[0][0].size = len(sums)
    cases["unlocked_target"] = ([*ghost, _file("targets/ghost/model.pt2", b"ghost")], "targets/ghost: a target absent from the archive's aitune.lock")
    hl = cases["hardlink"][0][-1][0]
    hl.type, hl.linkname = tarfile.LNKTYPE, "targets/adder_export/model.pt2"
    releases = built / ".aitune/releases-v1"
    for name, (content, message) in cases.items():
        bad = tmp_path / f"{name}.tar.gz"
        if isinstance(content, bytes):
            bad.write_bytes(content)
        else:
            _pack(content, bad)  # type: ignore[arg-type]
        code, out, _ = run_cli(built, "verify", str(bad))
        assert code == 1 and message in out, (name, out)
        with pytest.raises(aitune_build.UserError, match="not a valid release archive"):
            aitune_build.load("adder_export", manifest=str(built / "aitune.toml"), archive=str(bad))
        assert not releases.exists() or [p.name for p in releases.iterdir()] == [], name
    assert not Path("/abs").exists()


def test_verify_of_a_gzip_bomb_holds_it_in_bounded_memory(tmp_path: Path) -> None:
    """A 400 MiB member compressed to ~400 KB: verify streams it (peak RSS of the process stays far below its size)."""
    import gzip
    import subprocess
    import sys

    size = 400 << 20
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        sums = f"{'0' * 64}  targets/t/model.pt2\n".encode()
        tar.addfile(_file("SHA256SUMS", sums)[0], io.BytesIO(sums))
        info = tarfile.TarInfo("targets/t/model.pt2")
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(size)))
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(gzip.compress(raw.getvalue(), compresslevel=9, mtime=0))
    del raw
    assert bomb.stat().st_size < 1 << 20
    # VmHWM: this process's own high-water mark (ru_maxrss would count the parent's memory at the fork too)
    code = ("import sys\nfrom pathlib import Path\nfrom aitune_build.release import verify_archive\n"
            f"p = verify_archive(Path({str(bomb)!r}))\n"
            "print(p)\nprint(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) // 1024)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    problem, peak_mib = r.stdout.splitlines()
    assert "sha256 does not match" in problem or "missing" in problem, problem
    assert int(peak_mib) < 150, peak_mib


def test_out_dir_is_adopted_once_when_many_targets_materialise_at_once(tmp_path: Path) -> None:
    """Seen on a 2-GPU build: one target's thread created the marker while another listed the folder and took the
    marker for a foreign file. Every thread (and a second process) must see a folder of ours."""
    import subprocess
    import sys
    import threading

    from aitune_build.paths import OUT_MARKER, ensure_out_dir

    for round_ in range(20):
        out = tmp_path / f"build{round_}"
        (out / "t0").mkdir(parents=True)  # a target folder already there (a build.log being written)
        (out / "t0" / "build.log").write_text("")
        barrier, errors = threading.Barrier(8), []

        def go() -> None:
            barrier.wait()
            try:
                ensure_out_dir(out)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        other = subprocess.Popen([sys.executable, "-c", f"from aitune_build.paths import ensure_out_dir; from pathlib import Path; ensure_out_dir(Path({str(out)!r}))"])
        threads = [threading.Thread(target=go) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert other.wait() == 0
        assert not errors, errors
        assert (out / OUT_MARKER).is_file()
