"""Property tests (hypothesis): hostile manifests and archives give a clear message, never a traceback, and never
touch a file outside what the tool owns.

The quick suite runs a fast profile (about 30 s). The long profile is the same tests with more examples:

    AITUNE_FUZZ_EXAMPLES=2000 AITUNE_FUZZ_STATS=fuzz-stats.json python -m pytest -q tests/test_fuzz.py

(AITUNE_FUZZ_STATS writes how many examples ended how: exit codes, rejection reasons.)
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import io
import json
import math
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import MANIFEST, make_project, run_cli

EXAMPLES = int(os.environ.get("AITUNE_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 25,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
STATS: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _stats():
    yield
    path = os.environ.get("AITUNE_FUZZ_STATS")
    if path:
        old = json.loads(Path(path).read_text()) if Path(path).exists() else {}
        for k, v in STATS.items():
            old[k] = old.get(k, 0) + v
        Path(path).write_text(json.dumps(dict(sorted(old.items())), indent=2) + "\n")


# --- manifests ----------------------------------------------------------------------------------------------------

import tomllib  # noqa: E402

BASE = tomllib.loads(MANIFEST)
HOSTILE_PATHS = ["../..", "..", ".", "", "/", "/etc", "/tmp", "~", "models", "models/x", "weights", "aitune.toml",
                 "../sentinel", "../sentinel/sub", "a" * 300, "t\n", "build", ".aitune", "build/../..", "\0", "C:\\x",
                 "../proj", "./build", "build/", "//", "/**", "**", "../**", "*"]

scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1), st.sampled_from([0, -1, 2**62, -(2**62)]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40), st.sampled_from(HOSTILE_PATHS),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def deep(n: int) -> object:
    v: object = 1
    for _ in range(n):
        v = [v]
    return v


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def to_toml(data: dict) -> str:
    """Top-level and second-level tables as [a."b"] headers; everything below inline."""
    out = []
    for top, table in data.items():
        if not isinstance(table, dict):
            out.append(f"{json.dumps(top)} = {_toml_value(table)}")
            continue
        plain = {k: v for k, v in table.items() if not isinstance(v, dict) or top == "project"}
        subs = {k: v for k, v in table.items() if isinstance(v, dict) and top != "project"}
        out.append(f"[{json.dumps(top)}]")
        out += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in plain.items()]
        for name, sub in subs.items():
            out.append(f"[{json.dumps(top)}.{json.dumps(name)}]")
            out += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in sub.items()]
    return "\n".join(out) + "\n"


def _paths(d: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _paths(v, prefix + (k,))
    return out


@st.composite
def mutated_manifests(draw) -> bytes:
    data = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths))
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        how = draw(st.sampled_from(["replace", "unknown_key", "delete", "deep", "project_path", "name"]))
        if how == "replace":
            parent[path[-1]] = draw(values)
        elif how == "unknown_key" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(values)
        elif how == "delete":
            parent.pop(path[-1], None)
        elif how == "deep":
            parent[path[-1]] = deep(draw(st.sampled_from([10, 70, 500, 3000])))
        elif how == "project_path":
            data.setdefault("project", {})[draw(st.sampled_from(["out_dir", "cache_dir"]))] = draw(st.sampled_from(HOSTILE_PATHS))
        elif how == "name":
            table = draw(st.sampled_from(["targets", "modules", "backends"]))
            if isinstance(data.get(table), dict) and data[table]:
                old = draw(st.sampled_from(sorted(data[table])))
                data[table][draw(st.sampled_from(HOSTILE_PATHS + ["ok-name", "é", "x" * 101]))] = data[table].pop(old)
    try:
        text = to_toml(data).encode("utf-8")
    except (TypeError, RecursionError, UnicodeEncodeError):
        text = MANIFEST.encode()
    if draw(st.booleans()) and draw(st.booleans()):  # raw byte damage: invalid TOML, invalid UTF-8
        b = bytearray(text)
        for _ in range(draw(st.integers(1, 4))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        text = bytes(b)
    return text


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fuzz")
    os.environ.pop("AITUNE_CACHE_DIR", None)
    make_project(base / "template")
    return base


def _fresh(arena: Path) -> tuple[Path, Path]:
    for p in ("proj", "sentinel"):
        shutil.rmtree(arena / p, ignore_errors=True)
    shutil.copytree(arena / "template", arena / "proj")
    sentinel = arena / "sentinel"
    (sentinel / "sub").mkdir(parents=True)
    (sentinel / "precious.txt").write_text("outside the project\n")
    (sentinel / "sub/CACHEDIR.TAG").write_text("not ours\n")
    (sentinel / "store-v1").mkdir()
    (sentinel / "store-v1/data").write_text("looks like a store, is not\n")
    return arena / "proj", sentinel


@FUZZ
@given(text=mutated_manifests())
def test_mutated_manifests_exit_0_or_2_with_one_line(arena: Path, text: bytes) -> None:
    root, sentinel = _fresh(arena)
    (root / "aitune.toml").write_bytes(text)
    outside, project_files = _tree(sentinel), _tree(root)
    for cmd in (["status"], ["build", "--dry-run"], ["clean"], ["clean", "--cache"]):
        code, out, _ = run_cli(root, *cmd)  # catch_exceptions=False: any traceback fails the test
        assert code in (0, 2), (cmd, out)
        assert "Traceback" not in out
        if code == 2:
            assert out.count("\n") == 1 and out.startswith("aitune-build: error: aitune.toml: "), (cmd, out)
        STATS[f"manifest exit {code}"] += 1
    after = _tree(sentinel)
    assert {k: v for k, v in after.items() if k in outside} == outside  # nothing outside changed or deleted
    now = _tree(root)
    assert all(now.get(k) == v for k, v in project_files.items() if k != "aitune.toml"), "a project file changed"


# --- archives -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_archive(arena: Path) -> tuple[bytes, Path]:
    root = arena / "built"
    shutil.copytree(arena / "template", root)
    code, out, _ = run_cli(root, "build", "adder_export")
    assert code == 0, out
    path = arena / "good.tar.gz"
    assert run_cli(root, "package", "-o", str(path))[0] == 0
    return path.read_bytes(), root


def _members(data: bytes) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]


def _files(data: bytes) -> dict[str, bytes]:
    return {m.name: d for m, d in _members(data) if d is not None}


def _pack(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m, d in members:
            tar.addfile(m, io.BytesIO(d) if d is not None else None)
    return gzip.compress(raw.getvalue(), mtime=0)


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type, i.size, i.linkname = kind, size, link
    return i


HOSTILE_MEMBERS = {
    "symlink": lambda: (_info("targets/adder_export/l", tarfile.SYMTYPE, link="model.pt2"), None),
    "symlink_out": lambda: (_info("targets/l", tarfile.SYMTYPE, link="../../../etc/passwd"), None),
    "hardlink": lambda: (_info("targets/adder_export/h", tarfile.LNKTYPE, link="targets/adder_export/model.pt2"), None),
    "chardev": lambda: (_info("targets/adder_export/dev", tarfile.CHRTYPE), None),
    "blockdev": lambda: (_info("targets/adder_export/blk", tarfile.BLKTYPE), None),
    "fifo": lambda: (_info("targets/adder_export/fifo", tarfile.FIFOTYPE), None),
    "absolute": lambda: (_info("/tmp/evil", size=3), b"abc"),
    "dotdot": lambda: (_info("targets/../../evil", size=3), b"abc"),
    "dot": lambda: (_info(".", tarfile.DIRTYPE), None),
    "dot_inside": lambda: (_info("targets/./adder_export/x", size=3), b"abc"),
    "long_name": lambda: (_info("targets/adder_export/" + "n" * 300, size=3), b"abc"),
    "long_target": lambda: (_info("targets/" + "t" * 300 + "/model.pt2", size=3), b"abc"),
    "file_for_folder": lambda: (_info("targets/adder_export/model.pt2/inner", size=3), b"abc"),
    "duplicate": lambda: (_info("targets/adder_export/model.pt2", size=3), b"abc"),
    "unlisted_target": lambda: (_info("targets/other/model.pt2", size=3), b"abc"),
    "outside_layout": lambda: (_info("setup.py", size=3), b"abc"),
}


@st.composite
def mutated_archives(draw, good: bytes) -> tuple[str, bytes]:
    how = draw(st.sampled_from(["flip", "truncate", "member", "member", "bomb", "trailer", "drop"]))
    if how == "flip":
        b = bytearray(good)
        for _ in range(draw(st.integers(1, 3))):
            b[draw(st.integers(0, len(b) - 1))] ^= draw(st.integers(1, 255))
        return how, bytes(b)
    if how == "truncate":
        return how, good[: draw(st.integers(0, len(good) - 1))]
    if how == "trailer":
        return how, good[:-8] + bytes(draw(st.lists(st.integers(0, 255), min_size=0, max_size=8)))
    members = _members(good)
    if how == "drop":
        i = draw(st.integers(0, len(members) - 1))
        return how, _pack(members[:i] + members[i + 1:])
    if how == "bomb":  # 64 MiB of zeros in ~64 KiB, where a small file should be
        size = 64 << 20
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            tar.addfile(members[0][0], io.BytesIO(members[0][1]))
            tar.addfile(_info("targets/adder_export/model.pt2", size=size), io.BytesIO(bytes(size)))
        return how, gzip.compress(raw.getvalue(), mtime=0)
    kind = draw(st.sampled_from(sorted(HOSTILE_MEMBERS)))
    at = draw(st.integers(0, len(members)))
    return f"member:{kind}", _pack(members[:at] + [HOSTILE_MEMBERS[kind]()] + members[at:])


def test_archive_strategies_are_rejected_one_by_one(good_archive: tuple[bytes, Path], arena: Path) -> None:
    """Every hostile member kind, appended, is rejected with a clear message (a table, not sampled)."""
    from aitune_build.release import verify_archive

    good, _ = good_archive
    for kind, make in sorted(HOSTILE_MEMBERS.items()):
        path = arena / f"m-{kind}.tar.gz"
        path.write_bytes(_pack(_members(good) + [make()]))
        problem = verify_archive(path)
        assert problem, kind
        STATS[f"archive member:{kind} rejected"] += 1


@FUZZ
@given(data=st.data())
def test_mutated_archives_are_rejected_and_nothing_escapes(good_archive: tuple[bytes, Path], arena: Path, data) -> None:
    import aitune_build
    from aitune_build.release import verify_archive

    good, root = good_archive
    how, blob = data.draw(mutated_archives(good))
    path = arena / "mutated.tar.gz"
    path.write_bytes(blob)
    sentinel = arena / "sentinel-a"
    sentinel.mkdir(exist_ok=True)
    (sentinel / "precious.txt").write_text("x\n")
    before = _tree(sentinel)
    problem = verify_archive(path)
    if problem is None:  # only a change that leaves every file alone (the gzip header's OS byte, a folder entry)
        assert _files(blob) == _files(good), how
        STATS[f"archive {how.split(':')[0]} harmless"] += 1
        return
    assert isinstance(problem, str) and problem and "\n" not in problem
    STATS[f"archive {how.split(':')[0]} rejected"] += 1
    releases = root / ".aitune/releases-v1"
    with pytest.raises(aitune_build.UserError, match="not a valid release archive"):
        aitune_build.load("adder_export", manifest=str(root / "aitune.toml"), archive=str(path))
    leftovers = [p.name for p in releases.iterdir() if p.name.startswith(".")] if releases.exists() else []
    assert leftovers == [], leftovers  # no temp folders left on failure
    assert _tree(sentinel) == before
    assert not Path("/tmp/evil").exists() and not (arena.parent / "evil").exists()


# --- aitune.lock --------------------------------------------------------------------------------------------------


def _mutate_json(value, data):
    """value with one node replaced by a hostile scalar or container, or one key dropped."""
    if isinstance(value, dict) and value and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(value)))
        if data.draw(st.booleans()):
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: _mutate_json(value[key], data)}
    if isinstance(value, list) and value and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(value) - 1))
        return value[:i] + [_mutate_json(value[i], data)] + value[i + 1:]
    return data.draw(st.one_of(scalars, st.just({}), st.just([]), st.just(None), st.just({"key": 1}), st.just([[]])))


@FUZZ
@given(data=st.data())
def test_mutated_locks_are_one_line_errors(good_archive: tuple[bytes, Path], data) -> None:
    root = good_archive[1]
    lock = root / "aitune.lock"
    original = lock.read_bytes()
    try:
        if data.draw(st.booleans()):  # structural: valid JSON, wrong shape
            text = json.dumps(_mutate_json(json.loads(original), data)).encode()
        else:  # bytes: flips and truncation
            raw = bytearray(original)
            for _ in range(data.draw(st.integers(1, 4))):
                raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
            text = bytes(raw[: data.draw(st.integers(0, len(raw)))])
        lock.write_bytes(text)
        for cmd in (["status"], ["build", "--locked", "--dry-run"], ["build", "--dry-run"]):
            code, out, _ = run_cli(root, *cmd)  # catch_exceptions=False: any traceback fails the test
            assert code in (0, 1, 2), (cmd, out)
            assert "Traceback" not in out
            if code == 2:
                assert out.startswith("aitune-build: error: aitune.lock"), (cmd, out)
            STATS[f"lock exit {code}"] += 1
    finally:
        lock.write_bytes(original)
