"""Small CLI behaviours: command typos, -j range, clean's report, misspelled required keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import MANIFEST, run_cli


def test_mistyped_command_is_an_unknown_command_and_a_target_name_still_builds(built_project: Path) -> None:
    project = built_project
    code, out, _ = run_cli(project, "bulid")
    assert code == 2 and "unknown command 'bulid' (did you mean `build`?)" in out and "unknown target" not in out, out
    code, out, _ = run_cli(project, "statsu")
    assert code == 2 and "did you mean `status`?" in out, out
    code, out, _ = run_cli(project, "build", "bulid")  # named explicitly as a target: a target error
    assert code == 2 and "unknown target 'bulid'" in out, out
    code, out, _ = run_cli(project, "mlp_eager")  # a target name as the first word keeps building it
    assert code == 0 and "mlp_eager" in out and "1 cached" in out, out


@pytest.mark.parametrize("jobs", ["0", "-3"])
def test_jobs_below_one_are_rejected(project: Path, jobs: str) -> None:
    code, out, _ = run_cli(project, "build", "-j", jobs)
    assert code == 2 and "-j" in out and "range" in out, out
    assert not (project / "build").exists()


def test_clean_reports_only_what_it_removed(built_project: Path) -> None:
    run_cli(built_project, "clean", "mlp_eager")
    code, out, _ = run_cli(built_project, "clean", "--cache")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4, out  # two target folders, then what the store wrote in the cache
    assert lines[-2].endswith(".aitune/state-v2.json") and lines[-1].endswith(".aitune/store-v1"), out
    assert not any(ln.endswith("build/mlp_eager") for ln in lines), out  # removed before: not reported again
    code, out, _ = run_cli(built_project, "clean", "--cache")
    assert code == 0 and "removed" not in out, out


def test_misspelled_required_key_names_the_unknown_key(project: Path) -> None:
    (project / "aitune.toml").write_text(MANIFEST.replace('factory = "models.adder:build"', 'factroy = "models.adder:build"'))
    code, out, _ = run_cli(project, "status")
    assert code == 2 and out.count("\n") == 1, out
    assert "aitune.toml: modules.adder.factroy: unknown key 'factroy' (did you mean 'factory'?)" in out, out
