"""Warm workers and warm JIT targets on a GPU (issue 11). Plain python; about 6 minutes on an H100/H200.

    PYTHONPATH=. python benchmarks/gpu_warm.py --out gpu_warm.json [--project /tmp/aitune-warm] [--rounds 2]
        [--subprocess-baseline]

1. Cold build of 6 targets (ResNet-18 from torchvision with a dynamic batch axis, and a small transformer encoder;
   each as torch_tensorrt_aot fp16, torch_tensorrt_aot fp32 and export on cuda) through `aitune-build build`, vs the
   sum of hand-written export + compile + save times of the same 6 models measured in ONE warm process (imports and
   module construction not counted). Goal ≤ 1.3×. With --subprocess-baseline also the same cold build with
   `AITUNE_WORKERS=subprocess` (a fresh interpreter per target, the old way; adds ~2 min).
2. `aitune-build build -f rn18_aot32` (fresh aitune-build process) vs a hand-written fresh process (import torch +
   torch_tensorrt + torchvision, construct, export, compile, save), alternated --rounds times. Goal ≤ 1.1×.
3. torch_tensorrt_jit first call in a fresh process (after aitune_build.load(); empty Inductor cache): cold (no
   caches), engine cache only (what was stored before issue 11), engine cache + PyTorch compile caches (now).
   Goal: warm ≤ 25 % of cold. Alternated --rounds times.
Every section catches its own errors into the JSON, so one failure does not lose the others.
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
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k not in ("AITUNE_CACHE_DIR", "AITUNE_WORKERS")}
ENV["PYTHONPATH"] = str(REPO) + (os.pathsep + ENV["PYTHONPATH"] if ENV.get("PYTHONPATH") else "")

MODELS = {
    "models/__init__.py": "",
    "models/resnet.py": "import torchvision\n\n\ndef build():\n    return torchvision.models.resnet18(weights=None)\n",
    "models/encoder.py": '''
import torch
import torch.nn.functional as F


class Block(torch.nn.Module):
    def __init__(self, d=256, heads=4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.mlp(self.ln2(x))


class Encoder(torch.nn.Module):
    def __init__(self, layers=4):
        super().__init__()
        self.blocks = torch.nn.Sequential(*[Block() for _ in range(layers)])

    def forward(self, x):
        return self.blocks(x)


def build():
    return Encoder()
''',
}
MANIFEST = """
[project]
name = "warm"

[modules.rn18]
factory = "models.resnet:build"
inputs = [{ name = "x", shape = [{ dim = "batch", min = 1, opt = 4, max = 8 }, 3, 224, 224] }]

[modules.enc]
factory = "models.encoder:build"
inputs = [{ name = "x", shape = [4, 64, 256] }]

[backends.aot16]
kind = "torch_tensorrt_aot"
[backends.aot16.compile_config]
enabled_precisions = ["float16"]

[backends.aot32]
kind = "torch_tensorrt_aot"

[backends.exp]
kind = "export"
device = "cuda"

[backends.jit32]
kind = "torch_tensorrt_jit"
dynamic_shapes = false

[targets.rn18_aot16]
module = "rn18"
backend = "aot16"
check = { rtol = 0.05, atol = 0.01 }
[targets.rn18_aot32]
module = "rn18"
backend = "aot32"
check = { rtol = 0.01, atol = 0.001 }
[targets.rn18_export]
module = "rn18"
backend = "exp"
[targets.enc_aot16]
module = "enc"
backend = "aot16"
check = { rtol = 0.05, atol = 0.02 }
[targets.enc_aot32]
module = "enc"
backend = "aot32"
check = { rtol = 0.01, atol = 0.001 }
[targets.enc_export]
module = "enc"
backend = "exp"

[targets.rn18_jit32]
module = "rn18"
backend = "jit32"
check = { rtol = 0.01, atol = 0.001 }
"""
COLD = ["rn18_aot16", "rn18_aot32", "rn18_export", "enc_aot16", "enc_aot32", "enc_export"]

# The hand-written fresh process of one target: what a user writes without aitune-build (rn18, fp32, dynamic batch).
HAND_FRESH = """
import sys, time
t0 = time.perf_counter()
import torch, torch_tensorrt, torchvision
t_imp = time.perf_counter() - t0
torch.manual_seed(0)
m = torchvision.models.resnet18(weights=None).eval().cuda()
x = torch.randn(4, 3, 224, 224, device="cuda")
dyn = {"x": {0: torch.export.Dim("batch", min=1, max=8)}}
ep = torch.export.export(m, (), {"x": x}, dynamic_shapes=dyn, strict=False)
inp = {"x": torch_tensorrt.Input(min_shape=[1, 3, 224, 224], opt_shape=[4, 3, 224, 224], max_shape=[8, 3, 224, 224], dtype=torch.float32, name="x")}
trt = torch_tensorrt.dynamo.compile(ep, arg_inputs=[], kwarg_inputs=inp)
torch_tensorrt.save(trt, sys.argv[1], output_format="exported_program", arg_inputs=[], kwarg_inputs={"x": x}, dynamic_shapes=dyn, retrace=True)
print(t_imp)
"""
JIT_FIRST_CALL = """
import sys, time
import torch, aitune_build
fn = aitune_build.load("rn18_jit32", manifest=sys.argv[1])
x = torch.randn(4, 3, 224, 224, device="cuda")
t0 = time.perf_counter()
with torch.no_grad():
    fn(x)
torch.cuda.synchronize()
print(time.perf_counter() - t0)
"""


def write_project(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    for rel, text in MODELS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "aitune.toml").write_text(MANIFEST)


def cli(root: Path, *args: str, env: dict[str, str] | None = None) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(root), "build", "--json", *args],
                         capture_output=True, text=True, env=env or ENV)
    wall = time.perf_counter() - t0
    try:
        return wall, json.loads(out.stdout)
    except ValueError:
        raise RuntimeError(f"aitune-build failed: {out.stdout[-2000:]} {out.stderr[-2000:]}") from None


def timings(root: Path, target: str) -> dict:
    return json.loads((root / "build" / target / "build.json").read_text()).get("timings", {})

# The same first call under cProfile: where a JIT target's first call in a fresh process spends its time.
JIT_PROFILE = """
import cProfile, io, pstats, sys, time
import torch, aitune_build
t0 = time.perf_counter()
fn = aitune_build.load("rn18_jit32", manifest=sys.argv[1])
load_s = time.perf_counter() - t0
x = torch.randn(4, 3, 224, 224, device="cuda")
prof = cProfile.Profile()
t0 = time.perf_counter()
prof.enable()
with torch.no_grad():
    fn(x)
torch.cuda.synchronize()
prof.disable()
call_s = time.perf_counter() - t0
for order in ("cumulative", "tottime"):
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats(order).print_stats(45)
    print(out.getvalue())
print("load_s", load_s, "first_call_profiled_s", call_s)
"""


def hand_written_warm(root: Path, retrace: bool = True) -> dict:
    """Export + compile + save of the six targets' models in one process that has imported everything already.
    retrace: torch_tensorrt.save's default (True), as a user writes it; False as aitune-build saves since session 7."""
    import torch
    import torch_tensorrt

    sys.path.insert(0, str(root))
    from models import encoder, resnet  # type: ignore[import-not-found]

    out: dict[str, float] = {}
    scratch = Path(tempfile.mkdtemp())
    for name in COLD:
        torch.manual_seed(0)
        rn = name.startswith("rn18")
        m = (resnet.build() if rn else encoder.build()).eval().cuda()
        x = torch.randn(4, 3, 224, 224, device="cuda") if rn else torch.randn(4, 64, 256, device="cuda")
        dyn = {"x": {0: torch.export.Dim("batch", min=1, max=8)}} if rn else None
        half = name.endswith("aot16")
        if half:
            m, x = m.half(), x.half()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ep = torch.export.export(m, (), {"x": x}, dynamic_shapes=dyn, strict=False)
        if name.endswith("export"):
            torch.export.save(ep, str(scratch / f"{name}.pt2"))
        else:
            shape = list(x.shape)
            mins, maxs = ([1] + shape[1:], [8] + shape[1:]) if rn else (shape, shape)
            inp = {"x": torch_tensorrt.Input(min_shape=mins, opt_shape=shape, max_shape=maxs, dtype=x.dtype, name="x")}
            trt = torch_tensorrt.dynamo.compile(ep, arg_inputs=[], kwarg_inputs=inp)
            if retrace:
                torch_tensorrt.save(trt, str(scratch / f"{name}.pt2"), output_format="exported_program", arg_inputs=[],
                                    kwarg_inputs={"x": x}, dynamic_shapes=dyn, retrace=True)
            else:
                torch_tensorrt.save(trt, str(scratch / f"{name}.pt2"), output_format="exported_program",
                                    dynamic_shapes=dyn, retrace=False)
        torch.cuda.synchronize()
        out[name] = time.perf_counter() - t0
        del m
        torch._dynamo.reset()
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def section(res: dict, name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        res[name] = fn()
    except Exception as e:
        res[name] = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
    print(f"[{time.perf_counter() - t0:.0f} s] {name}: {json.dumps(res[name])[:1500]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--project", default=str(Path(tempfile.gettempdir()) / "aitune-warm"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--subprocess-baseline", action="store_true")
    ap.add_argument("--overlap-ab", type=int, default=0, metavar="N",
                    help="only the cold build, N rounds alternating AITUNE_GPU_OVERLAP=1 and 0 (what compiling beside a "
                         "check is worth); nothing else is measured")
    ap.add_argument("--server", action="store_true",
                    help="builds use a persistent build server (AITUNE_BUILD_SERVER), started once before the cold "
                         "build (its start is timed apart): cold cache, warm server")
    ap.add_argument("--skip-jit", action="store_true", help="leave out the JIT first-call section")
    ap.add_argument("--jit-profile", action="store_true",
                    help="only the JIT target: build it, then profile its first call in a fresh process, warm and cold")
    args = ap.parse_args()
    root = Path(args.project)
    res: dict = {}
    t_all = time.perf_counter()
    if args.server:
        ENV["AITUNE_BUILD_SERVER"] = "600"
        ENV["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # this run's own servers

    def server_start() -> None:
        if args.server and "server_start_s" not in res:
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(root), "server", "start", "--json"],
                                 capture_output=True, text=True, env=ENV)
            res["server_start_s"] = time.perf_counter() - t0
            res["server_start"] = out.stdout.strip() or out.stderr[-1000:]
            print(f"build server start: {res['server_start_s']:.1f} s {res['server_start']}", flush=True)

    def info() -> dict:
        import torch
        import torch_tensorrt

        return {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "torch_tensorrt": torch_tensorrt.__version__}

    section(res, "machine", info)

    if args.overlap_ab:
        def overlap_ab() -> dict:
            got: dict = {"on": [], "off": []}
            for _ in range(args.overlap_ab):
                for side, value in (("on", "1"), ("off", "0")):
                    write_project(root)
                    wall, data = cli(root, *COLD, env={**ENV, "AITUNE_GPU_OVERLAP": value})
                    got[side].append({"wall_s": wall, "built": sum(t["status"] == "built" for t in data["targets"])})
            walls = {side: statistics.median(r["wall_s"] for r in runs) for side, runs in got.items()}
            got["off_over_on"] = walls["off"] / walls["on"]
            return got

        section(res, "cold_build_overlap_ab", overlap_ab)
        res["total_s"] = time.perf_counter() - t_all
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        return

    if args.jit_profile:
        def jit_profile() -> dict:
            write_project(root)
            wall, data = cli(root, "rn18_jit32")
            folder = root / "build/rn18_jit32"
            saved = Path(tempfile.mkdtemp()) / "rn18_jit32"
            shutil.copytree(folder, saved)
            got: dict = {"build_s": wall, "status": data["targets"][-1]["status"]}
            for variant in ("warm", "cold"):
                shutil.rmtree(folder)
                shutil.copytree(saved, folder)
                if variant == "cold":
                    (folder / "compile_cache.bin").unlink(missing_ok=True)
                    shutil.rmtree(folder / "engine_cache", ignore_errors=True)
                    (folder / "engine_cache").mkdir()
                ind = Path(tempfile.mkdtemp())
                out = subprocess.run([sys.executable, "-c", JIT_PROFILE, str(root / "aitune.toml")], capture_output=True,
                                     text=True, env={**ENV, "TORCHINDUCTOR_CACHE_DIR": str(ind)})
                got[variant] = {"rc": out.returncode, "stdout": out.stdout[-24000:], "stderr": out.stderr[-3000:]}
            return got

        section(res, "jit_profile", jit_profile)
        res["total_s"] = time.perf_counter() - t_all
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        return

    def cold() -> dict:
        got: dict = {}
        modes = (["subprocess"] if args.subprocess_baseline else []) + ["fork"]
        for mode in modes:
            write_project(root)
            if mode == "fork":
                server_start()
            wall, data = cli(root, *COLD, env={**ENV, "AITUNE_WORKERS": mode})
            got[mode] = {"wall_s": wall, "statuses": {t["name"]: t["status"] for t in data["targets"]},
                         "reasons": {t["name"]: t["reason"][:300] for t in data["targets"] if t["status"] != "built"},
                         "timings": {t: timings(root, t) for t in COLD if (root / "build" / t / "build.json").exists()},
                         "worker": {t: " | ".join((root / "build" / t / "build.log").read_text().splitlines()[:2])[:400]
                                    for t in COLD if (root / "build" / t / "build.log").exists()}}
        return got

    section(res, "cold_build", cold)
    section(res, "hand_written_warm_s", lambda: hand_written_warm(root))
    section(res, "hand_written_warm_no_retrace_s", lambda: hand_written_warm(root, retrace=False))
    for side, key in (("cold_build_vs_hand_written_warm", "hand_written_warm_s"),
                      ("cold_build_vs_hand_written_warm_no_retrace", "hand_written_warm_no_retrace_s")):
        try:
            ours = res["cold_build"]["fork"]["wall_s"]
            hand = sum(res[key].values())
            res[side] = {"ours_s": ours, "hand_sum_s": hand, "ratio": ours / hand, "goal": 1.3}
        except (KeyError, TypeError, AttributeError):
            pass

    def rebuild() -> dict:
        ours, hand, imports = [], [], []
        scratch = Path(tempfile.mkdtemp())
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", HAND_FRESH, str(scratch / "rn18.pt2")], capture_output=True, text=True, env=ENV)
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-2000:])
            hand.append(time.perf_counter() - t0)
            imports.append(float(out.stdout.split()[-1]))
            ours.append(cli(root, "-f", "rn18_aot32")[0])
        return {"aitune_build_f_s": ours, "hand_fresh_s": hand, "hand_import_s": imports,
                "ratio": statistics.median(ours) / statistics.median(hand), "goal": 1.1, "last_timings": timings(root, "rn18_aot32")}

    section(res, "one_target_rebuild", rebuild)

    def jit() -> dict:
        wall, data = cli(root, "rn18_jit32")
        folder = root / "build/rn18_jit32"
        saved = Path(tempfile.mkdtemp()) / "rn18_jit32"
        shutil.copytree(folder, saved)
        got: dict = {"build_s": wall, "status": data["targets"][-1]["status"], "record": json.loads((folder / "build.json").read_text()).get("record"),
                     "cold_s": [], "engine_cache_only_s": [], "warm_s": []}
        for r in range(args.rounds):
            for variant in ("cold_s", "engine_cache_only_s", "warm_s"):
                shutil.rmtree(folder)
                shutil.copytree(saved, folder)
                if variant != "warm_s":
                    (folder / "compile_cache.bin").unlink(missing_ok=True)
                if variant == "cold_s":
                    shutil.rmtree(folder / "engine_cache", ignore_errors=True)
                    (folder / "engine_cache").mkdir()
                ind = Path(tempfile.mkdtemp())  # an empty Inductor cache: nothing left from earlier runs
                out = subprocess.run([sys.executable, "-c", JIT_FIRST_CALL, str(root / "aitune.toml")], capture_output=True,
                                     text=True, env={**ENV, "TORCHINDUCTOR_CACHE_DIR": str(ind)})
                if out.returncode != 0:
                    raise RuntimeError(out.stderr[-2000:])
                got[variant].append(float(out.stdout.split()[-1]))
                if "warm start failed" in out.stderr:  # load() fell back to a cold compile: say so beside the time
                    got.setdefault("warm_start_failed", []).append({variant: out.stderr[-1500:]})
                shutil.rmtree(ind, ignore_errors=True)
        shutil.rmtree(folder)
        shutil.copytree(saved, folder)
        cold = statistics.median(got["cold_s"])
        got["warm_over_cold"] = statistics.median(got["warm_s"]) / cold
        got["engine_cache_only_over_cold"] = statistics.median(got["engine_cache_only_s"]) / cold
        return got

    if not args.skip_jit:
        section(res, "jit_first_call", jit)
    if args.server:
        subprocess.run([sys.executable, "-m", "aitune_build", "server", "stop"], env=ENV, capture_output=True)
    res["total_s"] = time.perf_counter() - t_all
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "cold_build"}, indent=2))


if __name__ == "__main__":
    main()
