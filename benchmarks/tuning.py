"""How good and how costly tuned targets' selections are (issue 14).

    python benchmarks/tuning.py --device cpu  --out tuning-cpu.json              # CPU: an MLP and a small CNN
    python benchmarks/tuning.py --device cuda --model cnn     --out cnn.json     # GPU: ResNet-18 ...
    python benchmarks/tuning.py --device cuda --model encoder --out enc.json     # ... and a transformer encoder

For each model, in a fresh project and cache (plain python, no pytest; every build goes through the CLI):
1. first build: builds the candidates and measures them (time per candidate from selection.json);
2. unchanged second build: its wall time, and whether anything was measured (selection.json byte-identical);
3. `--repeats` fresh selections (`build --retune`: candidates cached, measured anew): the winners;
4. an independent measurement afterwards: the same measuring process with no early stop, run in
   `--ref-processes` separate processes (each every candidate for --ref-seconds / that many, all interleaved),
   combined as a selection combines its processes (median of the per-process medians). Quality = the independent
   latency of each selection's winner / the independent best latency (goal <= 1.05); consistency = how many
   selections picked the most frequent winner (goal >= 9 of 10 where the independent top two differ by >= 10 %).
Results: JSON to --out, a summary on stdout.
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

MODELS = {
    "mlp": ("models/mlp.py", textwrap.dedent("""
        import torch
        from torch import nn


        def build():
            return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        """), "input", '[{ dim = "batch", min = 1, opt = 8, max = 32 }, 64]'),
    "smallcnn": ("models/smallcnn.py", textwrap.dedent("""
        from torch import nn


        def build():
            return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
        """), "input", '[{ dim = "batch", min = 1, opt = 8, max = 8 }, 3, 32, 32]'),
    "cnn": ("models/cnn.py", "import torchvision\n\n\ndef build():\n    return torchvision.models.resnet18(weights=None)\n",
            "x", '[{ dim = "batch", min = 1, opt = 8, max = 8 }, 3, 224, 224]'),
    "encoder": ("models/encoder.py", textwrap.dedent("""
        import torch
        from torch import nn


        class Block(nn.Module):
            def __init__(self, d, heads):
                super().__init__()
                self.heads = heads
                self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
                self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
                self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

            def forward(self, x):
                b, s, d = x.shape
                q, k, v = self.qkv(self.n1(x)).reshape(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
                a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                x = x + self.out(a.transpose(1, 2).reshape(b, s, d))
                return x + self.mlp(self.n2(x))


        def build():
            return nn.Sequential(*[Block(256, 4) for _ in range(4)])
        """), "input", '[{ dim = "batch", min = 1, opt = 8, max = 8 }, 128, 256]'),
}

BACKENDS = {
    "cpu": '[backends.export]\nkind = "export"\n[backends.eager]\nkind = "eager"\n[backends.inductor]\nkind = "inductor_jit"\n',
    "cuda": ('[backends.trt_fp16]\nkind = "torch_tensorrt_aot"\n[backends.trt_fp16.compile_config]\nenabled_precisions = ["float16"]\n'
             '[backends.trt_fp32]\nkind = "torch_tensorrt_aot"\n[backends.inductor_gpu]\nkind = "inductor_jit"\ndevice = "cuda"\n'
             '[backends.eager_gpu]\nkind = "eager"\ndevice = "cuda"\n'),
}
CANDIDATES = {"cpu": ["export", "eager", "inductor"], "cuda": ["trt_fp16", "trt_fp32", "inductor_gpu", "eager_gpu"]}


def project(workdir: Path, model: str, device: str) -> Path:
    rel, source, input_name, shape = MODELS[model]
    root = workdir / model
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "models/__init__.py").write_text("")
    (root / rel).write_text(source)
    check = "check = { rtol = 0.05, atol = 0.01 }\n" if device == "cuda" else ""  # random-weight fp16 (benchmarks/gpu.py)
    (root / "aitune.toml").write_text(
        f'[project]\nname = "bench"\n[modules.m]\nfactory = "models.{model}:build"\ninputs = [{{ name = "{input_name}", shape = {shape} }}]\n'
        + BACKENDS[device] + f'[targets.t]\nmodule = "m"\ncandidates = {json.dumps(CANDIDATES[device])}\nbatch = [1, 8]\n' + check)
    return root


def cli(root: Path, *args: str) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    env.pop("AITUNE_CACHE_DIR", None)
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(root), *args, "--json"], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    try:
        return wall, json.loads(run.stdout)
    except ValueError:
        sys.exit(f"aitune-build {' '.join(args)} failed:\n{run.stdout}\n{run.stderr}")


def selection(root: Path) -> dict:
    return json.loads((root / "build/t/selection.json").read_text())


def independent(root: Path, backends: list[str], cap_s: float, processes: int) -> dict:
    """The measuring process of aitune_build.tune without early stop, run `processes` times (a process's OpenMP
    regime moves all its latencies, so one process is no reference), each timing every candidate for
    cap_s / processes seconds; combined as a selection combines its processes (median of per-process medians)."""
    sys.path.insert(0, str(ROOT))
    from aitune_build import tune

    settings = {**tune.SETTINGS, "stable_rounds": 10 ** 6, "cap_s": cap_s / processes}
    sel = selection(root)
    device = {c["backend"]: c["device"] for c in sel["candidates"]}
    job = {"manifest": str(root / "aitune.toml"), "target": "t", "batch": sel["batch"], "dynamic_batch": True,
           "candidates": [{"id": b, "target": f"t@{b}", "device": device[b]} for b in backends],
           "baselines": [], "strategy": "min_latency", "budget_ms": None, "min_speedup": None, "settings": settings}
    env = {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    results = []
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "measure.log", "ab") as log:
        for _ in range(processes):
            got = tune.run_measuring_process(job, Path(tmp), env, log)
            if got.get("failed"):
                sys.exit(f"independent measurement failed:\n{(Path(tmp) / 'measure.log').read_text()}")
            results.append(got)
    return tune.combine(results)


def bench_model(workdir: Path, model: str, device: str, repeats: int, ref_seconds: float, ref_processes: int,
                deadline: float) -> dict:
    root = project(workdir, model, device)
    out: dict = {"model": model}
    wall, data = cli(root, "build")
    assert data["targets"][0]["status"] == "built", data
    first = selection(root)
    out["first_build_s"] = round(wall, 2)
    out["candidates"] = {c["backend"]: {"build": c["build"], "rejected": c["rejected"], "measure_s": c["measure_s"],
                                        "warmup_s": c["warmup_s"],
                                        "latency_ms": {b: s["median"] for b, s in c["latency_ms"].items()}}
                         for c in first["candidates"]}
    measured = [c for c in first["candidates"] if c["measure_s"] is not None]
    out["measure_s_per_candidate"] = {"max": max(c["measure_s"] for c in measured),
                                      "median": statistics.median(c["measure_s"] for c in measured)}
    out["warmup_s_per_candidate_max"] = max(c["warmup_s"] for c in measured)

    before = (root / "build/t/selection.json").read_bytes()
    walls = []
    for _ in range(3):
        wall, data = cli(root, "build")
        walls.append(wall)
        assert data["targets"][0]["status"] == "cached"
    out["second_build"] = {"median_s": round(statistics.median(walls), 3),
                           "measured": (root / "build/t/selection.json").read_bytes() != before}

    winners, per_run = [], []
    for _ in range(repeats):
        if time.perf_counter() > deadline:
            break  # keep one GPU-machine command under its time limit: fewer selections, reported as such
        _, data = cli(root, "build", "--retune")
        sel = selection(root)
        winners.append(sel["winner"])
        per_run.append({"winner": sel["winner"], "rounds": sel["rounds"], "stable": sel["stable"],
                        "measure_seconds": sel["measure_seconds"], "processes": len(sel.get("processes", [])) or 1,
                        "process_latency_ms_b1": {c["backend"]: c["latency_ms"].get("1", {}).get("process_medians")
                                                  for c in sel["candidates"]},
                        "latency_ms_b1": {c["backend"]: c["latency_ms"].get("1", {}).get("median") for c in sel["candidates"]}})
    out["selections"] = per_run
    usable = [b for b, c in out["candidates"].items() if c["latency_ms"]]
    ref = independent(root, usable, ref_seconds, ref_processes)
    ref_ok = {b: e for b, e in ref["entries"].items() if not e.get("error")}
    ref_lat = {b: e["batches"]["1"]["median"] for b, e in ref_ok.items()}
    ranked = sorted(ref_lat, key=ref_lat.get)
    best = ranked[0]
    out["independent"] = {"latency_ms_b1": ref_lat, "rounds": ref["rounds"], "best": best, "processes": ref_processes,
                          "process_latency_ms_b1": {b: e["batches"]["1"]["process_medians"] for b, e in ref_ok.items()},
                          "top_two_gap": round(ref_lat[ranked[1]] / ref_lat[best] - 1, 4) if len(ranked) > 1 else None}
    every = [first["winner"], *winners]  # the first build's selection and each --retune: all measured afresh
    quality = [ref_lat[w] / ref_lat[best] for w in every]
    mode = max(set(every), key=every.count)
    out["quality"] = {"median": round(statistics.median(quality), 4), "worst": round(max(quality), 4)}
    out["consistency"] = {"most_frequent": mode, "count": every.count(mode), "of": len(every),
                          "same_as_independent_best": every.count(best), "retunes": len(winners)}
    return out


def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    try:
        import torch

        info["torch"] = torch.__version__
        if device == "cuda":
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    sys.path.insert(0, str(ROOT))
    from aitune_build.tune import cpu_model

    info["cpu"] = cpu_model()
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", action="append", choices=sorted(MODELS), help="default: mlp, smallcnn (cpu); cnn, encoder (cuda)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--ref-seconds", type=float, default=10.0,
                    help="independent measurement: seconds per candidate, all its processes together")
    ap.add_argument("--ref-processes", type=int, default=None,
                    help="independent measurement: separate measuring processes (default: 5 on cpu, 3 on cuda)")
    ap.add_argument("--workdir", help="default: a temporary folder")
    ap.add_argument("--budget-s", type=float, default=400.0, help="start no new --retune selection after this many seconds")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    models = args.model or (["mlp", "smallcnn"] if args.device == "cpu" else ["cnn", "encoder"])
    t0 = time.perf_counter()
    ref_processes = args.ref_processes if args.ref_processes is not None else (5 if args.device == "cpu" else 3)
    if ref_processes < 1:
        sys.exit("--ref-processes: must be at least 1")
    results = {"device": args.device, "machine": machine(args.device), "repeats": args.repeats,
               "ref_processes": ref_processes, "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        for model in models:
            deadline = t0 + args.budget_s * (len(results["models"]) + 1) / len(models)
            r = bench_model(workdir, model, args.device, args.repeats, args.ref_seconds, ref_processes, deadline)
            results["models"].append(r)
            print(f"{model}: winners {r['consistency']['count']}/{r['consistency']['of']} {r['consistency']['most_frequent']} "
                  f"(independent best {r['independent']['best']}, top-two gap {r['independent']['top_two_gap']}); "
                  f"quality median {r['quality']['median']} worst {r['quality']['worst']}; measuring per candidate "
                  f"max {r['measure_s_per_candidate']['max']:.2f}s; second build {r['second_build']['median_s']}s "
                  f"measured={r['second_build']['measured']}", flush=True)
            Path(args.out).write_text(json.dumps(results, indent=2))
    results["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
