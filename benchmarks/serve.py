"""Overhead of the serving hook on the CPU: start-up and per call for a script that serves nothing, and the cost of
a served call against aitune_build.load() of the same target.

    python benchmarks/serve.py --out serve-cpu.json [--rounds 15]

Builds a small project (an MLP with an export target, serve = true) in a temp folder, then, interleaved round by
round, starts each script in each mode and takes medians:
- modes: `plain` (no hook), `hook` (the hook's sitecustomize on PYTHONPATH with AITUNE_MANIFEST and
  AITUNE_SERVE_INDEX: exactly what `aitune-build run` gives the child), `autowrapt` (AUTOWRAPT_BOOTSTRAP=aitune_build,
  the entry point installed as the dist-info `pip install` would write; this start parses aitune.toml and reads
  build.json, and autowrapt itself scans every installed distribution's entry points), and `aitune-build run` (the
  CLI's own start, which opens the project, plus exec);
- scripts: `pass.py` (nothing; the hook reads the manifest and build.json and waits for a class that never comes),
  `other.py` (imports torch, calls an unrelated nn.Linear 20 000 times: reports µs per call);
- served.py (under the hook): the served MLP and aitune_build.load() called alternately in blocks of 2 000.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MANIFEST = textwrap.dedent("""
    [project]
    name = "serve-bench"

    [modules.mlp]
    factory = "models:MLP"
    weights = "mlp.pt"
    inputs = [{ name = "x", shape = [{ dim = "batch", min = 1, opt = 4, max = 8 }, 16] }]

    [backends.exp]
    kind = "export"

    [targets.mlp_export]
    module = "mlp"
    backend = "exp"
    serve = true
""")
MODELS = textwrap.dedent("""
    import torch


    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 64)
            self.b = torch.nn.Linear(64, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))
""")
PASS = "pass\n"
OTHER = textwrap.dedent("""
    import sys, time
    import torch
    lin = torch.nn.Linear(16, 4).eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        for _ in range(2000):
            lin(x)
        t0 = time.perf_counter()
        for _ in range(20000):
            lin(x)
    print("PERCALL", (time.perf_counter() - t0) / 20000 * 1e6)
""")
SERVED = textwrap.dedent("""
    import json, statistics, sys, time
    import torch
    import aitune_build
    from models import MLP

    torch.set_num_threads(1)  # on a shared machine, threads competing for cores swamp a µs-level comparison
    model = MLP()
    model.load_state_dict(torch.load("mlp.pt"))
    model.eval()
    loaded = aitune_build.load("mlp_export", manifest="aitune.toml")
    x = torch.randn(4, 16)

    def block(fn, n=3000):
        t0 = time.perf_counter()
        for _ in range(n):
            fn(x)
        return (time.perf_counter() - t0) / n * 1e6

    with torch.no_grad():
        for _ in range(500):
            model(x); loaded(x)
        pairs = [(block(model), block(loaded)) for _ in range(7)]
        eager = [block(lambda t: model.forward.__wrapped__(model, t)) for _ in range(5)]
    print("SERVED", json.dumps({"served_us": statistics.median(s for s, _ in pairs), "load_us": statistics.median(l for _, l in pairs),
                                "served_vs_load": statistics.median(s / l for s, l in pairs), "eager_forward_us": statistics.median(eager)}))
""")


def _setup(project: Path) -> Path:
    import torch

    project.mkdir(parents=True, exist_ok=True)
    for name, text in (("aitune.toml", MANIFEST), ("models.py", MODELS), ("pass.py", PASS), ("other.py", OTHER), ("served.py", SERVED)):
        (project / name).write_text(text)
    sys.path.insert(0, str(project))
    from models import MLP  # type: ignore[import-not-found]

    torch.manual_seed(0)
    torch.save(MLP().state_dict(), project / "mlp.pt")
    sys.path.remove(str(project))
    proc = subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(project), "build"], env=_env("plain", project),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    tomllib = __import__("tomllib")
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["aitune_build"]
    dist = project / "site" / "aitune_build-0.1.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: aitune-build\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[aitune_build]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    return project


def _env(mode: str, project: Path) -> dict[str, str]:
    from aitune_build.serve.launch import SITE_DIR

    # Byte-code caching on, as in any installed environment (PYTHONDONTWRITEBYTECODE would compile every module at
    # every start and charge that to whoever imports most).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AITUNE_", "AUTOWRAPT_")) and k != "PYTHONDONTWRITEBYTECODE"}
    path = [str(ROOT)]
    if mode == "hook":
        path.insert(0, str(SITE_DIR))
        env["AITUNE_MANIFEST"] = str(project / "aitune.toml")
        env["AITUNE_SERVE_INDEX"] = "mlp_export,models,MLP"  # what `aitune-build run` hands the child
    elif mode == "autowrapt":
        path.insert(0, str(project / "site"))
        env.update(AUTOWRAPT_BOOTSTRAP="aitune_build", AITUNE_MANIFEST=str(project / "aitune.toml"))
    env["PYTHONPATH"] = os.pathsep.join(path)
    return env


def _start(project: Path, mode: str, script: str) -> tuple[float, str]:
    cmd = [sys.executable, script]
    if mode == "run":
        cmd = [sys.executable, "-m", "aitune_build", "run", "--"] + cmd
    env = _env("plain" if mode == "run" else mode, project)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or "aitune-build: serve:" in proc.stderr:
        raise SystemExit(f"{mode} {script}: {proc.stderr}")
    return wall, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="serve-cpu.json")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    project = _setup(Path(tempfile.mkdtemp(prefix="aitune-serve-bench-")))
    modes = ("plain", "hook", "autowrapt", "run")
    start: dict[str, dict[str, list[float]]] = {s: {m: [] for m in modes} for s in ("pass.py", "other.py")}
    percall: dict[str, list[float]] = {m: [] for m in modes}
    for mode in modes:  # warm-up: byte-code caches written
        _start(project, mode, "pass.py")
    for i in range(args.rounds):
        print(f"round {i + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for script in ("pass.py", "other.py"):
            for mode in modes:
                wall, out = _start(project, mode, script)
                start[script][mode].append(wall)
                if script == "other.py":
                    percall[mode].append(float(out.split()[-1]))
    res: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                 "date": time.strftime("%Y-%m-%d %H:%M"), "rounds": args.rounds}
    res["start_median_s"] = {s: {m: statistics.median(v) for m, v in d.items()} for s, d in start.items()}
    res["start_overhead_ms"] = {s: {m: 1e3 * (statistics.median(v) - statistics.median(d["plain"])) for m, v in d.items() if m != "plain"}
                                for s, d in start.items()}
    res["unserved_call_us_median"] = {m: statistics.median(v) for m, v in percall.items()}
    res["unserved_call_ratio_vs_plain"] = {m: statistics.median(v) / statistics.median(percall["plain"]) for m, v in percall.items()}
    _, out = _start(project, "hook", "served.py")
    res["served_cpu"] = json.loads(out.split("SERVED", 1)[1])
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
