"""Third-party code in the key: the distributions a target's sources import, by version, read without importing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aitune_build.hashing import StateCache
from aitune_build.keys import Fingerprinter, diff_components, key_of
from aitune_build.manifest import load_manifest
from aitune_build.packages import distributions, provider
from aitune_build.toolchain import _installed, dist_version

from .conftest import make_project, run_cli

FAKE_TOOLCHAIN = {"python": "CPython 3.11.7", "torch": "torch 2.13.0+cpu"}

MANIFEST = """
[project]
name = "t"

[modules.scaled]
factory = "models.scaled:build"
inputs = [{ name = "x", shape = [2, 4] }]

[backends.ref]
kind = "eager"

[targets.scaled_eager]
module = "scaled"
backend = "ref"
"""

SCALED = """
import os
import json
import torch
import fakepkg.sub
from models import helpers


class Scaled(torch.nn.Module):
    def forward(self, x):
        return x * fakepkg.sub.FACTOR


def build():
    return Scaled()
"""


def install_fake(site: Path, version: str, import_name: str = "fakepkg", dist: str = "fakepkg",
                 top_level: bool = True) -> None:
    """A distribution as a wheel install leaves it: the package and <dist>-<version>.dist-info with METADATA/RECORD."""
    for old in site.glob(f"{dist}-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    pkg = site / import_name
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub.py").write_text("FACTOR = 3.0\n")
    info = site / f"{dist}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"{import_name}/__init__.py,,\n{import_name}/sub.py,,\n{info.name}/METADATA,,\n")
    if top_level:
        (info / "top_level.txt").write_text(f"{import_name}\n")
    _installed.cache_clear()
    dist_version.cache_clear()


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))  # the worker process imports fakepkg too
    yield site
    _installed.cache_clear()
    dist_version.cache_clear()


def _project(tmp_path: Path) -> Path:
    root = make_project(tmp_path / "p", MANIFEST)
    (root / "models/scaled.py").write_text(SCALED)
    return root


def test_provider_found_from_top_level_or_record_without_importing(site: Path) -> None:
    install_fake(site, "1.0")
    install_fake(site, "2.0", import_name="otherimport", dist="other_dist", top_level=False)  # named unlike its module
    assert provider("fakepkg") == "fakepkg"
    assert provider("otherimport") == "other_dist"  # from RECORD: no top_level.txt
    assert provider("no_such_module_anywhere") is None
    assert "fakepkg" not in sys.modules and "otherimport" not in sys.modules
    assert distributions(["fakepkg", "otherimport", "torch"], StateCache(None)) == {"fakepkg": "1.0", "other_dist": "2.0"}


def test_version_change_changes_key_and_diff_names_it(tmp_path: Path, site: Path) -> None:
    install_fake(site, "1.0")
    root = _project(tmp_path)
    state = StateCache(None)
    fp = Fingerprinter(load_manifest(root / "aitune.toml"), state, toolchain_override=FAKE_TOOLCHAIN)
    before = fp.components("scaled_eager")
    assert before["packages"] == {"fakepkg": "1.0"}  # torch is in the toolchain; os/json are standard library
    assert fp.third_party_imports("scaled") == ["fakepkg", "torch"]
    install_fake(site, "1.1")
    after = Fingerprinter(load_manifest(root / "aitune.toml"), state, toolchain_override=FAKE_TOOLCHAIN).components("scaled_eager")
    assert key_of(before) != key_of(after)
    assert diff_components(before, after) == ["fakepkg 1.0 -> 1.1"]


def test_which_distribution_is_remembered_so_an_unchanged_project_reads_no_dist_info(tmp_path: Path, site: Path) -> None:
    install_fake(site, "1.0")
    state = StateCache(tmp_path / "state.json")
    assert distributions(["fakepkg"], state) == {"fakepkg": "1.0"}
    state.save()
    (site / "fakepkg-1.0.dist-info" / "top_level.txt").write_text("something_else\n")  # would now not match
    (site / "fakepkg-1.0.dist-info" / "RECORD").write_text("")
    assert distributions(["fakepkg"], StateCache(tmp_path / "state.json")) == {"fakepkg": "1.0"}  # not read again
    install_fake(site, "1.1")  # a version change keeps the same distributions installed: still no read, new version
    assert distributions(["fakepkg"], StateCache(tmp_path / "state.json")) == {"fakepkg": "1.1"}
    import shutil

    shutil.rmtree(site / "fakepkg-1.1.dist-info")
    install_fake(site, "1.0", dist="renamed_dist")  # another set of distributions: found afresh
    assert distributions(["fakepkg"], StateCache(tmp_path / "state.json")) == {"renamed_dist": "1.0"}


def test_upgrade_makes_target_stale_and_explain_names_both_versions(tmp_path: Path, site: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    install_fake(site, "1.0")
    root = _project(tmp_path)
    code, out, data = run_cli(root, "build", "--json")
    assert code == 0, out
    assert data["targets"][0]["status"] == "built"
    code, out, _ = run_cli(root, "status")
    assert "up-to-date" in out and "stale" not in out, out
    install_fake(site, "1.1")
    code, out, _ = run_cli(root, "explain", "scaled_eager")
    assert "scaled_eager: stale" in out and "fakepkg 1.0 -> 1.1" in out, out
    code, out, _ = run_cli(root, "status")
    assert "stale" in out and "fakepkg 1.0 -> 1.1" in out, out
    code, out, data = run_cli(root, "status", "--json")  # structured in JSON, text only where the CLI prints it
    assert data["targets"][0]["changes"] == [
        {"component": "packages", "path": "fakepkg", "change": "changed", "old": "1.0", "new": "1.1"}]
    assert data["targets"][0]["reasons"] == ["fakepkg 1.0 -> 1.1"]
    code, out, data = run_cli(root, "build", "--json")
    assert data["targets"][0]["status"] == "built", out


def test_no_op_status_reads_packages_without_importing_them_or_importlib_metadata(tmp_path: Path, site: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    install_fake(site, "1.0")
    root = _project(tmp_path)
    run_cli(root, "status")  # validates the manifest once and remembers it
    probe = (
        "import sys\nfrom aitune_build.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "bad = [m for m in ('importlib.metadata', 'torch', 'fakepkg') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {"PYTHONPATH": f"{Path(__file__).resolve().parent.parent}:{site}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", probe, "-C", str(root), "explain", "--json", "scaled_eager"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    install_fake(site, "1.2")
    proc = subprocess.run([sys.executable, "-c", probe, "-C", str(root), "explain", "--json", "scaled_eager"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
