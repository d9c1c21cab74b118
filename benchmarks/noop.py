"""No-op build time against the number of targets, and cold hashing speed against plain reading.

    python benchmarks/noop.py [--sizes 10 100 1000] [--repeat 7]

Generates a manifest of N eager targets (eager builds are the cheapest real builds), builds it once, then times
whole-process `aitune-build build` runs that find everything up to date (median of --repeat). Also times hashing a
cold 1 GiB file with the stat cache empty against reading it (median of 3, page cache dropped where allowed).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def project(root: Path, n: int) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "models/__init__.py").write_text("")
    (root / "models/lin.py").write_text("import torch\n\n\ndef build(width=4):\n    return torch.nn.Linear(width, 2)\n")
    lines = ['[project]\nname = "noop"\n', '[backends.ref]\nkind = "eager"\n',
             '[modules.lin]\nfactory = "models.lin:build"\ninputs = [{ name = "input", shape = [2, 4] }]\n']
    for i in range(n):
        lines.append(f'[targets.t{i}]\nmodule = "lin"\nbackend = "ref"\ncheck = {{ seed = {i} }}\n')
    (root / "aitune.toml").write_text("\n".join(lines))
    return root


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def drop_cache(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    except (AttributeError, OSError):
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    print("| targets | first build (s) | no-op build median (s) | per target (ms) |")
    print("|---:|---:|---:|---:|")
    for n in args.sizes:
        root = project(Path(tempfile.mkdtemp()) / "p", n)
        cmd = [sys.executable, "-m", "aitune_build", "-C", str(root), "build", "-j", "2"]
        first = timed(cmd)
        for f in root.rglob("*.py"):  # past the stat cache's racy window
            st = f.stat()
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - 10_000_000_000))
        timed(cmd)
        noop = statistics.median(timed(cmd) for _ in range(args.repeat))
        print(f"| {n} | {first:.1f} | {noop:.3f} | {1000 * noop / n:.2f} |", flush=True)

    from aitune_build.hashing import hash_file

    big = Path(tempfile.mkdtemp()) / "weights.bin"
    with open(big, "wb") as f:
        for _ in range(1024):
            f.write(os.urandom(1 << 20))
    reads, hashes = [], []
    for _ in range(3):
        drop_cache(big)
        t0 = time.perf_counter()
        with open(big, "rb", buffering=0) as f:
            buf = bytearray(8 << 20)
            while f.readinto(buf):
                pass
        reads.append(time.perf_counter() - t0)
        drop_cache(big)
        t0 = time.perf_counter()
        hash_file(big)
        hashes.append(time.perf_counter() - t0)
    r, h = statistics.median(reads), statistics.median(hashes)
    print(f"\n1 GiB file: read {1024 / r:.0f} MiB/s, xxh3-128 hash {1024 / h:.0f} MiB/s: hashing at {100 * r / h:.0f}% of read speed")
    big.unlink()


if __name__ == "__main__":
    main()
