"""The no-op fast path (quick.py) prints what the click CLI prints, without importing click; anything else falls
through to click."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from .conftest import run_cli

PKG = str(Path(__file__).resolve().parent.parent)
PROBE = """
import sys
from aitune_build.quick import try_noop
code = try_noop(sys.argv[1:])
print("CODE", code, "click" in sys.modules, "torch" in sys.modules, "typing" in sys.modules)
"""


def probe(*argv: str) -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": PKG})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    return "\n".join(lines[:-1]), lines[-1]


def norm(text: str) -> str:
    return re.sub(r"\d+\.\d\ds", "T", text).strip()


def test_noop_fast_path_matches_the_cli_and_skips_click(project: Path) -> None:
    from .conftest import age

    age(project / "aitune.toml")  # an old manifest: its parse is remembered, as in a real repo
    assert run_cli(project, "build", "mlp_export", "mlp_eager")[0] == 0
    code, cli_out, _ = run_cli(project, "build", "-j", "2", "mlp_export", "mlp_eager")
    assert code == 0
    fast_out, tail = probe("-C", str(project), "build", "-j", "2", "mlp_export", "mlp_eager")
    # neither click nor torch nor even typing (~4 ms, 3 % of a 100-target no-op: modules import it for type checkers only)
    assert tail == "CODE 0 False False False", tail
    assert norm(fast_out) == norm(cli_out), (fast_out, cli_out)
    assert "2 cached" in fast_out
    # the same through `python -m aitune_build`
    out = subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(project), "build", "mlp_export"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": PKG})
    assert out.returncode == 0 and "up to date" in out.stdout


def test_anything_else_falls_through_to_click(project: Path) -> None:
    assert run_cli(project, "build", "mlp_export")[0] == 0
    # a target that needs building, another command, other options, an unknown target, an implicit build
    for argv in (["build", "adder_export"], ["status"], ["build", "--json", "mlp_export"], ["build", "nope"],
                 ["mlp_export"], ["build", "-f", "mlp_export"]):
        out, tail = probe("-C", str(project), *argv)
        assert tail.startswith("CODE None"), (argv, tail)
        assert out == "", (argv, out)
    assert not (project / "build/adder_export").exists()  # settling never builds


def _build(root: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(root), "build", *argv], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": PKG})


def _cached_records(root: Path) -> dict:
    import json

    return json.loads((root / ".aitune/state-v2.json").read_bytes()).get("records", {})


def test_build_json_is_parsed_once_and_a_changed_one_is_read_again(built_project: Path) -> None:
    from .conftest import age

    record = built_project / "build/mlp_export/build.json"
    age(record)
    first = _build(built_project, "mlp_export")
    assert first.returncode == 0 and "up to date" in first.stdout, first.stdout + first.stderr
    assert str(record) in _cached_records(built_project)  # the next no-op does not read build.json again
    assert "up to date" in _build(built_project, "mlp_export").stdout

    # the same size, other bytes (another key), another mtime: read again, so the target is not up to date
    text = record.read_text()
    key = json.loads(text)["key"]
    record.write_text(text.replace(key, key[::-1]))
    age(record)
    out = _build(built_project, "mlp_export")
    assert out.returncode == 0 and "restored from cache" in out.stdout, out.stdout + out.stderr
    assert json.loads(record.read_text())["key"] == key

    # the same size and mtime as the cached record, other bytes in a new file put in place (a new inode)
    age(record)
    assert "up to date" in _build(built_project, "mlp_export").stdout
    st = record.stat()
    tmp = record.with_name("build.json.new")
    tmp.write_text(record.read_text().replace(key, key[::-1]))
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, record)
    assert record.stat().st_size == st.st_size and record.stat().st_mtime_ns == st.st_mtime_ns
    out = _build(built_project, "mlp_export")
    assert "restored from cache" in out.stdout, out.stdout + out.stderr

    # a deleted build.json, then a modified artifact (its record cached): both detected as before
    age(record)
    assert "up to date" in _build(built_project, "mlp_export").stdout
    record.unlink()
    assert "restored from cache" in _build(built_project, "mlp_export").stdout
    age(record)
    assert "up to date" in _build(built_project, "mlp_export").stdout
    artifact = built_project / "build/mlp_export" / json.loads(record.read_text())["artifact"]
    data = bytearray(artifact.read_bytes())
    data[-1] ^= 1
    artifact.write_bytes(bytes(data))
    age(artifact)
    out = _build(built_project, "mlp_export")
    assert "restored from cache" in out.stdout, out.stdout + out.stderr
    assert artifact.read_bytes() != bytes(data)


def test_a_malformed_lock_stops_the_fast_path_before_it_settles_anything(built_project: Path) -> None:
    from .conftest import age

    lock = built_project / "aitune.lock"
    good = lock.read_bytes()
    failure = built_project / "build/mlp_export/last-failure.json"  # an up-to-date target with an old failure
    for bad in (b"[]", b'{"format": 3, "targets": {}}', b"not json", b'{"format": 2, "targets": {"mlp_export": 1}}'):
        lock.write_bytes(bad)
        age(lock)
        failure.write_text('{"when": 0, "reason": "an earlier failure"}')
        out, tail = probe("-C", str(built_project), "build", "mlp_export")
        assert tail.startswith("CODE None"), (bad, tail)  # not settled here: click reports it
        assert failure.exists(), bad  # nothing touched, as the click path stops before building
        res = _build(built_project, "mlp_export")
        assert res.returncode == 2 and res.stdout == "", (bad, res.stdout)
        assert res.stderr.startswith("aitune-build: error: aitune.lock: ") and len(res.stderr.splitlines()) == 1, res.stderr
        assert "Traceback" not in res.stderr and lock.read_bytes() == bad
    lock.write_bytes(good)
    assert _build(built_project, "mlp_export").returncode == 0 and not failure.exists()


def test_the_lock_is_read_again_when_it_changes_during_a_build(built_project: Path) -> None:
    # update() takes check_readable's snapshot only while the file is as it was: a lock rewritten meanwhile (another
    # build of the same project) is read again, and what that build wrote is kept
    from aitune_build import lockfile
    from aitune_build.executor import BuildOptions, build
    from aitune_build.project import Project

    from .conftest import age

    lock = built_project / "aitune.lock"
    data = json.loads(lock.read_bytes())
    data["targets"].pop("mlp_export")  # not locked yet: this build adds it
    lock.write_bytes(lockfile.render(data))
    age(lock)
    project = Project.open(built_project / "aitune.toml")
    seen = lockfile.check_readable(project)
    assert seen.signature is not None
    results = build(project, ["mlp_export"], BuildOptions(settle_only=True))
    data["targets"].pop("adder_export")
    lock.write_bytes(lockfile.render(data))  # another build dropped an entry meanwhile (a new mtime)
    assert "adder_export" in seen.content["targets"]  # what the stale snapshot would write back, were it used
    lockfile.update(project, results, seen)
    after = json.loads(lock.read_bytes())["targets"]
    assert "mlp_export" in after and "adder_export" not in after
