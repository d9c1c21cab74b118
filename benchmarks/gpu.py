"""ResNet-50 (torchvision, random weights) through aitune-build's Torch-TensorRT backends, on a GPU.

    python benchmarks/gpu.py --phase build   --project /tmp/aitune-bench --out build.json
    python benchmarks/gpu.py --phase measure --project /tmp/aitune-bench --out measure.json [--combos float16:8 ...]

Two phases, so each fits one GPU-machine command: `build` builds the 8 targets through the CLI and times the first
build, the no-op rebuild (median of 5 whole-process runs), and a cache hit (restore into a clean output folder) vs
a forced recompile. `measure` times, for batch 1 and 8, fp16 and fp32: eager, our torch_tensorrt_aot artifact
(loaded from disk), torch_tensorrt_jit (loaded warm from its stored engine cache; cold first call from build.json),
a hand-written torch_tensorrt.compile of the same model (the baseline our AOT artifact should match) and
torch.compile (inductor). Latencies are medians of 200 CUDA-event-timed calls after 10 warm-up calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMBOS = [("float16", 1), ("float16", 8), ("float32", 1), ("float32", 8)]


def manifest() -> str:
    parts = ['[project]\nname = "bench"\n']
    for batch in (1, 8):
        parts.append(f'[modules.rn50_b{batch}]\nfactory = "models.resnet:build"\ninputs = [{{ name = "x", shape = [{batch}, 3, 224, 224] }}]\n')
    for prec in ("float16", "float32"):
        tag = prec[5:]
        parts.append(f'[backends.aot{tag}]\nkind = "torch_tensorrt_aot"\n[backends.aot{tag}.compile_config]\nenabled_precisions = ["{prec}"]\n')
        parts.append(f'[backends.jit{tag}]\nkind = "torch_tensorrt_jit"\ndynamic_shapes = false\n[backends.jit{tag}.compile_config]\nenabled_precisions = ["{prec}"]\n')
    for prec, batch in COMBOS:
        tag = prec[5:]
        for kind in ("aot", "jit"):
            # fp16 vs fp32 eager on random weights: ResNet-50's fp16 error is a few 1e-3 of the output scale
            parts.append(f'[targets.{kind}{tag}_b{batch}]\nmodule = "rn50_b{batch}"\nbackend = "{kind}{tag}"\ncheck = {{ rtol = 0.05, atol = 0.01 }}\n')
    return "\n".join(parts)


def cli(project: Path, *args: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(project), *args, "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    try:
        return wall, json.loads(out.stdout)
    except ValueError:
        print(out.stdout, out.stderr, file=sys.stderr)
        raise


def latency_ms(fn, x, iters: int = 200) -> float:
    import torch

    with torch.no_grad():
        for _ in range(10):
            fn(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(x)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["build", "measure"], required=True)
    ap.add_argument("--project", default=str(Path(tempfile.gettempdir()) / "aitune-bench"))
    ap.add_argument("--out", default="gpu-bench.json")
    ap.add_argument("--combos", nargs="*", default=[f"{p}:{b}" for p, b in COMBOS], help="precision:batch pairs to measure")
    args = ap.parse_args()
    import torch
    import torch_tensorrt

    res: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "torch_tensorrt": torch_tensorrt.__version__,
                 "tensorrt_rtx": bool(getattr(torch_tensorrt.ENABLED_FEATURES, "tensorrt_rtx", False)), "phase": args.phase}
    project = Path(args.project)
    if args.phase == "build":
        build_phase(project, res, args.out)
    else:
        combos = [(p, int(b)) for p, b in (c.split(":") for c in args.combos)]
        measure_phase(project, res, args.out, combos)


def build_phase(project: Path, res: dict, out: str) -> None:
    if project.exists():
        import shutil

        shutil.rmtree(project)
    (project / "models").mkdir(parents=True)
    (project / "models/__init__.py").write_text("")
    (project / "models/resnet.py").write_text("import torchvision\n\n\ndef build():\n    return torchvision.models.resnet50(weights=None)\n")
    (project / "aitune.toml").write_text(manifest())

    wall, data = cli(project, "build")
    res["first_build_s"] = wall
    res["targets"] = {t["name"]: {"status": t["status"], "seconds": t["seconds"], "reason": t["reason"][:300]} for t in data["targets"]}
    noop = [cli(project, "build")[0] for _ in range(5)]
    res["noop_build_s_median"] = statistics.median(noop)
    # cache hit (clean output folder, restore from the store) vs forced recompile, for the fp16 b8 AOT target
    subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(project), "clean", "aot16_b8"], capture_output=True)
    res["cache_hit_s"] = cli(project, "build", "aot16_b8")[0]
    res["recompile_s"] = cli(project, "build", "-f", "aot16_b8")[0]
    Path(out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


def measure_phase(project: Path, res: dict, out: str, combos: list[tuple[str, int]]) -> None:
    import torch
    import torch_tensorrt
    import torchvision

    import aitune_build

    res["rows"] = {}
    t_start = time.perf_counter()
    manifest_path = str(project / "aitune.toml")
    for prec, batch in combos:
        tag = prec[5:]
        dtype = getattr(torch, prec)
        row: dict = {}
        x32 = torch.randn(batch, 3, 224, 224, device="cuda")
        torch.manual_seed(0)
        eager = torchvision.models.resnet50(weights=None).eval().cuda().to(dtype)
        row["eager_ms"] = latency_ms(eager, x32.to(dtype))
        t0 = time.perf_counter()
        aot = aitune_build.load(f"aot{tag}_b{batch}", manifest=manifest_path)
        row["aot_load_s"] = time.perf_counter() - t0
        row["aot_ms"] = latency_ms(aot, x32.to(dtype))  # input in the engine's dtype, as the hand-written one gets it
        row["aot_fp32_input_ms"] = latency_ms(aot, x32)  # our loader casts a float32 input: what a caller sees
        # the same artifact through torch's ExportedProgram.module() wrapper (what aitune-build used before ProgramCall)
        wrapped = torch_tensorrt.load(str(project / f"build/aot{tag}_b{batch}/model.pt2")).module()
        row["aot_module_wrapper_ms"] = latency_ms(lambda t: wrapped(x=t), x32.to(dtype))
        rec = json.loads((project / f"build/aot{tag}_b{batch}/build.json").read_text())
        row["aot_build_s"] = rec["timings"]["build"]
        row["aot_max_rel_err"] = rec["check"]["max_rel_err"]
        t0 = time.perf_counter()
        jit = aitune_build.load(f"jit{tag}_b{batch}", manifest=manifest_path)
        with torch.no_grad():
            jit(x32)
        torch.cuda.synchronize()
        row["jit_warm_first_call_s"] = time.perf_counter() - t0
        jrec = json.loads((project / f"build/jit{tag}_b{batch}/build.json").read_text())
        row["jit_cold_first_call_s"] = jrec["timings"]["first_call"]
        row["jit_ms"] = latency_ms(jit, x32)
        # The hand-written baseline: what a user writes without us (the half model for fp16, as on 2.10+ one must).
        t0 = time.perf_counter()
        hand = torch_tensorrt.compile(eager, ir="dynamo", inputs=[x32.to(dtype)])
        torch.cuda.synchronize()
        row["hand_compile_s"] = time.perf_counter() - t0
        # our artifact and the hand-written module, alternating in 5 rounds so a noisy moment hits both alike
        rounds = [(latency_ms(aot, x32.to(dtype)), latency_ms(hand, x32.to(dtype))) for _ in range(5)]
        row["aot_ms"] = statistics.median(a for a, _ in rounds)
        row["hand_ms"] = statistics.median(h for _, h in rounds)
        row["aot_vs_hand"] = statistics.median(a / h for a, h in rounds)  # goal: <= 1.05
        del hand
        torch._dynamo.reset()
        ind = torch.compile(eager)
        t0 = time.perf_counter()
        with torch.no_grad():
            ind(x32.to(dtype))
        torch.cuda.synchronize()
        row["inductor_compile_s"] = time.perf_counter() - t0
        row["inductor_ms"] = latency_ms(ind, x32.to(dtype))
        res["rows"][f"{prec} b{batch}"] = row
        print(prec, batch, json.dumps(row), flush=True)
        Path(out).write_text(json.dumps(res, indent=2))
        del ind, aot, jit
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    res["total_s"] = time.perf_counter() - t_start
    Path(out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
