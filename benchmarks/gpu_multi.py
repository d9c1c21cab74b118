"""Eight Torch-TensorRT AOT targets built on one GPU vs two GPUs of one host (issue 13; goal: 2 GPUs >= 1.8x).

    python benchmarks/gpu_multi.py --out results.json [--gpus-a 0 --gpus-b 0,1] [--budget-s 500]

Plain python (no pytest, no ray). The project (ResNet-18 from torchvision, random weights, at four class counts x
batch 1 and 8: eight distinct keys, each a real TensorRT engine build, fp32, static shapes) is generated in a temp
folder and built with `aitune-build build --gpus 0` and with `--gpus 0,1`, each time with an empty cache and out
dir (cold), as whole processes. Run order: 1 GPU, 2 GPUs, then, as far as the time budget allows, 1 GPU with
AITUNE_GPU_OVERLAP=0 (no compile beside a check: what a GPU's overlap of the two is worth) and 1 GPU again (so a
cold disk cache on the first run shows up as a difference between the two 1-GPU runs); `--order a,b,b,a,a,b`
alternates rounds, and the ratio is then also given per round (each pair of builds next to each other). Each build
records its targets' phase timings (build.json) and the host's load. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

NET = '''
import torch
import torchvision


def build(num_classes=1000):
    return torchvision.models.resnet18(num_classes=num_classes)
'''


def make_project(root: Path) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "models/__init__.py").write_text("")
    (root / "models/net.py").write_text(NET)
    lines = ['[project]\nname = "gpu_multi"\n', '[backends.trt]\nkind = "torch_tensorrt_aot"\n']
    for classes in (10, 100, 1000, 2000):
        for batch in (1, 8):
            m = f"r18_c{classes}_b{batch}"
            lines.append(f'[modules.{m}]\nfactory = "models.net:build"\nargs = {{ num_classes = {classes} }}\n'
                         f'inputs = [{{ name = "x", shape = [{batch}, 3, 224, 224] }}]\n')
            lines.append(f'[targets.{m}]\nmodule = "{m}"\nbackend = "trt"\n')
    (root / "aitune.toml").write_text("\n".join(lines))
    return root


SERVER_ENV: dict[str, str] = {}  # --server: AITUNE_BUILD_SERVER and this run's XDG_RUNTIME_DIR


def build_cold(template: Path, work: Path, gpus: str, overlap: bool = True) -> dict:
    proj = work / f"run-{gpus.replace(',', '_')}-{time.monotonic_ns()}"
    shutil.copytree(template, proj)
    env = {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
           "AITUNE_CACHE_DIR": str(proj / ".cache"), "AITUNE_GPU_OVERLAP": "1" if overlap else "0", **SERVER_ENV}
    load_before, cpu_before = os.getloadavg()[0], _cpu_times()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(proj), "build", "--gpus", gpus, "--json", "-k"],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu_after = _cpu_times()
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        doc = {"targets": [], "error": (proc.stdout + proc.stderr)[-3000:]}
    targets = [{"name": t["name"], "status": t["status"], "seconds": t["seconds"],
                "gpu": (t.get("gpu") or {}).get("index"), "reason": t["reason"][:300],
                "timings": _timings(proj / "build" / t["name"])} for t in doc.get("targets", [])]
    shutil.rmtree(proj, ignore_errors=True)
    # What else the host did meanwhile: the load average, and the CPU seconds the whole host (every core /proc/stat
    # counts, other tenants included) spent busy and idle during the build.
    host = {"load1_before": round(load_before, 2), "load1_after": round(os.getloadavg()[0], 2)}
    if cpu_before and cpu_after:
        host["host_cpu_s"] = round(cpu_after[0] - cpu_before[0], 1)
        host["idle_cpu_s"] = round(cpu_after[1] - cpu_before[1], 1)
    return {"gpus": gpus, "overlap": overlap, "wall_s": round(wall, 2), "exit_code": proc.returncode, "targets": targets,
            "built": sum(t["status"] == "built" for t in targets), "host": host,
            **({"error": doc["error"]} if "error" in doc else {})}


def _timings(folder: Path) -> dict | None:
    """The worker's phase timings of a built target (its build.json), for where a slow build spent its time."""
    try:
        return json.loads((folder / "build.json").read_text()).get("timings")
    except (OSError, ValueError):
        return None


def _cpu_times() -> tuple[float, float] | None:
    """(busy, idle) CPU seconds of the whole host since boot, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / tick, idle / tick


def machine() -> dict:
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=index,name,compute_cap,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except OSError:
        smi = []
    return {"gpus": smi, "python": sys.version.split()[0], "cpus": os.cpu_count()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--gpus-a", default="0", help="the baseline's GPUs (default 0)")
    ap.add_argument("--gpus-b", default="0,1", help="the multi-GPU run's GPUs (default 0,1)")
    ap.add_argument("--budget-s", type=float, default=500.0, help="skip the repeat of the baseline past this (default 500)")
    ap.add_argument("--order", default="a,b,a-off,a", help="runs: a (the baseline's GPUs), b (the multi-GPU run's), "
                    "a-off (a with AITUNE_GPU_OVERLAP=0); default a,b,a-off,a")
    ap.add_argument("--server", action="store_true", help="every run uses one persistent build server "
                    "(AITUNE_BUILD_SERVER), started before the first run and timed apart")
    args = ap.parse_args()
    started = time.perf_counter()
    results = {"machine": machine(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="gpu-multi-") as tmp:
        template = make_project(Path(tmp) / "template")
        if args.server:
            SERVER_ENV.update({"AITUNE_BUILD_SERVER": "600", "XDG_RUNTIME_DIR": tempfile.mkdtemp(prefix="rt", dir="/tmp")})
            env = {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
                   **SERVER_ENV}
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(template), "server", "start", "--json"],
                                 env=env, capture_output=True, text=True)
            results["server_start_s"] = round(time.perf_counter() - t0, 2)
            results["server_start"] = out.stdout.strip() or out.stderr[-1000:]
            print(f"build server start: {results['server_start_s']} s {results['server_start']}", flush=True)
        order = {"a": (args.gpus_a, True), "b": (args.gpus_b, True), "a-off": (args.gpus_a, False)}
        for gpus, overlap in (order[o] for o in args.order.split(",")):
            longest = max((r["wall_s"] for r in results["runs"]), default=0.0)
            if results["runs"] and time.perf_counter() - started + longest > args.budget_s:
                results["skipped"] = f"runs past the {args.budget_s:.0f} s budget"
                break
            run = build_cold(template, Path(tmp), gpus, overlap)
            results["runs"].append(run)
            print(f"--gpus {gpus} (overlap {'on' if overlap else 'off'}): {run['wall_s']:.1f} s, {run['built']}/8 built, "
                  f"exit {run['exit_code']}", flush=True)
            Path(args.out).write_text(json.dumps(results, indent=2))  # partial results survive a timeout
    complete = [r for r in results["runs"] if r["built"] == 8]  # a ratio of builds that skipped targets means nothing
    a = [r["wall_s"] for r in complete if r["gpus"] == args.gpus_a and r["overlap"]]
    b = [r["wall_s"] for r in complete if r["gpus"] == args.gpus_b]
    off = [r["wall_s"] for r in complete if not r["overlap"]]
    if a and off:
        results["overlap_speedup_1gpu"] = round(statistics.median(off) / statistics.median(a), 3)  # off / on, medians
        print(f"1 GPU, compile beside check: {results['overlap_speedup_1gpu']}x faster than without")
    if a and b:
        results["speedup"] = round(min(a) / b[0], 3)  # against the faster baseline run: the conservative ratio
        results["speedup_first_baseline"] = round(a[0] / b[0], 3)
        # Several rounds (--order a,b,b,a,a,b): medians of each side's builds, the ratio of those, and the median of
        # the ratios of the builds next to each other (a host that slows down for a while hits both sides of a pair).
        results["speedup_medians"] = round(statistics.median(a) / statistics.median(b), 3)
        runs = [r for r in results["runs"] if r["overlap"]]
        pairs = [(x, y) for x, y in zip(runs[::2], runs[1::2])
                 if {x["gpus"], y["gpus"]} == {args.gpus_a, args.gpus_b} and x["built"] == y["built"] == 8]
        ratios = [(x if x["gpus"] == args.gpus_a else y)["wall_s"] / (y if x["gpus"] == args.gpus_a else x)["wall_s"]
                  for x, y in pairs]
        if ratios:
            results["speedup_pairs"] = [round(r, 3) for r in ratios]
            results["speedup_pairs_median"] = round(statistics.median(ratios), 3)
        print(f"speed-up {args.gpus_b} vs {args.gpus_a}: {results['speedup']}x conservative, {results['speedup_medians']}x "
              f"medians, pairs {results.get('speedup_pairs')} (goal >= 1.8x)")
    if SERVER_ENV:
        subprocess.run([sys.executable, "-m", "aitune_build", "server", "stop"], env={**os.environ, **SERVER_ENV,
                       "PYTHONPATH": str(REPO)}, capture_output=True)
    results["all_built"] = all(r["built"] == 8 for r in results["runs"])  # a ratio of skipped builds means nothing
    results["total_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
