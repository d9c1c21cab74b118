"""Time to first inference of an unmodified ResNet-50 script: eager vs served from our cache (`aitune-build run`,
Torch-TensorRT AOT fp16) vs compiled at start (torch_tensorrt.compile in the process, as AITune's JIT tuning does at
every start); and steady-state latency of the served module vs aitune_build.load() of the same target.

    python benchmarks/gpu_serve.py --phase build   --project /tmp/aitune-serve --out serve-build.json
    python benchmarks/gpu_serve.py --phase measure --project /tmp/aitune-serve --out serve-measure.json

(`--phase all` does both; each phase fits one 10-minute GPU command.) Plain python: no pytest, no ray.

The script under test (app.py, written into the project) is what inference code looks like without us: torchvision's
resnet50(), random weights loaded from a file with load_state_dict, eval().cuda(), one batch-1 fp32 call. Time to
first inference = from just before the process is started to the first output being on the host (the script
prints time.time() then), so interpreter start, imports, weight loading and, for served, loading the artifact all
count. Runs of the three modes are interleaved (eager, served, compiled, eager, ...), medians reported.
Steady state: one process under `aitune-build run` times the served module and aitune_build.load() in alternating
blocks of 100 CUDA-synchronised batch-1 calls (fp32 input both; the served call also casts its fp16 output back to
fp32, as the eager module returns fp32); ratio = median over blocks of served/load (goal <= 1.02).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MANIFEST = textwrap.dedent("""
    [project]
    name = "serve-bench"

    [modules.resnet50]
    factory = "models:build"
    weights = "resnet50.pt"
    inputs = [{ name = "x", shape = [{ dim = "batch", min = 1, opt = 1, max = 8 }, 3, 224, 224] }]

    [backends.trt_fp16]
    kind = "torch_tensorrt_aot"
    compile_config = { enabled_precisions = ["float16"] }

    [targets.resnet50_trt]
    module = "resnet50"
    backend = "trt_fp16"
    serve = true
    check = { rtol = 0.05, atol = 0.01 }
""")

MODELS = "import torchvision\n\n\ndef build():\n    return torchvision.models.resnet50(weights=None)\n"

# The unmodified application. --compile: the compiled-at-start alternative (what a JIT tuner does at each start).
APP = textwrap.dedent("""
    import sys, time
    import torch, torchvision

    model = torchvision.models.resnet50(weights=None)
    model.load_state_dict(torch.load("resnet50.pt"))
    model.eval().cuda()
    x = torch.randn(1, 3, 224, 224, device="cuda")
    if "--compile" in sys.argv:
        import torch_tensorrt
        half = model.half()  # fp16 as our target: on torch_tensorrt >= 2.10 one casts the module (see README)
        inp = torch_tensorrt.Input(min_shape=(1, 3, 224, 224), opt_shape=(1, 3, 224, 224), max_shape=(8, 3, 224, 224),
                                   dtype=torch.float16)
        # torch_tensorrt.compile(half, inputs=[inp]) exports with the opt shape, and batch 1 specialises the axis;
        # so, as the build does, export with an example of batch 2 and compile that program for min/opt/max.
        ex = torch.randn(2, 3, 224, 224, device="cuda", dtype=torch.float16)
        batch = torch.export.Dim("batch", min=1, max=8)
        ep = torch.export.export(half, (ex,), dynamic_shapes=({0: batch},), strict=False)
        compiled = torch_tensorrt.dynamo.compile(ep, arg_inputs=[inp])
        run = lambda t: compiled(t.half()).float()
    else:
        run = model
    with torch.no_grad():
        y = run(x)
        y = y.cpu()
    print("FIRST", time.time(), float(y.sum()), flush=True)
""")

STEADY = textwrap.dedent("""
    import json, statistics, sys, time
    import torch, torchvision
    import aitune_build

    model = torchvision.models.resnet50(weights=None)
    model.load_state_dict(torch.load("resnet50.pt"))
    model.eval().cuda()
    loaded = aitune_build.load("resnet50_trt", manifest="aitune.toml")
    x = torch.randn(1, 3, 224, 224, device="cuda")

    def block(fn, n=100):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn(x)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n * 1e3

    with torch.no_grad():
        for _ in range(20):
            model(x); loaded(x)
        pairs = [(block(model), block(loaded)) for _ in range(int(sys.argv[2]))]
        eager = [block(lambda t: model.forward.__wrapped__(model, t)) for _ in range(3)]
    json.dump({"served_ms": statistics.median(s for s, _ in pairs), "load_ms": statistics.median(l for _, l in pairs),
               "served_vs_load": statistics.median(s / l for s, l in pairs), "blocks": len(pairs),
               "eager_ms": statistics.median(eager)}, open(sys.argv[1], "w"))
""")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AITUNE_")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def build_phase(project: Path, res: dict) -> None:
    import torch
    import torchvision

    if project.exists():
        import shutil

        shutil.rmtree(project)
    project.mkdir(parents=True)
    (project / "aitune.toml").write_text(MANIFEST)
    (project / "models.py").write_text(MODELS)
    (project / "app.py").write_text(APP)
    (project / "steady.py").write_text(STEADY)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), project / "resnet50.pt")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(project), "build", "--json"], env=_env(),
                          capture_output=True, text=True)
    res["build_s"] = time.perf_counter() - t0
    res["build"] = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {"stderr": proc.stderr[-2000:]}


def _first_inference(project: Path, mode: str) -> dict:
    cmd = [sys.executable, "app.py"]
    if mode == "served":
        cmd = [sys.executable, "-m", "aitune_build", "run", "--debug", "debug.json", "--"] + cmd
    if mode == "compiled":
        cmd.append("--compile")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=project, env=_env(), capture_output=True, text=True)
    t_exit = time.time()
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("FIRST ")), None)
    if proc.returncode != 0 or line is None:
        return {"error": proc.stderr[-1500:]}
    out = {"first_inference_s": float(line.split()[1]) - t0, "process_s": t_exit - t0, "checksum": float(line.split()[2])}
    if mode == "served":
        record = json.loads((project / "debug.json").read_text())
        out["debug"] = record["targets"]
        out["torch_tensorrt_imported"] = record.get("torch_tensorrt_imported")  # False: the runtime library alone
    return out


def measure_phase(project: Path, res: dict, repeats: int, compiled_repeats: int, blocks: int) -> None:
    runs: dict[str, list] = {"eager": [], "served": [], "compiled": []}
    for i in range(repeats):
        for mode in ("eager", "served", "compiled"):
            if mode == "compiled" and i >= compiled_repeats:
                continue
            r = _first_inference(project, mode)
            runs[mode].append(r)
            print(mode, json.dumps({k: v for k, v in r.items() if k != "debug"}), flush=True)
    res["runs"] = runs
    med = {m: statistics.median(r["first_inference_s"] for r in rs if "first_inference_s" in r) for m, rs in runs.items()
           if any("first_inference_s" in r for r in rs)}
    res["first_inference_median_s"] = med
    if "served" in med and "compiled" in med:
        res["compiled_vs_served"] = med["compiled"] / med["served"]  # goal >= 5
    if "served" in med and "eager" in med:
        res["served_vs_eager"] = med["served"] / med["eager"]
    out = project / "steady.json"
    proc = subprocess.run([sys.executable, "-m", "aitune_build", "run", "--debug", "steady-debug.json", "--", sys.executable,
                           "steady.py", str(out), str(blocks)], cwd=project, env=_env(), capture_output=True, text=True)
    res["steady"] = json.loads(out.read_text()) if out.exists() else {"error": proc.stderr[-1500:]}
    if (project / "steady-debug.json").exists():
        res["steady"]["debug"] = json.loads((project / "steady-debug.json").read_text())["targets"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["build", "measure", "all"], default="all")
    ap.add_argument("--project", default=str(Path(tempfile.gettempdir()) / "aitune-serve"))
    ap.add_argument("--out", default="gpu-serve.json")
    ap.add_argument("--repeats", type=int, default=5, help="first-inference runs of eager and served")
    ap.add_argument("--compiled-repeats", type=int, default=3, help="first-inference runs of compiled-at-start")
    ap.add_argument("--blocks", type=int, default=30, help="steady-state blocks of 100 calls each, per side")
    args = ap.parse_args()
    import torch
    import torch_tensorrt

    res: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "torch_tensorrt": torch_tensorrt.__version__,
                 "phase": args.phase, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    project = Path(args.project)
    t0 = time.perf_counter()
    if args.phase in ("build", "all"):
        build_phase(project, res)
    if args.phase in ("measure", "all"):
        measure_phase(project, res, args.repeats, args.compiled_repeats, args.blocks)
    res["total_s"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k not in ("runs", "build")}, indent=2))


if __name__ == "__main__":
    main()
