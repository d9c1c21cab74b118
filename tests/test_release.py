"""aitune.lock, --locked, package (reproducible), verify, and loading from an archive."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from aitune_build.keys import Fingerprinter

from .conftest import make_project, run_cli, write_weights


def _build(root: Path, *args: str) -> tuple[int, str]:
    code, out, _ = run_cli(root, "build", *args)
    return code, out


@pytest.fixture
def built(built_project: Path) -> Path:
    return built_project


def test_lock_written_sorted_and_stable(built: Path) -> None:
    lock = built / "aitune.lock"
    first = lock.read_bytes()
    data = json.loads(first)
    assert data["format"] == 2 and list(data["targets"]) == ["adder_export", "mlp_eager", "mlp_export"]
    entry = data["targets"]["mlp_export"]
    art = built / "build/mlp_export/model.pt2"
    assert entry["artifact"]["sha256"] == hashlib.sha256(art.read_bytes()).hexdigest()
    assert entry["artifact"]["size"] == art.stat().st_size
    assert "models/helpers/deep.py" in entry["components"]["sources"]
    assert entry["toolchain"]["torch"].startswith("torch ")
    mtime = lock.stat().st_mtime_ns
    _build(built, "mlp_export", "adder_export")
    assert lock.read_bytes() == first and lock.stat().st_mtime_ns == mtime  # a no-op build does not rewrite it


@pytest.mark.parametrize("change", ["source", "weights", "args", "input_spec", "backend_field"])
def test_locked_fails_on_each_kind_of_change(built: Path, change: str) -> None:
    assert _build(built, "--locked", "mlp_export", "adder_export")[0] == 0
    toml = built / "aitune.toml"
    if change == "source":
        (built / "models/helpers/deep.py").write_text("import torch\n\ndef act(x):\n    return torch.sigmoid(x)\n")
        expect = "models/helpers/deep.py changed"
    elif change == "weights":
        write_weights(built, seed=3)
        expect = "weights/mlp.pt changed"
    elif change == "args":
        toml.write_text(toml.read_text().replace("hidden = 8", "hidden = 8, extra = 1"))
        expect = "module.args.extra: added (1)"
    elif change == "input_spec":
        toml.write_text(toml.read_text().replace("min = 1, opt = 4, max = 8", "min = 1, opt = 4, max = 16"))
        expect = "module.inputs[0].shape[0].max: 8 -> 16"
    else:
        toml.write_text(toml.read_text().replace('kind = "export"', 'kind = "export"\nstrict = true'))
        expect = "backend.strict: false -> true"
    lock_before = (built / "aitune.lock").read_bytes()
    code, out = _build(built, "--locked", "mlp_export")
    assert code == 1, out
    assert "mlp_export:" in out and expect in out
    assert (built / "aitune.lock").read_bytes() == lock_before
    code, out, _ = run_cli(built, "status")
    assert "[lock: differs" in out


def test_locked_fails_on_toolchain_change(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Fingerprinter.toolchain

    def faked(self: Fingerprinter, kind: str) -> dict:
        return {**real(self, kind), "torch": "torch 9.9.9"}

    monkeypatch.setattr(Fingerprinter, "toolchain", faked)
    code, out = _build(built, "--locked", "adder_export")
    assert code == 1 and "toolchain.torch:" in out and "torch 9.9.9" in out


@pytest.mark.slow
def test_export_artifact_does_not_depend_on_the_checkout_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two checkouts in different folders, each with its own cache, build the same export bytes (the lock holds)."""
    shas = []
    for name in ("a", "elsewhere/deeper/b"):
        monkeypatch.setenv("AITUNE_CACHE_DIR", str(tmp_path / f"cache-{name.replace('/', '_')}"))
        root = make_project(tmp_path / name)
        assert _build(root, "mlp_export")[0] == 0
        shas.append(json.loads((root / "aitune.lock").read_text())["targets"]["mlp_export"]["artifact"]["sha256"])
    assert shas[0] == shas[1]


@pytest.mark.slow
def test_package_twice_from_two_checkouts_is_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "shared-cache"
    monkeypatch.setenv("AITUNE_CACHE_DIR", str(cache))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    digests = []
    for name in ("checkout-a", "elsewhere/checkout-b"):
        root = make_project(tmp_path / name)
        assert _build(root, "mlp_export", "adder_export")[0] == 0
        code, out, _ = run_cli(root, "package", "-o", str(tmp_path / f"{name.replace('/', '_')}.tar.gz"))
        assert code == 0, out
        digests.append(hashlib.sha256((tmp_path / f"{name.replace('/', '_')}.tar.gz").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    with tarfile.open(tmp_path / "checkout-a.tar.gz") as tar:
        names = tar.getnames()
        assert all(m.mtime == 1700000000 and m.uid == 0 and m.gid == 0 for m in tar.getmembers())
    assert names == sorted(names)
    assert {"aitune.lock", "SHA256SUMS", "targets/mlp_export/model.pt2", "targets/mlp_export/build.json"} <= set(names)
    assert (tmp_path / "checkout-a.tar.gz").read_bytes()[4:8] == b"\0\0\0\0"  # gzip header without time


def _rewrite(src: Path, dst: Path, edit) -> None:
    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    members = edit(members)
    with tarfile.open(dst, "w:gz") as out:
        for m, data in members:
            out.addfile(m, io.BytesIO(data) if data is not None else None)


def test_verify_accepts_a_good_archive_and_rejects_tampering(built: Path, tmp_path: Path) -> None:
    good = tmp_path / "release.tar.gz"
    assert run_cli(built, "package", "-o", str(good))[0] == 0
    code, out, _ = run_cli(built, "verify", str(good))
    assert code == 0 and "OK" in out

    def flip(ms):
        out = []
        for m, d in ms:
            if m.name == "targets/mlp_export/model.pt2":
                d = bytearray(d)
                d[100] ^= 1
                d = bytes(d)
            out.append((m, d))
        return out

    def drop(ms):
        return [(m, d) for m, d in ms if m.name != "targets/adder_export/model.pt2"]

    def extra(ms):
        info = tarfile.TarInfo("targets/mlp_export/extra.bin")
        info.size = 3
        return ms + [(info, b"abc")]

    def traversal(ms):
        info = tarfile.TarInfo("../evil.txt")
        info.size = 3
        return ms + [(info, b"abc")]

    def symlink(ms):
        info = tarfile.TarInfo("targets/link")
        info.type, info.linkname = tarfile.SYMTYPE, "../../etc/passwd"
        return ms + [(info, None)]

    cases = {flip: "sha256 does not match", drop: "missing from the archive", extra: "not listed in SHA256SUMS",
             traversal: "unsafe path in archive: ../evil.txt", symlink: "link escapes the archive"}
    for edit, message in cases.items():
        bad = tmp_path / f"{edit.__name__}.tar.gz"
        _rewrite(good, bad, edit)
        code, out, _ = run_cli(built, "verify", str(bad))
        assert code == 1 and message in out, (edit.__name__, out)


def test_load_from_project_and_from_archive(built: Path, tmp_path: Path) -> None:
    import torch

    import aitune_build

    m = aitune_build.load("adder_export", manifest=str(built / "aitune.toml"))
    x, y = torch.randn(5), torch.randn(5)
    assert torch.equal(m(x, y), x + y)
    archive = tmp_path / "r.tar.gz"
    run_cli(built, "package", "adder_export", "-o", str(archive))
    shutil.rmtree(built / "build")
    m2 = aitune_build.load("adder_export", manifest=str(built / "aitune.toml"), archive=str(archive))
    assert torch.equal(m2(x, y=y), x + y)
    assert len(list((built / ".aitune/releases-v1").iterdir())) == 1


def test_load_with_build_true_builds_first(project: Path) -> None:
    import torch

    import aitune_build

    with pytest.raises(aitune_build.UserError, match="not built"):
        aitune_build.load("mlp_eager", manifest=str(project / "aitune.toml"))
    m = aitune_build.load("mlp_eager", manifest=str(project / "aitune.toml"), build=True)
    assert m(torch.randn(3, 4)).shape == (3, 2)


def test_cache_readonly_builds_without_writing_the_cache(project: Path) -> None:
    code, out, data = run_cli(project, "build", "--cache-readonly", "--json", "adder_export")
    assert code == 0 and data["targets"][0]["status"] == "built"
    assert (project / "build/adder_export/model.pt2").is_file()
    assert not (project / ".aitune/store-v1/objects").exists() or not any((project / ".aitune/store-v1/objects").rglob("entry.json"))
    assert not (project / "aitune.lock").exists()


def test_locked_build_reports_artifact_bytes_that_differ_from_the_lock(built: Path) -> None:
    """Same key, other bytes: for a deterministic backend (export) --locked fails; the lock is not rewritten."""
    lock = built / "aitune.lock"
    data = json.loads(lock.read_text())
    data["targets"]["mlp_export"]["artifact"]["sha256"] = "0" * 64  # as if the locked build had given other bytes
    lock.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    before = lock.read_bytes()
    code, out, _ = run_cli(built, "build", "--locked", "mlp_export", "adder_export")
    assert code == 1, out
    assert "mlp_export: not reproducible: built" in out and "aitune.lock pins 0000000000000000" in out
    assert "adder_export" not in out.split("in ")[-1]  # the matching target is not reported
    code, out, doc = run_cli(built, "build", "--locked", "--json", "mlp_export")
    assert code == 1 and doc["lock_artifacts"]["mlp_export"]["deterministic"] is True
    assert lock.read_bytes() == before
