"""Key stability and what feeds a key: pinned digest, transitive source scanning, canonical form."""

from __future__ import annotations

from pathlib import Path

from aitune_build.hashing import StateCache
from aitune_build.keys import Fingerprinter, component_changes, diff_components, key_of
from aitune_build.manifest import load_manifest
from aitune_build.sources import module_sources

from .conftest import make_project

FAKE_TOOLCHAIN = {"python": "CPython 3.11.7", "torch": "torch 2.13.0+cpu"}


def _fingerprinter(root: Path) -> Fingerprinter:
    return Fingerprinter(load_manifest(root / "aitune.toml"), StateCache(None), toolchain_override=FAKE_TOOLCHAIN)


def test_pinned_key_for_a_fixed_project(tmp_path: Path) -> None:
    # A fixed manifest and fixed files give this exact key on any machine. If this fails, the key changed:
    # bump KEY_SCHEMA on purpose, or find the accidental change.
    root = make_project(tmp_path / "p")
    (root / "weights/mlp.pt").write_bytes(b"fixed weights bytes")
    comps = _fingerprinter(root).components("mlp_export")
    assert sorted(comps) == ["backend", "check", "module", "packages", "samples", "sources", "toolchain", "weights"]
    assert comps["packages"] == {}  # the fixture imports torch only: in the toolchain, not here
    assert key_of(comps) == "9d7143ff21bb61a5881a5bfafeb7bae7"  # since KEY_SCHEMA 2 (third-party packages)


def test_transitive_helper_two_imports_away_is_a_source(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    found = module_sources(root, "models.mlp", StateCache(None))
    assert list(found) == ["models/__init__.py", "models/helpers/__init__.py", "models/helpers/deep.py", "models/mlp.py"]
    assert "models/adder.py" not in found


def test_relative_imports_and_imports_inside_functions(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "pkg/sub").mkdir(parents=True)
    (root / "pkg/__init__.py").write_text("")
    (root / "pkg/sub/__init__.py").write_text("")
    (root / "pkg/sub/m.py").write_text("from ..util import f\nfrom . import sib\n\ndef g():\n    import pkg.late\n")
    (root / "pkg/util.py").write_text("import os\nimport numpy\n")
    (root / "pkg/sub/sib.py").write_text("")
    (root / "pkg/late.py").write_text("")
    (root / "pkg/unused.py").write_text("")
    found = module_sources(root, "pkg.sub.m", StateCache(None))
    assert sorted(found) == ["pkg/__init__.py", "pkg/late.py", "pkg/sub/__init__.py", "pkg/sub/m.py", "pkg/sub/sib.py", "pkg/util.py"]


def test_key_changes_with_each_component_and_diff_names_it(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    base = _fingerprinter(root).components("mlp_export")
    (root / "models/helpers/deep.py").write_text("import torch\n\n\ndef act(x):\n    return torch.tanh(x)\n")
    changed = _fingerprinter(root).components("mlp_export")
    assert key_of(base) != key_of(changed)
    assert diff_components(base, changed) == ["models/helpers/deep.py changed"]
    [c] = component_changes(base, changed)
    assert c == {"component": "sources", "path": "models/helpers/deep.py", "change": "changed",
                 "old": base["sources"]["models/helpers/deep.py"], "new": changed["sources"]["models/helpers/deep.py"]}
    text = (root / "aitune.toml").read_text()
    (root / "aitune.toml").write_text(text.replace('kind = "export"', 'kind = "export"\nstrict = true'))
    again = _fingerprinter(root).components("mlp_export")
    assert "backend.strict: false -> true" in diff_components(changed, again)


def test_defaults_are_in_the_key(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    comps = _fingerprinter(root).components("mlp_export")
    assert comps["backend"] == {"kind": "export", "device": "cpu", "strict": False}
    assert comps["check"] == {"rtol": None, "atol": None, "seed": 0}


def test_stat_cache_reuses_digest_without_reading(tmp_path: Path) -> None:
    f = tmp_path / "big.bin"
    f.write_bytes(b"x" * 1000)
    import os

    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - 10_000_000_000))
    state = StateCache(tmp_path / "state.json")
    d1 = state.digest(f)
    state.save()
    # Same inode, size and mtime, other bytes: a digest from the stat cache, not a read, still says d1.
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.write(b"y")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert StateCache(tmp_path / "state.json").digest(f) == d1
    assert StateCache(None).digest(f) != d1


def test_key_encodes_shared_components_once_and_agrees_with_key_of(tmp_path: Path) -> None:
    # Fingerprinter.key encodes the components targets share (module, sources, backend, ...) once per run; the
    # result must be key_of(components) for every target: plain, tuned-free, `from`, with and without a check table.
    from .conftest import MANIFEST

    manifest = MANIFEST + ('\n[backends.aoti]\nkind = "inductor_aot"\n[targets.mlp_aoti]\nfrom = "mlp_export"\nbackend = "aoti"\n'
                           '\n[targets.mlp_seeded]\nmodule = "mlp"\nbackend = "exp"\ncheck = { seed = 3, atol = 0.5 }\n')
    root = make_project(tmp_path / "p", manifest)
    (root / "weights/mlp.pt").write_bytes(b"fixed weights bytes")
    fp = _fingerprinter(root)
    keys = set()
    for name in ("mlp_export", "mlp_eager", "adder_export", "mlp_seeded", "mlp_export", "mlp_aoti"):
        upstream = "ab" * 16 if name == "mlp_aoti" else None
        key, comps = fp.key(name, upstream)
        assert key == key_of(comps) == key_of(_fingerprinter(root).components(name, upstream)), name
        keys.add(key)
    assert len(keys) == 5  # the seeded check and the upstream digest change the key like any other component
    assert fp.key("mlp_aoti", "cd" * 16)[0] != fp.key("mlp_aoti", "ab" * 16)[0]
