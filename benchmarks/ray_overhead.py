"""What `--executor ray` costs per target against the local executor, on the same host and targets (goal <= 1 s).

    python benchmarks/ray_overhead.py [--targets 4] [--rounds 3] [--out results.json]

Starts a one-node Ray cluster (head, --num-cpus 1) in a temp folder and stops it by PID afterwards (every process
whose command line names that folder; never `ray stop`). A generated project of N small export targets (distinct
keys) is built cold — fresh copy, empty cache and out dir — as a whole `aitune-build build -j 1` process, locally
and with `--executor ray` (one target at a time in both), alternating local / ray in every round so that a noisy
moment on a shared machine hits both. Overhead per target = (ray wall − local wall) / N, median over rounds; it
includes joining the cluster, shipping the project (working_dir, py_modules), the job's first Ray worker process
(its warm fork server is reused by the targets after the first), and the result's round trip (inline here: the
artifacts are smaller than a chunk).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_project(root: Path, n: int) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "models/__init__.py").write_text("")
    (root / "models/lin.py").write_text("import torch\n\n\ndef build(width=4):\n    return torch.nn.Sequential(torch.nn.Linear(width, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n")
    lines = ['[project]\nname = "overhead"\n', '[backends.exp]\nkind = "export"\n']
    for i in range(n):
        w = 4 + i
        lines.append(f'[modules.m{i}]\nfactory = "models.lin:build"\nargs = {{ width = {w} }}\n'
                     f'inputs = [{{ name = "input", shape = [2, {w}] }}]\n')
        lines.append(f'[targets.t{i}]\nmodule = "m{i}"\nbackend = "exp"\n')
    (root / "aitune.toml").write_text("\n".join(lines))
    return root


def build_cold(template: Path, work: Path, extra: list[str], env: dict[str, str]) -> dict:
    proj = work / f"run-{time.monotonic_ns()}"
    shutil.copytree(template, proj)
    env = {**env, "AITUNE_CACHE_DIR": str(proj / ".cache")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(proj), "build", "-j", "1", "--json", *extra],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    doc = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {"targets": []}
    shutil.rmtree(proj, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"build {extra} failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    return {"wall_s": wall, "target_s": [t["seconds"] for t in doc["targets"]]}


def ours(temp_dir: str) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and temp_dir.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                pids.append(int(d))
        except OSError:
            pass
    return pids


def stop(temp_dir: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours(temp_dir):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + 10
        while ours(temp_dir) and time.time() < deadline:
            time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray is None:
        raise SystemExit("needs ray: pip install 'aitune-build[ray]'")
    temp_dir = tempfile.mkdtemp(prefix="ar", dir="/tmp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    env.pop("RAY_ADDRESS", None)
    rows = []
    try:
        t0 = time.perf_counter()
        subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--temp-dir={temp_dir}",
                        "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True,
                       capture_output=True)
        start_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(prefix="ray-overhead-") as tmp:
            template = make_project(Path(tmp) / "template", args.targets)
            for r in range(args.rounds):
                local = build_cold(template, Path(tmp), [], env)
                remote = build_cold(template, Path(tmp), ["--executor", "ray", "--ray-address", f"127.0.0.1:{port}"], env)
                per = (remote["wall_s"] - local["wall_s"]) / args.targets
                rows.append({"round": r, "local_s": round(local["wall_s"], 2), "ray_s": round(remote["wall_s"], 2),
                             "overhead_per_target_s": round(per, 3),
                             "local_target_median_s": round(statistics.median(local["target_s"]), 2),
                             "ray_target_median_s": round(statistics.median(remote["target_s"]), 2)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "targets": args.targets, "ray_start_s": round(start_s, 1), "rounds": rows,
              "median_local_s": round(statistics.median(r["local_s"] for r in rows), 2),
              "median_ray_s": round(statistics.median(r["ray_s"] for r in rows), 2),
              "median_overhead_per_target_s": round(statistics.median(r["overhead_per_target_s"] for r in rows), 3)}
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
