"""Peak memory (RSS) of `package` and `verify` with a 1 GiB artifact: streaming archives against the in-memory ones.

    python benchmarks/archive_memory.py [--size-mib 1024] [--baseline PATH] [--out results.json]

Builds a real export target (adder), then adds a file of SIZE random bytes to its output folder and build.json (as
a large weights file or engine would be: random bytes do not compress), so that `package` must pack it and `verify`
must read it. Each command runs in its own process; its peak RSS is that process's VmHWM, read at exit. With --baseline
(the code from before streaming, e.g. `mkdir /tmp/base && git archive 5f0f4aa aitune_build | tar -x -C /tmp/base`), the same commands
run with that code on the same files, interleaved, for the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


_CHILD = """
import atexit, os, runpy, sys
def peak():
    with open("/proc/self/status") as f:
        hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(os.environ["PEAK_OUT"], "w") as out:
        out.write(hwm)
atexit.register(peak)
sys.argv = ["aitune-build"] + sys.argv[1:]
runpy.run_module("aitune_build", run_name="__main__")
"""


def run(code_root: Path, cwd: Path, *args: str) -> tuple[float, float, int]:
    """(peak RSS MiB, seconds, exit code) of `aitune-build ARGS` run with the package found under code_root.

    The peak is the child's own VmHWM (its address space's high-water mark, read at exit): getrusage's ru_maxrss
    would also count the memory of this (torch-importing) parent at the fork before exec."""
    peak_file = cwd.parent / "peak.txt"
    env = {**os.environ, "PYTHONPATH": str(code_root), "PEAK_OUT": str(peak_file), "PYTHONSAFEPATH": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _CHILD, "-C", str(cwd), *args], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        print(p.stderr, file=sys.stderr)
    return int(peak_file.read_text()) / 1024, seconds, p.returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--baseline", type=Path, help="a checkout whose aitune_build packs in memory")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only-baseline", action="store_true", help="measure the baseline alone")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.conftest import make_project
    from aitune_build.hashing import hash_file, sha256_file

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        root = make_project(Path(tmp) / "proj")
        os.environ["AITUNE_CACHE_DIR"] = str(Path(tmp) / "cache")
        r = subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(root), "build", "adder_export"],
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        folder = root / "build/adder_export"
        big = folder / "weights.bin"
        with open(big, "wb") as f:
            for _ in range(a.size_mib):
                f.write(os.urandom(1 << 20))
        rec = json.loads((folder / "build.json").read_text())
        rec["files"]["weights.bin"] = {"size": big.stat().st_size, "xxh3": hash_file(big), "sha256": sha256_file(big)}
        (folder / "build.json").write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
        rows = []
        codes = [] if a.only_baseline else [("streaming", REPO)]
        codes += [("in-memory (baseline)", a.baseline)] if a.baseline else []
        for label, code_root in codes:
            archive = Path(tmp) / f"r-{len(rows)}.tar.gz"
            pk = run(code_root, root, "package", "-o", str(archive))
            vf = run(code_root, root, "verify", str(archive))
            rows.append({"code": label, "package_peak_rss_mib": round(pk[0], 1), "package_s": round(pk[1], 1),
                         "package_rc": pk[2], "verify_peak_rss_mib": round(vf[0], 1), "verify_s": round(vf[1], 1),
                         "verify_rc": vf[2], "archive_mib": round(archive.stat().st_size / (1 << 20), 1)})
            archive.unlink()
            print(json.dumps(rows[-1]), flush=True)
    result = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "artifact_mib": a.size_mib, "rows": rows}
    print(json.dumps(result, indent=2))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
