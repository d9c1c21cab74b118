"""The lock: malformed files are clear errors, concurrent builds merge, one lock per manifest, a clean clone stays
clean, and --locked/status name the changed fields."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import MANIFEST, make_project, run_cli


def _built(project: Path, *targets: str) -> Path:
    code, out, _ = run_cli(project, "build", *targets)
    assert code == 0, out
    return project


MALFORMED = {
    "not_json": ('{"format": 2, "targets": {<<<<<<< HEAD', "aitune.lock: not valid JSON"),
    "a_list": ("[]", "aitune.lock: expected a JSON object"),
    "no_targets": ('{"format": 2}', "aitune.lock: targets: missing"),
    "unknown_format": ('{"format": 99, "targets": {}}', "aitune.lock: format: unknown lock format 99"),
    "entry_without_key": ('{"format": 2, "targets": {"adder_export": {"artifact": {}, "components": {}}}}',
                          "aitune.lock: targets.adder_export.key: missing"),
    "entry_without_artifact": ('{"format": 2, "targets": {"adder_export": {"key": "k", "components": {}}}}',
                               "aitune.lock: targets.adder_export.artifact: missing"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_lock_is_a_clear_error(project: Path, case: str) -> None:
    text, expected = MALFORMED[case]
    (project / "aitune.lock").write_text(text)
    for args in (["build", "--locked", "adder_export"], ["status"], ["build", "adder_export"]):
        code, out, _ = run_cli(project, *args)
        assert code == 2, (args, out)
        assert expected in out and "delete it" in out, (args, out)
        assert "Traceback" not in out and out.count("\n") == 1, (args, out)
    assert (project / "aitune.lock").read_text() == text  # left for the user to fix
    assert not (project / "build").exists()  # stopped before building anything


def _update_one(root: str, name: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    from aitune_build import lockfile
    from aitune_build.executor import TargetResult
    from aitune_build.project import Project

    project = Project.open(Path(root) / "aitune.toml")
    record = {"key": f"key-{name}", "backend": "eager", "artifact": "record.json", "toolchain": {},
              "components": {"module": {"n": name}}, "files": {"record.json": {"sha256": "s" * 64, "xxh3": "x", "size": 1}}}
    barrier.wait()
    lockfile.update(project, [TargetResult(name, "built", f"key-{name}", record=record)])


def test_concurrent_lock_updates_of_disjoint_targets_all_land(tmp_path: Path) -> None:
    names = [f"t{i}" for i in range(6)]
    manifest = MANIFEST + "".join(f'\n[targets.{n}]\nmodule = "adder"\nbackend = "ref"\n' for n in names)
    root = make_project(tmp_path / "p", manifest)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(names))
    procs = [ctx.Process(target=_update_one, args=(str(root), n, barrier)) for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    lock = json.loads((root / "aitune.lock").read_text())
    assert sorted(lock["targets"]) == names  # none lost
    assert not [p for p in root.iterdir() if "lock" in p.name and p.name != "aitune.lock"]  # no lock file left beside


@pytest.mark.slow
def test_two_build_processes_on_disjoint_targets_keep_both_entries(project: Path) -> None:
    cmds = [[sys.executable, "-m", "aitune_build", "-C", str(project), "build", t] for t in ("mlp_eager", "adder_export")]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    for p in procs:
        assert p.wait(300) == 0, p.stdout.read()
    assert sorted(json.loads((project / "aitune.lock").read_text())["targets"]) == ["adder_export", "mlp_eager"]


def test_each_manifest_has_its_own_lock(built_project: Path) -> None:
    project = built_project
    other = MANIFEST.split("[targets.mlp_export]")[0] + '[targets.only_other]\nmodule = "adder"\nbackend = "ref"\n'
    (project / "other.toml").write_text(other)
    code, out, _ = run_cli(project, "--manifest", "other.toml", "build")
    assert code == 0, out
    assert list(json.loads((project / "aitune.lock").read_text())["targets"]) == ["adder_export", "mlp_eager", "mlp_export"]
    assert list(json.loads((project / "other.lock").read_text())["targets"]) == ["only_other"]
    code, out, _ = run_cli(project, "--manifest", "other.toml", "build", "--locked")
    assert code == 0, out


def test_locked_and_status_name_the_changed_field(built_project: Path) -> None:
    project = built_project
    toml = project / "aitune.toml"
    toml.write_text(toml.read_text().replace("args = { hidden = 8 }", "args = { hidden = 8, d_out = 4 }"))
    code, out, _ = run_cli(project, "build", "--locked", "mlp_export")
    assert code == 1 and "module.args.d_out: added (4)" in out, out
    code, out, _ = run_cli(project, "status", "mlp_export")
    assert "[lock: differs: module.args.d_out: added (4)]" in out, out
    toml.write_text(toml.read_text().replace('[backends.exp]\nkind = "export"', '[backends.exp]\nkind = "export"\nstrict = true'))
    code, out, _ = run_cli(project, "build", "--locked", "adder_export")
    assert code == 1 and "backend.strict: false -> true" in out, out


def test_deterministic_artifacts_are_pinned_and_others_are_not(built_project: Path) -> None:
    project = built_project
    toml = project / "aitune.toml"
    toml.write_text(toml.read_text() + '\n[backends.jit]\nkind = "inductor_jit"\n[targets.adder_jit]\nmodule = "adder"\nbackend = "jit"\n')
    _built(project, "adder_jit")
    lock = json.loads((project / "aitune.lock").read_text())["targets"]
    assert set(lock["adder_export"]["artifact"]) == {"name", "sha256", "xxh3", "size"}
    assert lock["adder_jit"]["artifact"] == {"name": "record.json", "pinned": False}
    assert lock["adder_export"]["components"]["module"]["factory"] == "models.adder:build"  # readable, field by field


@pytest.mark.slow
def test_fresh_clones_leave_the_committed_lock_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's rule: a build of a fresh clone (own folder, own cache) rewrites nothing in the lock, also for an
    AOTInductor target whose bytes differ from build to build."""
    manifest = MANIFEST + '\n[backends.aoti]\nkind = "inductor_aot"\n[targets.mlp_aoti]\nfrom = "mlp_export"\nbackend = "aoti"\n'
    first = make_project(tmp_path / "a", manifest)
    monkeypatch.setenv("AITUNE_CACHE_DIR", str(tmp_path / "cache-a"))
    _built(first)
    committed = (first / "aitune.lock").read_bytes()
    for clone in ("b", "elsewhere/c"):
        root = tmp_path / clone
        shutil.copytree(first, root, ignore=shutil.ignore_patterns("build", ".aitune"))
        monkeypatch.setenv("AITUNE_CACHE_DIR", str(tmp_path / f"cache-{clone.replace('/', '_')}"))
        _built(root)
        assert json.loads((root / "build/mlp_aoti/build.json").read_text())["source"] == "built"  # really rebuilt
        assert (root / "aitune.lock").read_bytes() == committed
        code, out, _ = run_cli(root, "build", "--locked")
        assert code == 0, out
