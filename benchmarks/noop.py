"""No-op build time against the number of targets, and cold hashing speed against plain reading.

    python benchmarks/noop.py [--sizes 10 100 1000] [--repeat 15] [--no-hash]

"no-op build" is `python -m aitune_build`; the installed `aitune-build` command (a console script next to the
interpreter, importing the fast path directly, without runpy) is timed beside it when present.

Generates a manifest of N eager targets (eager builds are the cheapest real builds), builds it once, then times
whole-process `aitune-build build` runs that find everything up to date (median of --repeat). Side by side, as
baselines: the bare interpreter (`python -c pass`, the floor of any Python tool) and `make` on a Makefile of the same
N targets, each depending on the same files. Runs interleave, so a noisy moment hits all three alike.
Also times hashing a cold 1 GiB file with the stat cache empty against reading it (median of 3, page cache dropped
where allowed).

Byte-code caching is left on for the timed runs (PYTHONDONTWRITEBYTECODE is removed from their environment): a
pip-installed package has its .pyc files, and a sandbox that sets the variable would otherwise compile every module
of aitune_build from source on every run.
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


def project(root: Path, n: int, shared_key: bool = False) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "models/__init__.py").write_text("")
    (root / "models/lin.py").write_text("import torch\n\n\ndef build(width=4):\n    return torch.nn.Linear(width, 2)\n")
    lines = ['[project]\nname = "noop"\n', '[backends.ref]\nkind = "eager"\n',
             '[modules.lin]\nfactory = "models.lin:build"\ninputs = [{ name = "input", shape = [2, 4] }]\n']
    for i in range(n):
        check = "" if shared_key else f"check = {{ seed = {i} }}\n"  # shared: one build, the rest restored
        lines.append(f'[targets.t{i}]\nmodule = "lin"\nbackend = "ref"\n{check}')
    (root / "aitune.toml").write_text("\n".join(lines))
    return root


ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(cmd: list[str], cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=ENV, cwd=cwd)
    return time.perf_counter() - t0


def makefile(root: Path, n: int) -> list[str]:
    """The same graph for make: N outputs, each depending on the model source and the manifest."""
    outs = " ".join(f"out/t{i}" for i in range(n))
    rules = [f"all: {outs}\n"] + [f"out/t{i}: models/lin.py aitune.toml\n\t@mkdir -p out && touch $@\n" for i in range(n)]
    (root / "Makefile").write_text("\n".join(rules))
    return ["make", "-s", "-C", str(root), "all"]


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
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--no-hash", action="store_true", help="skip the 1 GiB hashing row")
    ap.add_argument("--shared-key", action="store_true",
                    help="identical targets (one key): the first build compiles once and restores the rest")
    args = ap.parse_args()
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    # the installed command (what users run: the console script imports quick.py directly), beside `python -m`
    script = Path(sys.executable).with_name("aitune-build")
    print(f"`aitune-build` command: {script if script.exists() else 'not installed next to this python: column empty'}")
    print("| targets | first build (s) | no-op build median (s) | python -c pass (s) | make no-op (s) | no-op / python | (no-op − python) / targets (ms) | click path (s) | click / python | aitune-build command (s) | command / python |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        root = project(Path(tempfile.mkdtemp()) / "p", n, args.shared_key)
        cmd = [sys.executable, "-m", "aitune_build", "-C", str(root), "build", "-j", "2"]
        first = timed(cmd)
        for f in [*root.rglob("*.py"), root / "aitune.toml"]:  # past the stat cache's racy window
            st = f.stat()
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - 10_000_000_000))
        make = makefile(root, n)
        # the same build through the click CLI, past the no-op fast path of `python -m aitune_build` (quick.py)
        click_cmd = [sys.executable, "-c", "from aitune_build.cli import main; main(prog_name='aitune-build')", *cmd[3:]]
        timed(cmd), timed(make)
        script_cmd = [str(script), *cmd[3:]] if script.exists() else None
        ours, floor, makes, clicks, scripts = [], [], [], [], []
        for _ in range(args.repeat):
            ours.append(timed(cmd))
            floor.append(timed([sys.executable, "-c", "pass"]))
            makes.append(timed(make))
            clicks.append(timed(click_cmd))
            if script_cmd:
                scripts.append(timed(script_cmd))
        noop, py, mk, ck = statistics.median(ours), statistics.median(floor), statistics.median(makes), statistics.median(clicks)
        sc = f"{statistics.median(scripts):.3f} | {statistics.median(scripts) / py:.1f}×" if scripts else " | "
        print(f"| {n} | {first:.1f} | {noop:.3f} | {py:.3f} | {mk:.3f} | {noop / py:.1f}× | {1000 * (noop - py) / n:.2f} "
              f"| {ck:.3f} | {ck / py:.1f}× | {sc} |", flush=True)
    if args.no_hash:
        return

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
