"""The remote cache against a local SeaweedFS (`weed mini`, started and stopped here).

    python benchmarks/remote.py [--workdir DIR] [--targets 100] [--repeat 5] [--gib 1] [--only warm|big|upload]

1. warm: a fresh checkout (no build/, empty local cache) of N small eager targets whose entries are all on the
   remote: wall time of `aitune-build build` until every target is `cached`, beside the local no-op build of the
   same project (whole processes, interleaved, median of --repeat). Only some targets are built for real; the others
   get a copy of t0's artifact under their own key (see synthesise()).
2. big: one artifact of --gib GiB: RemoteCache.fetch (stream, hash xxh3+sha256, verify, move into the store) against
   the raw client alone (obstore.get(...).stream() written to a file, no hashing; the same chunk size), interleaved, median of --repeat
   (3 at most); peak RSS of each, measured in its own process, for this size and a quarter of it.
3. upload: builds of three export targets with ~48 MB of weights each, uploads on (read-write remote, a new prefix
   each time) vs off (--no-remote), fresh local cache each time, interleaved.

--workdir keeps the warm project between runs.
Prints Markdown rows and writes JSON next to them with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
WEED = Path(sys.executable).with_name("weed")
CREDS = {"AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": "sk", "AWS_REGION": "us-east-1"}
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "AITUNE_CACHE_DIR")}
ENV["PYTHONPATH"] = str(REPO) + (os.pathsep + ENV["PYTHONPATH"] if ENV.get("PYTHONPATH") else "")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Weed:
    def __init__(self, root: Path):
        names = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "filer.port", "filer.port.grpc",
                 "volume.port", "volume.port.grpc", "admin.port", "admin.port.grpc")
        ports = dict(zip(names, free_ports(len(names))))
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        root.mkdir(parents=True, exist_ok=True)
        args = [str(WEED), "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root}", "-webdav=false", "-admin.ui=false",
                "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-filer.localSocket={root}/f.sock",
                f"-s3.localSocket={root}/s.sock", *(f"-{k}={v}" for k, v in ports.items())]
        self.proc = subprocess.Popen(args, env={**os.environ, **CREDS, "S3_BUCKET": "bench"}, stdout=open(root / "log", "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        import obstore
        from obstore.store import S3Store

        deadline = time.monotonic() + 60
        while True:
            try:
                store = S3Store("bench", endpoint=self.endpoint, client_options={"allow_http": True},
                                retry_config={"max_retries": 0}, access_key_id="ak", secret_access_key="sk", region="us-east-1")
                obstore.put(store, "ready", b"1")
                self.store = store
                break
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.3)

    def env(self, prefix: str) -> dict[str, str]:
        return {**ENV, **CREDS, "AWS_ENDPOINT_URL": self.endpoint, "AITUNE_REMOTE_CACHE": f"s3://bench/{prefix}"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def eager_project(root: Path, n: int) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "models/__init__.py").write_text("")
    (root / "models/lin.py").write_text("import torch\n\n\ndef build(width=4):\n    return torch.nn.Linear(width, 2)\n")
    lines = ['[project]\nname = "bench"\n', '[backends.ref]\nkind = "eager"\n',
             '[modules.lin]\nfactory = "models.lin:build"\ninputs = [{ name = "input", shape = [2, 4] }]\n']
    lines += [f'[targets.t{i}]\nmodule = "lin"\nbackend = "ref"\ncheck = {{ seed = {i} }}\n' for i in range(n)]
    (root / "aitune.toml").write_text("\n".join(lines))
    return root


def clone(src: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("build", ".aitune", "__pycache__"))
    return dest


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, out.stdout


def bench_warm(weed: Weed, work: Path, n: int, repeat: int) -> dict:
    origin = work / f"warm{n}"
    env = weed.env(f"warm{n}-{time.time_ns()}")
    if not (origin / "aitune.lock").is_file():
        if not (origin / "aitune.toml").is_file():
            eager_project(origin, n)
        synthesise(origin, env)
    subprocess.run([PY, "-m", "aitune_build", "-C", str(origin), "cache", "push"], check=True, env=env, stdout=subprocess.DEVNULL)
    fresh_times, noop_times, dry_times = [], [], []
    for _ in range(repeat):
        fresh = clone(origin, work / "fresh")
        dt, out = timed([PY, "-m", "aitune_build", "-C", str(fresh), "build", "--json"], env)
        doc = json.loads(out)
        assert all(t["status"] == "cached" and t["source"] == "remote" for t in doc["targets"]), doc["summary"]
        fresh_times.append(dt)
        noop_times.append(timed([PY, "-m", "aitune_build", "-C", str(origin), "build"], env)[0])
        # what any first command of a fresh checkout pays (manifest validated with pydantic, sources hashed), no network
        dry = clone(origin, work / "dry")
        dry_times.append(timed([PY, "-m", "aitune_build", "-C", str(dry), "build", "--dry-run", "--no-remote"], env)[0])
    return {"targets": n, "fresh_from_remote_s": fresh_times, "local_noop_s": noop_times, "fresh_dry_run_s": dry_times,
            "fresh_median_s": statistics.median(fresh_times), "noop_median_s": statistics.median(noop_times),
            "dry_median_s": statistics.median(dry_times)}


def synthesise(origin: Path, env: dict[str, str]) -> None:
    """Build t0 for real, then give every other target the same artifact under its own key and components.

    Building N eager targets costs N worker processes (minutes of CPU on a 2-core VM shared by 8 people) and the
    eager artifacts of targets differing only in check seed are alike anyway: what this benchmark times is the
    transport (N index + blob downloads, verification, store, materialise), which the synthesised entries exercise
    exactly as built ones would. Targets already built for real are kept."""
    subprocess.run([PY, "-m", "aitune_build", "-C", str(origin), "build", "t0", "--no-remote"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    sys.path.insert(0, str(REPO))
    from aitune_build.keys import key_of
    from aitune_build.outputs import current_record, materialise
    from aitune_build.project import Project

    project = Project.open(origin / "aitune.toml")
    store = project.store
    t0 = json.loads((origin / "build/t0/build.json").read_text())
    src = store.get(t0["key"])
    for name in project.manifest.model.targets:
        comps = project.fingerprinter.components(name)
        key = key_of(comps)
        if current_record(project.target_dir(name), key, project.state) is not None:
            continue
        tmp = store.new_tmp()
        for f in src.files:
            shutil.copyfile(src.path / f, tmp / f)
        meta = {**src.meta, "key": key, "target": name, "components": comps, "toolchain": comps["toolchain"]}
        entry = store.put(key, tmp, meta)
        materialise(project.target_dir(name), entry.path, entry.files, meta)
    project.close()
    subprocess.run([PY, "-m", "aitune_build", "-C", str(origin), "build", "--no-remote"], check=True, env=env,
                   stdout=subprocess.DEVNULL)  # writes aitune.lock


_FETCH = r"""
import json, resource, sys, time, pathlib
mode, url, key, out, size = sys.argv[1:]
t0 = time.perf_counter()
if mode == "raw":
    import obstore
    from aitune_build.remote import DOWNLOAD_CHUNK, object_store, RemoteCache
    store = object_store(url)
    idx = json.loads(bytes(obstore.get(store, RemoteCache.index_path(key)).bytes()))
    (want,) = idx["files"].values()
    with open(out, "wb") as f:
        for chunk in obstore.get(store, RemoteCache.blob_path(want["sha256"])).stream(min_chunk_size=DOWNLOAD_CHUNK):
            f.write(chunk)
else:
    from aitune_build.remote import RemoteCache
    from aitune_build.store import ArtifactStore
    entry = RemoteCache(url, "read", ArtifactStore(pathlib.Path(out)), "bench").fetch(key)
    assert entry is not None
dt = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": dt, "mib_s": int(size) / dt / 2**20, "peak_rss_mb": ru.ru_maxrss / 1024,
                  "cpu_s": ru.ru_utime + ru.ru_stime}))
"""


def make_entry(work: Path, size: int, weed: Weed, prefix: str) -> str:
    """A local store entry holding one `size`-byte random file, uploaded to the remote; returns its key."""
    sys.path.insert(0, str(REPO))
    os.environ.update(weed.env(prefix))
    from aitune_build.remote import RemoteCache
    from aitune_build.store import ArtifactStore

    store = ArtifactStore(work / f"src-{size}")
    tmp = store.new_tmp()
    with open(tmp / "model.bin", "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(os.urandom(n))
            left -= n
    key = f"{size:032x}"
    entry = store.put(key, tmp, {"key": key, "artifact": "model.bin", "components": {"toolchain": {}}})
    t0 = time.perf_counter()
    RemoteCache(f"s3://bench/{prefix}", "read-write", store, "bench").upload_now(entry)
    print(f"  (upload of {size >> 20} MiB: {size / (time.perf_counter() - t0) / 2**20:.0f} MiB/s)", file=sys.stderr)
    shutil.rmtree(store.root.parent)
    return key


def fetch_once(mode: str, weed: Weed, prefix: str, key: str, work: Path, size: int) -> dict:
    out = work / f"out-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    out.unlink(missing_ok=True)
    r = subprocess.run([PY, "-c", _FETCH, mode, f"s3://bench/{prefix}", key, str(out), str(size)], check=True,
                       capture_output=True, text=True, env=weed.env(prefix))
    shutil.rmtree(out, ignore_errors=True)
    out.unlink(missing_ok=True)
    return json.loads(r.stdout)


def bench_big(weed: Weed, work: Path, gib: float, repeat: int) -> dict:
    size = int(gib * 2**30)
    rows = {}
    for s in (size, size // 4):
        prefix = f"big-{s}-{time.time_ns()}"
        key = make_entry(work, s, weed, prefix)
        raw, ours = [], []
        for _ in range(min(repeat, 3)):
            raw.append(fetch_once("raw", weed, prefix, key, work, s))
            ours.append(fetch_once("fetch", weed, prefix, key, work, s))
        rows[s] = {"raw_mib_s": statistics.median(r["mib_s"] for r in raw), "fetch_mib_s": statistics.median(r["mib_s"] for r in ours),
                   "raw_rss_mb": max(r["peak_rss_mb"] for r in raw), "fetch_rss_mb": max(r["peak_rss_mb"] for r in ours),
                   "raw_cpu_s": statistics.median(r["cpu_s"] for r in raw), "fetch_cpu_s": statistics.median(r["cpu_s"] for r in ours),
                   "raw": raw, "fetch": ours}
    return {str(k): v for k, v in rows.items()}


WEIGHTY = """
import torch


class Big(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.a = torch.nn.Linear(width, width)
        self.b = torch.nn.Linear(width, width)
        self.c = torch.nn.Linear(width, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def build(width=2048, seed=0):
    torch.manual_seed(seed)
    return Big(width)
"""


def upload_project(root: Path) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "models/__init__.py").write_text("")
    (root / "models/big.py").write_text(WEIGHTY)
    lines = ['[project]\nname = "upl"\n', '[backends.exp]\nkind = "export"\n']
    for i in range(3):
        lines.append(f'[modules.m{i}]\nfactory = "models.big:build"\nargs = {{ seed = {i} }}\n'
                     'inputs = [{ name = "x", shape = [{ dim = "b", min = 1, opt = 2, max = 4 }, 2048] }]\n')
        lines.append(f'[targets.t{i}]\nmodule = "m{i}"\nbackend = "exp"\n')
    (root / "aitune.toml").write_text("\n".join(lines))
    return root


def _cpu_of_children() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # the build process and its workers, once they have exited
    return ru.ru_utime + ru.ru_stime


def _cpu_of_pid(pid: int) -> float:
    """CPU seconds of the process tree's root (the weed server runs its parts as threads of one process)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_upload(weed: Weed, work: Path, repeat: int) -> dict:
    origin = upload_project(work / "upl-origin") if not (work / "upl-origin").exists() else work / "upl-origin"
    on, off, up_bytes, during_check = [], [], 0, []
    cpu: dict[str, list[float]] = {"build_on": [], "build_off": [], "server_on": [], "server_off": []}
    for i in range(repeat):
        for mode in ("off", "on"):
            p = clone(origin, work / f"upl-{mode}")
            env = weed.env(f"upl-{time.time_ns()}")
            cmd = [PY, "-m", "aitune_build", "-C", str(p), "build", "-j", "2", "--json"] + (["--no-remote"] if mode == "off" else [])
            c0, s0 = _cpu_of_children(), _cpu_of_pid(weed.proc.pid)
            dt, out = timed(cmd, env)
            cpu[f"build_{mode}"].append(round(_cpu_of_children() - c0, 2))
            cpu[f"server_{mode}"].append(round(_cpu_of_pid(weed.proc.pid) - s0, 2))
            doc = json.loads(out)
            assert doc["summary"]["built"] == 3, doc
            if mode == "on":
                assert doc["remote"]["uploaded"] == 3, doc["remote"]
                up_bytes = doc["remote"]["bytes_up"]
                during_check.append(doc["remote"].get("sent_during_check", 0))
            (on if mode == "on" else off).append(dt)
    return {"on_s": on, "off_s": off, "on_median_s": statistics.median(on), "off_median_s": statistics.median(off),
            "ratio": statistics.median(on) / statistics.median(off), "bytes_uploaded_per_build": up_bytes,
            "sent_during_check": during_check,  # artifacts per build whose upload overlapped their check
            "cpu_s": cpu}  # the build process tree's CPU and the local S3 server's, per build


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--targets", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--only", choices=["warm", "big", "upload"], action="append")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="aitune-remote-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    weed_dir = Path(tempfile.mkdtemp(prefix="weed-", dir=work))
    weed = Weed(weed_dir)
    doc: dict = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
                 "load_before": os.getloadavg()}
    only = set(args.only or ["warm", "big", "upload"])
    try:
        if "warm" in only:
            doc["warm"] = bench_warm(weed, work, args.targets, args.repeat)
            w = doc["warm"]
            print(f"| {w['targets']} targets, fresh checkout, warm remote | {w['fresh_median_s']:.2f} s | local no-op {w['noop_median_s']:.2f} s "
                  f"| fresh checkout --dry-run {w['dry_median_s']:.2f} s |")
        if "big" in only:
            doc["big"] = bench_big(weed, work, args.gib, args.repeat)
            for size, r in doc["big"].items():
                print(f"| {int(size) >> 20} MiB | raw {r['raw_mib_s']:.0f} MiB/s | fetch+verify {r['fetch_mib_s']:.0f} MiB/s "
                      f"({r['fetch_mib_s'] / r['raw_mib_s']:.0%}) | RSS raw {r['raw_rss_mb']:.0f} MB, fetch {r['fetch_rss_mb']:.0f} MB "
                      f"| CPU raw {r['raw_cpu_s']:.2f} s, fetch {r['fetch_cpu_s']:.2f} s |")
        if "upload" in only:
            doc["upload"] = u = bench_upload(weed, work, max(1, min(args.repeat, 3)))
            print(f"| uploads on {u['on_median_s']:.2f} s | off {u['off_median_s']:.2f} s | ratio {u['ratio']:.3f} | CPU {u['cpu_s']} |")
    finally:
        weed.stop()
        shutil.rmtree(weed_dir, ignore_errors=True)
    doc["load_after"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps({k: v for k, v in doc.items() if k in ("machine", "load_before", "load_after")}))


if __name__ == "__main__":
    main()
