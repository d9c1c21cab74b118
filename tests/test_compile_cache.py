"""JIT targets start warm: PyTorch's compile caches are stored with the target and restored by load()."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import run_cli

JIT = """
[backends.jit]
kind = "inductor_jit"

[modules.small]
factory = "models.small:build"
inputs = [{ name = "input", shape = [4, 8] }]

[targets.small_jit]
module = "small"
backend = "jit"
"""
SMALL = "import torch\n\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))\n"
# A fresh process with an empty Inductor cache: only what load() restores can make the compile hit a cache.
FIRST_CALL = """
import json, sys, torch
import aitune_build
from torch._dynamo.utils import counters
import torch._inductor.cpp_builder as builder
compiled = []  # the C++ compiles this process runs (the compiler's command lines)
run = builder._run_compile_cmd
builder._run_compile_cmd = lambda cmd, cwd: (compiled.append(cmd), run(cmd, cwd))[1]
fn = aitune_build.load("small_jit", manifest=sys.argv[1])
fn(torch.randn(4, 8))
from torch._inductor.cpu_vec_isa import VecISA
from torch._inductor.runtime.runtime_utils import cache_dir
from pathlib import Path
probes = [str(p) for p in Path(cache_dir()).rglob("*.cpp") if p.read_text() == VecISA._avx_code]
found = {k: dict(counters[k]) for k in ("inductor", "aot_autograd")}
found["isa_probe_compiled"] = any(p in cmd for p in probes for cmd in compiled)
print(json.dumps(found))
"""


def first_call_counters(project: Path, tmp_path: Path, name: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}"),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-c", FIRST_CALL, str(project / "aitune.toml")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_inductor_jit_stores_compile_caches_and_load_restores_them(project: Path, tmp_path: Path) -> None:
    (project / "models/small.py").write_text(SMALL)
    (project / "aitune.toml").write_text((project / "aitune.toml").read_text() + JIT)
    code, out, data = run_cli(project, "build", "--json", "small_jit")
    assert code == 0, out
    folder = project / "build/small_jit"
    cache = folder / "compile_cache.bin"
    assert cache.is_file() and cache.stat().st_size > 0
    record = json.loads((folder / "build.json").read_text())
    assert "compile_cache.bin" in record["files"]  # checksummed and stored like the other files
    entries = record["record"]["compile_cache"]["entries"]
    assert entries.get("inductor", 0) >= 1, entries
    kernels = sorted(p.relative_to(folder / "inductor_kernels") for p in (folder / "inductor_kernels").rglob("*.so"))
    assert kernels and record["record"]["compile_cache"]["kernels"] == len(kernels)  # the CPU kernels, compiled once

    warm = first_call_counters(project, tmp_path, "warm")
    assert warm["inductor"].get("fxgraph_cache_hit", 0) >= 1, warm
    assert warm["inductor"].get("fxgraph_cache_miss", 0) == 0, warm
    assert all((tmp_path / "inductor-warm" / k).is_file() for k in kernels)  # put where Inductor looks for them
    # Inductor's vector-ISA check (a test library it compiles in an empty cache folder, 3 s of a 5 s first call here)
    # came with the kernels too
    assert warm["isa_probe_compiled"] is False, warm

    cache.unlink()  # without the stored caches the same fresh process compiles from scratch: the check above can fail
    cold = first_call_counters(project, tmp_path, "cold")
    assert cold["inductor"].get("fxgraph_cache_hit", 0) == 0 and cold["inductor"].get("fxgraph_cache_miss", 0) >= 1, cold
    assert cold["isa_probe_compiled"] is True, cold  # the probe detection above can see a compile


DYNAMIC = JIT.replace('[4, 8]', '[{ dim = "batch", min = 1, opt = 4, max = 8 }, 8]')
FIRST_CALL_AT = FIRST_CALL.replace("torch.randn(4, 8)", "torch.randn(int(sys.argv[2]), 8)")


@pytest.mark.slow
def test_a_dynamic_jit_target_starts_warm_whatever_batch_comes_first(project: Path, tmp_path: Path) -> None:
    """The build's check calls min, opt, max; an application's first call has whatever batch it has. Dynamo compiles
    a first call statically unless its dynamic axes are marked, which made a fresh process's first call at batch 6
    miss the stored graphs (compiled for batch 1 and for a dynamic batch)."""
    (project / "models/small.py").write_text(SMALL)
    (project / "aitune.toml").write_text((project / "aitune.toml").read_text() + DYNAMIC)
    code, out, _ = run_cli(project, "build", "--json", "small_jit")
    assert code == 0, out
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for batch in ("6", "1"):
        env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / f"inductor-{batch}")
        got = subprocess.run([sys.executable, "-c", FIRST_CALL_AT, str(project / "aitune.toml"), batch], env=env,
                             capture_output=True, text=True, timeout=600)
        assert got.returncode == 0, got.stderr[-3000:]
        counters = json.loads(got.stdout.strip().splitlines()[-1])["inductor"]
        assert counters.get("fxgraph_cache_hit", 0) >= 1 and counters.get("fxgraph_cache_miss", 0) == 0, (batch, counters)
