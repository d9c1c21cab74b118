"""Warm workers and warm JIT targets on the CPU, each against its baseline, interleaved.

    python benchmarks/warm_cpu.py [--targets 100] [--rounds 2] [--single-rounds 5] [--jit-rounds 3] [--server]
                                  [--skip-cold] [--skip-jit] [--out FILE.json]

1. Cold build of N tiny `export` targets with `-j 2`: warm workers (fork server) vs `AITUNE_WORKERS=subprocess` (a
   fresh interpreter per target, the old way). Each round builds a fresh copy of the project with an empty cache.
2. One export target, `build -f` in a fresh `aitune-build` process vs a hand-written fresh
   `python -c "import torch; torch.export.export(...); torch.export.save(...)"` of the same module; with --server
   also `build -f` with a persistent build server (AITUNE_BUILD_SERVER) started once before the rounds.
3. inductor_jit first call in a fresh process (`aitune_build.load()` + one call) with an empty Inductor cache:
   with the stored compile caches (warm) vs the same target with compile_cache.bin removed (cold).
Medians; rounds alternate baseline and ours so a noisy moment hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "AITUNE_CACHE_DIR", "AITUNE_WORKERS")}
ENV["PYTHONPATH"] = str(REPO) + (os.pathsep + ENV["PYTHONPATH"] if ENV.get("PYTHONPATH") else "")
LIN = "import torch\n\n\ndef build(width=4):\n    return torch.nn.Linear(width, 2)\n"
SMALL = "import torch\n\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))\n"
HAND = """
import torch, sys
sys.path.insert(0, sys.argv[1])
from models.lin import build
torch.manual_seed(0)
m = build().eval()
ep = torch.export.export(m, (), {"input": torch.randn(2, 4)})
torch.export.save(ep, sys.argv[2])
"""
FIRST_CALL = """
import sys, time
t0 = time.perf_counter()
import torch, aitune_build
fn = aitune_build.load("small_jit", manifest=sys.argv[1])
t1 = time.perf_counter()
fn(torch.randn(4, 8))
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def project(root: Path, n: int) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "models/__init__.py").write_text("")
    (root / "models/lin.py").write_text(LIN)
    (root / "models/small.py").write_text(SMALL)
    lines = ['[project]\nname = "warm"\n', '[backends.exp]\nkind = "export"\n', '[backends.jit]\nkind = "inductor_jit"\n',
             '[modules.lin]\nfactory = "models.lin:build"\ninputs = [{ name = "input", shape = [2, 4] }]\n',
             '[modules.small]\nfactory = "models.small:build"\ninputs = [{ name = "input", shape = [4, 8] }]\n',
             '[targets.small_jit]\nmodule = "small"\nbackend = "jit"\n']
    for i in range(n):  # distinct check seeds: distinct keys, so each target really builds
        lines.append(f'[targets.t{i}]\nmodule = "lin"\nbackend = "exp"\ncheck = {{ seed = {i} }}\n')
    (root / "aitune.toml").write_text("\n".join(lines))
    return root


def timed(cmd: list[str], env: dict[str, str] | None = None, **kw: object) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env or ENV, **kw)
    return time.perf_counter() - t0


def aitune(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "aitune_build", "-C", str(root), "build", *args]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--single-rounds", type=int, default=5)
    ap.add_argument("--jit-rounds", type=int, default=3)
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--skip-jit", action="store_true")
    ap.add_argument("--server", action="store_true",
                    help="also time `build -f` with a persistent build server (AITUNE_BUILD_SERVER), started once "
                         "before the rounds: the edit-rebuild loop's second and later builds")
    ap.add_argument("--out")
    args = ap.parse_args()
    res: dict[str, object] = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
                                         f"Python {platform.python_version()}", "targets": args.targets}
    print(res["machine"], flush=True)
    base = Path(tempfile.mkdtemp())
    targets = [f"t{i}" for i in range(args.targets)]

    # 1. cold build of N export targets, -j 2
    if not args.skip_cold:
        ours, plain = [], []
        for r in range(args.rounds):
            for mode, into in (("subprocess", plain), ("fork", ours)):
                root = project(base / f"cold-{mode}-{r}", args.targets)
                env = {**ENV, "AITUNE_WORKERS": mode}
                into.append(timed(aitune(root, "-j", "2", *targets), env))
                print(f"cold build {args.targets} export targets -j 2, {mode}: {into[-1]:.1f} s", flush=True)
                shutil.rmtree(root)
        res["cold_build"] = {"fork_server_s": ours, "fresh_process_s": plain,
                             "ratio": statistics.median(plain) / statistics.median(ours)}

    # 2. one target: build -f in a fresh aitune-build process vs a hand-written fresh process
    root = project(base / "single", 1)
    subprocess.run(aitune(root, "t0"), check=True, env=ENV, stdout=subprocess.DEVNULL)
    ours, hand, served = [], [], []
    senv = {**ENV, "AITUNE_BUILD_SERVER": "600", "XDG_RUNTIME_DIR": str(base)}  # this run's own servers
    if args.server:
        start = timed([sys.executable, "-m", "aitune_build", "-C", str(root), "server", "start"], senv)
        res["server_start_s"] = start
        print(f"build server started in {start:.2f} s", flush=True)
    for _ in range(args.single_rounds):
        hand.append(timed([sys.executable, "-c", HAND, str(root), str(base / "hand.pt2")]))
        ours.append(timed(aitune(root, "-f", "t0")))
        if args.server:
            served.append(timed(aitune(root, "-f", "t0"), senv))
    phases = json.loads((root / "build/t0/build.json").read_text())["timings"]
    res["single"] = {"aitune_build_f_s": ours, "hand_written_s": hand,
                     "ratio": statistics.median(ours) / statistics.median(hand), "last_timings": phases}
    print(f"single export target: build -f {statistics.median(ours):.2f} s, hand-written {statistics.median(hand):.2f} s, "
          f"ratio {res['single']['ratio']:.2f}; phases {phases}", flush=True)
    if args.server:
        res["single"]["with_build_server_s"] = served
        res["single"]["with_build_server_ratio"] = statistics.median(served) / statistics.median(hand)
        print(f"  with a build server: {statistics.median(served):.2f} s, ratio {res['single']['with_build_server_ratio']:.2f}",
              flush=True)
        subprocess.run([sys.executable, "-m", "aitune_build", "server", "stop"], env=senv, stdout=subprocess.DEVNULL)
    if args.skip_jit:
        print(json.dumps(res, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        shutil.rmtree(base, ignore_errors=True)
        return

    # 3. inductor_jit first call in a fresh process, warm (stored compile caches) vs cold
    subprocess.run(aitune(root, "small_jit"), check=True, env=ENV, stdout=subprocess.DEVNULL)
    cache = root / "build/small_jit/compile_cache.bin"
    saved = cache.read_bytes()
    warm, cold = [], []
    for r in range(args.jit_rounds):
        for which, into in (("cold", cold), ("warm", warm)):
            if which == "cold":
                cache.unlink()
            else:
                cache.write_bytes(saved)
            ind = base / f"inductor-{which}-{r}"  # an empty Inductor cache: nothing left from earlier runs
            out = subprocess.run([sys.executable, "-c", FIRST_CALL, str(root / "aitune.toml")], check=True,
                                 env={**ENV, "TORCHINDUCTOR_CACHE_DIR": str(ind)}, capture_output=True, text=True)
            load_s, call_s = map(float, out.stdout.split())
            into.append(call_s)
            print(f"inductor_jit first call, {which}: {call_s:.2f} s (import+load {load_s:.2f} s)", flush=True)
            shutil.rmtree(ind, ignore_errors=True)
    res["jit_first_call"] = {"warm_s": warm, "cold_s": cold, "warm_over_cold": statistics.median(warm) / statistics.median(cold)}
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
