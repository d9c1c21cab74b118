"""What a worker imports per backend, measured in fresh worker processes with `-X importtime`.

    python benchmarks/worker_imports.py [--kinds eager export inductor_jit]

Builds one small target per kind with `AITUNE_WORKERS=subprocess` and PYTHONPROFILEIMPORTTIME=1, so each worker is
a fresh interpreter whose import timings land in its build.log; prints per kind: modules imported, their total
import time (sum of top-level cumulative times), the heaviest top-level imports, whether torch_tensorrt / Inductor's
compile_fx were imported, and what the fork server preloads for that kind (`workers.preload_for`).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", nargs="+", default=["eager", "export", "inductor_jit"])
    args = ap.parse_args()
    from aitune_build.workers import preload_for

    root = Path(tempfile.mkdtemp()) / "p"
    (root / "models").mkdir(parents=True)
    (root / "models/__init__.py").write_text("")
    (root / "models/lin.py").write_text("import torch\n\n\ndef build():\n    return torch.nn.Linear(4, 2)\n")
    lines = ['[project]\nname = "imports"\n', '[modules.lin]\nfactory = "models.lin:build"\ninputs = [{ name = "input", shape = [2, 4] }]\n']
    for kind in args.kinds:
        lines.append(f'[backends.{kind}]\nkind = "{kind}"\n[targets.t_{kind}]\nmodule = "lin"\nbackend = "{kind}"\n')
    (root / "aitune.toml").write_text("\n".join(lines))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(AITUNE_WORKERS="subprocess", PYTHONPROFILEIMPORTTIME="1",
               PYTHONPATH=str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
    subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(root), "build"], env=env, check=True, stdout=subprocess.DEVNULL)
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    print("| kind | modules imported | import time (s) | heaviest top-level imports (s) | torch_tensorrt | compile_fx | fork server preloads |")
    print("|---|---:|---:|---|---|---|---|")
    for kind in args.kinds:
        mods, top = [], []
        for line in (root / f"build/t_{kind}/build.log").read_text().splitlines():
            m = LINE.match(line)
            if m:
                mods.append(m.group(4))
                if not m.group(3).strip(" ") and len(m.group(3)) <= 1:
                    top.append((int(m.group(2)) / 1e6, m.group(4)))
        total = sum(t for t, _ in top)
        heavy = ", ".join(f"{n} {t:.2f}" for t, n in sorted(top, reverse=True)[:4])
        pre = [p for p in preload_for({kind}) if not p.startswith("aitune_build")]
        print(f"| {kind} | {len(mods)} | {total:.2f} | {heavy} | {'torch_tensorrt' in mods} | "
              f"{'torch._inductor.compile_fx' in mods} | {', '.join(pre)} |")


if __name__ == "__main__":
    main()
