"""Tuning: a target with `candidates` builds each one as an ordinary keyed target "T@B" (materialised under
<out_dir>/T/candidates/B/), measures those that built and passed their check, and keeps the winner.

The selection is an artifact like any build: its key is its candidates' keys, the device (GPU name and compute
capability; the CPU model when no candidate runs on CUDA) and the measurement settings; its store entry holds the
winner's artifact files and `selection.json` (every candidate's latency, spread, throughput, check error and why it
was rejected), so a second run, or another runner sharing the cache, neither rebuilds nor measures.

Measurement runs in its own process (`python -m aitune_build.tune JOB.json`; torch is imported there only): each
candidate is loaded with `aitune_build.load()` (exactly what users get), warmed up, then timed in rounds that
interleave the candidates (each round starts at another candidate), CUDA events on a GPU, perf_counter on the CPU;
rounds go on until the ranking has been the same for `stable_rounds` rounds (after `min_rounds`) or a candidate has
been timed for its share of `cap_s` seconds. The GPU's clocks are left alone.

On the CPU that process runs `processes` times (more, up to `max_processes`, while the processes' winners disagree),
and each candidate's latency is the median of its per-process medians: ATen's OpenMP threads settle into a fast or a
slow regime per process (measured on a 2-core VM: eager 0.36-0.46 ms in some processes, 0.59-0.79 ms in others),
which rounds interleaved inside one process cannot see. On a GPU one process (`cuda_processes`): the GPU selections
agreed from one process, and each further one would load every TensorRT engine again.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .manifest import candidate_target

if TYPE_CHECKING:
    from .executor import BuildOptions, Listener, Runner, TargetResult, _Job
    from .keys import Fingerprinter
    from .project import Project

SELECTION = "selection.json"
SELECTION_FORMAT = 1
# What a measurement does; part of the selection's key (change one, every selection measures again).
SETTINGS: dict[str, Any] = {
    "revision": 2,
    "warmup_s": 0.1,  # per candidate and batch size, after the first call (which may compile)
    "block_s": 0.02,  # one candidate's turn in a round: about this long, at least 3 calls
    "min_rounds": 5,
    "stable_rounds": 3,  # stop when the ranking has not changed for this many rounds ...
    "cap_s": 10.0,  # ... or when a candidate has been timed this long, all measuring processes together
    "processes": 2,  # CPU: separate measuring processes, each its own warm-up and rounds ...
    "max_processes": 3,  # ... one more while their winners disagree, up to this many (each gets cap_s / this)
    "cuda_processes": 1,  # on a GPU
}


# --- the key --------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name and the cores this process may use (a CPU selection is only valid on such a host)."""
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if not name:
        import platform

        name = platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({cores} cores)"


def device_identity(fp: Fingerprinter, devices: set[str]) -> dict[str, Any]:
    """What a measurement's results depend on besides the candidates: the GPU model the build's GPU targets use
    (name and compute capability, as in their keys; gpus.py), or the CPU."""
    if "cuda" in devices:
        return {"gpu": fp.gpu_plan.model, "cpu": None}
    return {"gpu": None, "cpu": cpu_model()}


def device_model(identity: dict[str, Any]) -> str:
    """The name a selection is pinned under in aitune.lock: the GPU model, else "cpu: <model>"."""
    if identity.get("gpu"):
        return identity["gpu"]["name"]
    if identity.get("cpu"):
        return f"cpu: {identity['cpu']}"
    return "no GPU"


def measured_batches(m: Any, target: str) -> tuple[list[int], bool]:
    """The batch sizes a selection measures and whether the batch axis is dynamic (else the inputs' fixed shapes)."""
    spec = m.model.targets[target]
    found = m.batch_axis(target)
    if found is None:
        _, mod = m.module_of(target)
        first = mod.inputs[0].shape[0] if mod.inputs[0].shape else 1
        return [first if isinstance(first, int) and first > 0 else 1], False
    return (list(spec.batch) if spec.batch else [found[0].opt]), True


def selection_components(fp: Fingerprinter, target: str, upstream_artifact: str | None) -> dict[str, Any]:
    """A tuned target's key components: its candidates' keys, the device, the strategy and the measurement settings."""
    from .keys import key_of

    man = fp.manifest.model
    spec = man.targets[target]
    keys = {b: key_of(fp.components(candidate_target(target, b), upstream_artifact)) for b in spec.candidates}
    batches, _ = measured_batches(fp.manifest, target)
    return {
        "candidates": keys,
        "order": list(spec.candidates),
        "select": {"strategy": spec.strategy, "budget_ms": spec.budget_ms, "batch": batches, "min_speedup": spec.min_speedup},
        "device": device_identity(fp, {man.backends[b].device for b in spec.candidates}),
        "measure": SETTINGS,
    }


def check_same_device(target: str, record: dict[str, Any]) -> None:
    """A winner chosen on one GPU model is not served on another: there, `build` selects anew."""
    from .errors import AituneError
    from .toolchain import gpu_info

    chosen = record["components"].get("device", {}).get("gpu")
    if not chosen:
        return
    visible = gpu_info()
    here = visible[0] if visible else None  # CUDA device 0: where this process runs the artifact
    if here is None or (here["name"], here["compute_capability"]) != (chosen["name"], chosen["compute_capability"]):
        where = f"{here['name']} (compute capability {here['compute_capability']})" if here else "no NVIDIA GPU"
        raise AituneError(f"cannot load {target}: its backend was chosen by measurement on {chosen['name']} (compute "
                          f"capability {chosen['compute_capability']}); this machine has {where}. Run "
                          f"`aitune-build build {target}` here to select for this GPU")


# --- scoring (shared by the measuring process, which stops when the ranking is stable, and the parent) -------------


def score(strategy: str, budget_ms: float | None, latency: dict[int, float]) -> tuple[float | None, str | None, str]:
    """(rank value, lower is better; rejection; what the value is) of one candidate's median latencies by batch."""
    small = min(latency)
    throughput = {b: b / (ms / 1e3) for b, ms in latency.items()}
    if strategy in ("min_latency", "first_wins"):
        return latency[small], None, f"{latency[small]:.4g} ms at batch {small}"
    if strategy == "max_throughput":
        b = max(throughput, key=throughput.get)  # type: ignore[arg-type]
        return -throughput[b], None, f"{throughput[b]:.4g}/s at batch {b}"
    within = {b: t for b, t in throughput.items() if latency[b] <= budget_ms}  # type: ignore[operator]
    if not within:
        return None, f"over the latency budget: {latency[small]:.4g} ms at batch {small} > {budget_ms:g} ms", ""
    b = max(within, key=within.get)  # type: ignore[arg-type]
    return -within[b], None, f"{within[b]:.4g}/s at batch {b} ({latency[b]:.4g} ms <= {budget_ms:g} ms)"


def speedup(latency: dict[int, float], eager: dict[int, float]) -> float:
    """Geometric mean over the measured batch sizes of eager latency / candidate latency."""
    return math.exp(sum(math.log(eager[b] / latency[b]) for b in latency) / len(latency))


def ranking(strategy: str, budget_ms: float | None, min_speedup: float | None, latencies: dict[str, dict[int, float]],
            baselines: dict[str, dict[int, float]], devices: dict[str, str]) -> list[str]:
    """Candidate ids best first; rejected ones left out."""
    ranked = []
    for cid, lat in latencies.items():
        value, rejected, _ = score(strategy, budget_ms, lat)
        if rejected is None and min_speedup is not None and devices[cid] in baselines:
            if speedup(lat, baselines[devices[cid]]) < min_speedup:
                continue
        if rejected is None:
            ranked.append((value, cid))
    return [cid for _, cid in sorted(ranked)]


# --- the selection, run by the executor for a tuned target ---------------------------------------------------------


def build_selection(project: Project, job: _Job, options: BuildOptions, runner: Runner, listen: Listener) -> TargetResult:
    """Build, check and measure a tuned target's candidates (or restore its selection from the cache)."""
    from .executor import _from_store, _NoLock

    name, key, store = job.name, job.key, project.store
    fresh = options.force or options.retune
    if not fresh:
        hit = _from_store(project, name, key)
        if hit is not None:
            hit.reason = f"selection restored from cache, not measured (winner {hit.record['selection']['winner']})"
            return hit
    with store.lock(key) if not store.readonly else _NoLock():
        if not fresh:  # another process may have measured it while we waited for the lock
            hit = _from_store(project, name, key)
            if hit is not None:
                hit.reason = f"selection restored from cache, not measured (winner {hit.record['selection']['winner']})"
                return hit
        listen("start", name, None)
        return _select(project, job, options, runner)


def _select(project: Project, job: _Job, options: BuildOptions, runner: Runner) -> TargetResult:
    from .errors import AituneError
    from .executor import BUILT, CACHED, FAILED, SKIPPED, TargetResult, _build_one, _prepare
    from .outputs import read_record

    man = project.manifest.model
    name, spec = job.name, project.manifest.model.targets[job.name]
    t0 = time.perf_counter()
    upstream: dict[str, Any] = {}
    if spec.from_ is not None:
        upstream[spec.from_] = TargetResult(spec.from_, CACHED, record=read_record(project.target_dir(spec.from_)) or {})
    rows: dict[str, dict[str, Any]] = {}
    usable: list[str] = []
    measurement: dict[str, Any] = {"entries": {}, "rounds": 0, "stable": None, "seconds": 0.0, "processes": []}
    winner: str | None = None
    for b in spec.candidates:
        config = man.backends[b]
        row: dict[str, Any] = {"backend": b, "kind": config.kind, "device": config.device, "key": job.comps["candidates"][b],
                               "build": "not tried", "check": None, "latency_ms": {}, "throughput": {},
                               "speedup_vs_eager": None, "rejected": None, "measure_s": None, "warmup_s": None}
        rows[b] = row
        if spec.strategy == "first_wins" and winner is not None:
            row["rejected"] = f"not tried: first_wins stopped at '{winner}'"
            continue
        cname = candidate_target(name, b)
        try:
            cjob = _prepare(project, cname, upstream, options.force)
            row["components"] = cjob.comps  # `explain` diffs against these, also where only the selection was restored
            if cjob.current is not None:
                res = TargetResult(cname, CACHED, cjob.key, reason="up to date", record=cjob.current)
            else:
                res = _build_one(project, cjob, options, runner, lambda *_: None)
        except AituneError as e:
            res = TargetResult(cname, FAILED, reason=str(e), error="user")
        row["build"] = res.status
        if res.status not in (BUILT, CACHED):
            row["rejected"] = res.reason if res.status == SKIPPED else f"build failed: {res.reason}"
            row["error"] = res.error
            continue
        chk = res.record.get("check", {})
        row["check"] = {k: chk.get(k) for k in ("precision", "rtol", "atol", "max_abs_err", "max_rel_err")}
        usable.append(b)
        if spec.strategy == "first_wins":
            got = _measure(project, name, [b], runner)
            _merge(measurement, got)
            _apply(spec, rows, got, [b])
            if row["rejected"] is None:
                winner = b
    if spec.strategy != "first_wins" and usable:
        got = _measure(project, name, usable, runner)
        _merge(measurement, got)
        _apply(spec, rows, got, usable)
        order = ranking(spec.strategy, spec.budget_ms, None,
                        {b: _medians(rows[b]) for b in usable if rows[b]["rejected"] is None}, {}, {})
        winner = order[0] if order else None
    if winner is None:
        reasons = "; ".join(f"{b}: {r['rejected']}" for b, r in rows.items())
        errors = {r.get("error") for r in rows.values() if r["build"] != "not tried"}
        kind = errors.pop() if len(errors) == 1 and None not in errors else "check"  # all unavailable, or all user errors
        status = SKIPPED if kind == "unavailable" and name not in options.named else FAILED
        return TargetResult(name, status, job.key, reason=f"no candidate qualified ({reasons})", error=kind)
    return _store_selection(project, job, rows, winner, measurement, time.perf_counter() - t0)


def _medians(row: dict[str, Any]) -> dict[int, float]:
    return _batch_medians(row["latency_ms"])


def _batch_medians(batches: dict[str, dict[str, Any]]) -> dict[int, float]:
    """{batch size: median latency} of a measurement's per-batch statistics ({"1": {"median", ...}, ...})."""
    return {int(b): s["median"] for b, s in batches.items()}


def _merge(total: dict[str, Any], got: dict[str, Any]) -> None:
    total["entries"].update(got["entries"])
    total.setdefault("baselines", {}).update(got.get("baselines", {}))
    total["rounds"] += got["rounds"]
    total["stable"] = got["stable"] if total["stable"] is None else (total["stable"] and got["stable"])
    total["seconds"] += got["seconds"]
    total["processes"] += got["processes"]


def _apply(spec: Any, rows: dict[str, dict[str, Any]], got: dict[str, Any], measured: list[str]) -> None:
    """Fill in the measured rows; reject what failed while measuring, is over the budget or too slow versus eager."""
    baselines = {dev: e for dev, e in got.get("baselines", {}).items()}
    for b in measured:
        row, entry = rows[b], got["entries"].get(b)
        if entry is None or entry.get("error"):
            row["rejected"] = f"failed while measuring: {entry.get('error') if entry else 'no result'}"
            continue
        row["latency_ms"] = entry["batches"]
        row["throughput"] = {bs: round(int(bs) / (s["median"] / 1e3), 3) for bs, s in entry["batches"].items()}
        row["measure_s"], row["warmup_s"] = entry["measure_s"], entry["warmup_s"]
        lat = _medians(row)
        value, rejected, what = score(spec.strategy, spec.budget_ms, lat)
        row["score"] = what
        base = baselines.get(row["device"])
        if base is not None and not base.get("error"):
            row["speedup_vs_eager"] = round(speedup(lat, _batch_medians(base["batches"])), 4)
        if rejected:
            row["rejected"] = rejected
        elif spec.min_speedup is not None:
            if row["speedup_vs_eager"] is None:
                row["rejected"] = "eager baseline could not be measured for min_speedup"
            elif row["speedup_vs_eager"] < spec.min_speedup:
                row["rejected"] = f"{row['speedup_vs_eager']:.3g}x eager is below min_speedup {spec.min_speedup:g}"


def _why(spec: Any, rows: dict[str, dict[str, Any]], winner: str) -> str:
    w = rows[winner]
    if spec.strategy == "first_wins":
        tail = f" and reached {spec.min_speedup:g}x eager" if spec.min_speedup is not None else ""
        return f"first candidate in order that built and passed its check{tail} ({w['score']})"
    what = {"min_latency": "lowest median latency", "max_throughput": "highest throughput",
            "latency_budget": "highest throughput within the latency budget"}[spec.strategy]
    others = [b for b, r in rows.items() if b != winner and r["rejected"] is None and r["latency_ms"]]
    if not others:
        return f"{what}: {w['score']}; the only candidate left"
    wv, _, _ = score(spec.strategy, spec.budget_ms, _medians(w))
    runner = min(others, key=lambda b: score(spec.strategy, spec.budget_ms, _medians(rows[b]))[0])
    rv, _, _ = score(spec.strategy, spec.budget_ms, _medians(rows[runner]))
    ratio = (rv / wv) if spec.strategy == "min_latency" else (wv / rv)  # how much worse the runner-up is
    return f"{what}: {w['score']}; next {runner}: {rows[runner]['score']} ({ratio:.2f}x)"


def _store_selection(project: Project, job: _Job, rows: dict[str, dict[str, Any]], winner: str,
                     measurement: dict[str, Any], seconds: float) -> TargetResult:
    import shutil

    from .executor import BUILT, TargetResult
    from .fsutil import atomic_write_json
    from .outputs import materialise, read_record

    name, key, comps = job.name, job.key, job.comps
    spec = project.manifest.model.targets[name]
    wname = candidate_target(name, winner)
    wfolder = project.target_dir(wname)
    wrec = read_record(wfolder)
    if wrec is None:
        raise RuntimeError(f"{wname}: build.json vanished after its build")
    why = _why(spec, rows, winner)
    model = device_model(comps["device"])
    selection = {
        "format": SELECTION_FORMAT, "target": name, "key": key, "strategy": spec.strategy, "budget_ms": spec.budget_ms,
        "min_speedup": spec.min_speedup, "batch": comps["select"]["batch"], "device": model, "settings": SETTINGS,
        "candidates": list(rows.values()), "winner": winner, "why": why, "rounds": measurement["rounds"],
        "stable": measurement["stable"], "measure_seconds": round(measurement["seconds"], 3),
        "processes": measurement["processes"],
        "baselines": measurement.get("baselines", {}), "measured_at": time.time(),
    }
    store = project.store
    tmp = store.new_tmp()
    try:
        for fname in wrec["files"]:
            (tmp / fname).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(wfolder / fname, tmp / fname)
        atomic_write_json(tmp / SELECTION, selection)
        meta = {
            "target": name, "key": key, "backend": wrec["backend"], "artifact": wrec["artifact"], "components": comps,
            "toolchain": wrec["toolchain"], "timings": {"select": round(seconds, 3), "measure": selection["measure_seconds"]},
            "check": wrec["check"], "record": wrec.get("record", {}),
            "winner": {"backend": winner, "target": wname, "key": wrec["key"], "components": wrec["components"]},
            "selection": {"winner": winner, "strategy": spec.strategy, "why": why, "device": model},
            "built_at": time.time(), "source": "built",
        }
        folder = project.target_dir(name)
        if store.readonly:
            from .store import describe_files

            materialise(folder, tmp, describe_files(tmp), meta)
        else:
            entry = store.put(key, tmp, meta)
            materialise(folder, entry.path, entry.files, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = sum(1 for r in rows.values() if r["latency_ms"])
    return TargetResult(name, BUILT, key, reason=f"measured {n} candidate(s) in {selection['measure_seconds']:.1f}s; "
                                                 f"winner {winner}: {why}", record=read_record(folder) or meta)


def process_counts(devices: set[str]) -> tuple[int, int]:
    """(at least, at most) how many measuring processes a measurement on these devices runs."""
    if "cuda" in devices:
        return SETTINGS["cuda_processes"], SETTINGS["cuda_processes"]
    return SETTINGS["processes"], max(SETTINGS["processes"], SETTINGS["max_processes"])


def _combined_entry(per: list[dict[str, Any] | None]) -> dict[str, Any]:
    """One candidate's result over the measuring processes: per batch size the median of the per-process medians
    (one process's thread regime does not decide it), the per-process medians, and their spread across processes."""
    import statistics

    err = next(((e or {}).get("error") or "no result" for e in per if e is None or e.get("error")), None)
    got = [e for e in per if e is not None]
    out: dict[str, Any] = {"batches": {}, "measure_s": round(sum(e.get("measure_s") or 0.0 for e in got), 3),
                           "warmup_s": round(sum(e.get("warmup_s") or 0.0 for e in got), 3), "error": err}
    if err is not None:
        return out
    for b in got[0]["batches"]:
        st = [e["batches"][b] for e in got]
        meds = [s["median"] for s in st]
        med = statistics.median(meds)
        out["batches"][b] = {
            "median": round(med, 6), "p10": round(statistics.median(s["p10"] for s in st), 6),
            "p90": round(statistics.median(s["p90"] for s in st), 6),
            "spread": round(statistics.median(s["spread"] for s in st), 4),  # within a process (IQR / median)
            "samples": sum(s["samples"] for s in st), "process_medians": meds,
            "process_spread": round((max(meds) - min(meds)) / med, 4) if med else 0.0,  # across processes
        }
    return out


def combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One measurement from the results of one or more measuring processes (run_measurement's, in order)."""
    ids = list(dict.fromkeys(k for r in results for k in r["entries"]))
    devs = list(dict.fromkeys(k for r in results for k in r.get("baselines", {})))
    return {
        "entries": {k: _combined_entry([r["entries"].get(k) for r in results]) for k in ids},
        "baselines": {d: _combined_entry([r.get("baselines", {}).get(d) for r in results]) for d in devs},
        "rounds": sum(r["rounds"] for r in results), "stable": all(r["stable"] for r in results),
        "seconds": round(sum(r["seconds"] for r in results), 3),
        "processes": [{"candidates": list(r["entries"]), "rounds": r["rounds"], "stable": r["stable"],
                       "seconds": r["seconds"], "ranking": r.get("ranking")} for r in results],
    }


def process_ranking(spec: Any, devices: dict[str, str], result: dict[str, Any]) -> list[str]:
    """One measuring process's ranking of its candidates (best first) by its own medians."""
    lat = {k: _batch_medians(e["batches"]) for k, e in result["entries"].items() if not e.get("error") and e.get("batches")}
    base = {d: _batch_medians(e["batches"]) for d, e in result.get("baselines", {}).items()
            if not e.get("error") and e.get("batches")}
    return ranking(spec.strategy, spec.budget_ms, spec.min_speedup, lat, base, devices)


def _measure(project: Project, target: str, backends: list[str], runner: Runner) -> dict[str, Any]:
    """Time the built candidates, interleaved, in `processes` separate measuring processes (CPU; one more while
    their winners disagree, up to `max_processes`) or one (GPU); eager baselines too when min_speedup is set."""
    from .executor import _NoLock
    from .outputs import LOG

    man = project.manifest.model
    spec = man.targets[target]
    devices = {man.backends[b].device for b in backends}
    batches, dynamic = measured_batches(project.manifest, target)
    folder = project.target_dir(target)
    folder.mkdir(parents=True, exist_ok=True)
    least, most = process_counts(devices)
    job = {
        "manifest": str(project.manifest.path), "target": target, "batch": batches, "dynamic_batch": dynamic,
        "candidates": [{"id": b, "target": candidate_target(target, b), "device": man.backends[b].device} for b in backends],
        "baselines": sorted(devices) if spec.min_speedup is not None else [],
        "strategy": spec.strategy, "budget_ms": spec.budget_ms, "min_speedup": spec.min_speedup,
        "settings": {**SETTINGS, "cap_s": SETTINGS["cap_s"] / most},  # the cap per candidate is for all processes
    }
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    by_device = {b: man.backends[b].device for b in backends}
    results: list[dict[str, Any]] = []
    # Measured alone on its GPU: the GPU is held as for a compile (gpus.GpuPool: per-GPU locks shared by every
    # aitune-build on this host), so no compile of this build or another runs on it meanwhile.
    with open(folder / LOG, "ab") as log, runner.measuring_gpu() if "cuda" in devices else _NoLock() as gpu:
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu.visible_devices
        crashed: dict[str, dict[str, Any]] = {}  # candidates whose measuring process died with them alone
        while len(results) < most:
            got = run_measuring_process(job, folder, env, log)
            if got.get("failed") and not crashed and len(job["candidates"]) > 1:
                # The process died (a segfault in one candidate's engine, say): which candidate? Each alone, then
                # the others together again, so one crashing candidate is rejected and the rest still measured.
                crashed = crashing_candidates(job, folder, env, log)
                if crashed and len(crashed) < len(job["candidates"]):
                    job = {**job, "candidates": [c for c in job["candidates"] if c["id"] not in crashed]}
                    continue
            got["entries"].update(crashed)
            results.append(got)
            if got.get("failed"):
                break
            got["ranking"] = process_ranking(spec, by_device, got)
            winners = {(r["ranking"] or [None])[0] for r in results}
            if len(results) >= least and len(winners) == 1:
                break
    return combine(results)


def crashing_candidates(job: dict[str, Any], folder: Path, env: dict[str, str], log: Any) -> dict[str, dict[str, Any]]:
    """After a measuring process died: each candidate measured alone; {id: its error entry} for those whose process
    died too (each alone means: not interleaved with the others, so those timings are not used)."""
    crashed = {}
    for c in job["candidates"]:
        alone = run_measuring_process({**job, "candidates": [c], "baselines": []}, folder, env, log)
        if alone.get("failed"):
            entry = alone["entries"][c["id"]]
            crashed[c["id"]] = {**entry, "error": f"{entry['error']}, measuring it alone (the others were measured "
                                "without it)"}
    return crashed


def run_measuring_process(job: dict[str, Any], folder: Path, env: dict[str, str], log: Any) -> dict[str, Any]:
    """Run `python -m aitune_build.tune` once on `job` (a temporary job file in `folder`); its result, or one that
    marks every candidate failed (with "failed": True) when the process did not finish."""
    import subprocess
    import tempfile

    fd, tmpname = tempfile.mkstemp(prefix=".measure-", suffix=".json", dir=folder)
    os.close(fd)
    job_path, result_path = Path(tmpname), Path(tmpname + ".result")
    try:
        job_path.write_text(json.dumps({**job, "result": str(result_path)}))
        log.flush()
        proc = subprocess.run([sys.executable, "-m", "aitune_build.tune", str(job_path)], stdout=log,
                              stderr=subprocess.STDOUT, env=env)
        got = json.loads(result_path.read_text()) if result_path.exists() else None
        if proc.returncode != 0 or got is None:
            why = f"the measuring process exited with code {proc.returncode} (log: {Path(log.name)})"
            return {"entries": {c["id"]: {"error": why} for c in job["candidates"]}, "rounds": 0, "stable": False,
                    "seconds": 0.0, "failed": True}
        return got
    finally:
        job_path.unlink(missing_ok=True)
        result_path.unlink(missing_ok=True)


# --- what status / explain show -------------------------------------------------------------------------------------


def read_selection(project: Project, target: str) -> dict[str, Any] | None:
    """The selection.json materialised in a tuned target's folder, or None (never selected, or not a tuned target)."""
    from .fsutil import read_json

    if project.manifest.model.targets[target].candidates is None:
        return None
    sel = read_json(project.target_dir(target) / SELECTION)
    return sel if sel is not None and sel.get("format") == SELECTION_FORMAT else None


def table(selection: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per candidate, in the manifest's order: what `status` and `explain` print."""
    rows = []
    for c in selection["candidates"]:
        lat = {int(b): (s["median"], s["spread"]) for b, s in c["latency_ms"].items()}
        chk = c.get("check") or {}
        if c["backend"] == selection["winner"]:
            verdict = "winner"
        elif c["rejected"]:
            verdict = f"rejected: {c['rejected']}"
        else:
            verdict = "measured"
        rows.append({"backend": c["backend"], "kind": c["kind"], "build": c["build"], "latency_ms": lat,
                     "throughput": {int(b): t for b, t in c["throughput"].items()}, "speedup_vs_eager": c["speedup_vs_eager"],
                     "max_rel_err": chk.get("max_rel_err"), "verdict": verdict})
    return rows


def candidate_changes(project: Project, target: str) -> dict[str, list[dict[str, Any]]]:
    """For `explain`: each candidate's changed key components since its own last build."""
    from .keys import component_changes
    from .outputs import read_record
    from .reasons import NEVER_BUILT

    spec = project.manifest.model.targets[target]
    up_digest = None
    if spec.from_ is not None:
        up = read_record(project.target_dir(spec.from_))
        up_digest = up["files"][up["artifact"]]["xxh3"] if up else None
    sel = read_selection(project, target) or {"candidates": []}
    measured = {c["backend"]: c.get("components") for c in sel["candidates"]}
    out: dict[str, list[dict[str, Any]]] = {}
    for b in spec.candidates or ():
        cname = candidate_target(target, b)
        last = measured.get(b) or (read_record(project.target_dir(cname)) or {}).get("components")
        now = project.fingerprinter.components(cname, up_digest)
        out[b] = [NEVER_BUILT] if last is None else component_changes(last, now)
    return out


# --- the measuring process ------------------------------------------------------------------------------------------


def _stats(samples: list[float]) -> dict[str, Any]:
    s = sorted(samples)

    def q(p: float) -> float:
        i = (len(s) - 1) * p
        lo, hi = int(math.floor(i)), int(math.ceil(i))
        return s[lo] + (s[hi] - s[lo]) * (i - lo)

    med = q(0.5)
    return {"median": round(med, 6), "p10": round(q(0.1), 6), "p90": round(q(0.9), 6),
            "spread": round((q(0.75) - q(0.25)) / med, 4) if med else 0.0, "samples": len(s)}


def run_measurement(job: dict[str, Any]) -> dict[str, Any]:
    import gc
    import statistics

    import torch

    from .inputs import make_inputs
    from .manifest import Axis, InputSpec, batch_axes
    from .project import Project
    from .runtime import load

    settings = job["settings"]
    manifest = Path(job["manifest"])
    project = Project.open(manifest)
    m = project.manifest
    module_name, mod = m.module_of(job["target"])
    axes = set(batch_axes(mod.inputs)) if job["dynamic_batch"] else set()

    def specs_at(b: int) -> list[InputSpec]:
        out = []
        for i, s in enumerate(mod.inputs):
            shape = tuple(b if (i, j) in axes else d for j, d in enumerate(s.shape))
            out.append(InputSpec(name=s.name, shape=shape, dtype=s.dtype, range=s.range, sample=s.sample))
        return out

    inputs = {(dev, b): make_inputs(specs_at(b), "opt", seed=0, root=m.root, device=dev)
              for dev in {c["device"] for c in job["candidates"]} | set(job["baselines"]) for b in job["batch"]}
    entries: dict[str, dict[str, Any]] = {}
    fns: dict[str, Any] = {}
    devices: dict[str, str] = {}
    for c in job["candidates"]:
        entries[c["id"]] = {"batches": {}, "measure_s": 0.0, "warmup_s": 0.0, "error": None}
        devices[c["id"]] = c["device"]
        try:
            fns[c["id"]] = load(c["target"], manifest=manifest)
        except Exception as e:  # a candidate that cannot be loaded is rejected, the others are measured
            entries[c["id"]]["error"] = f"load: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    base_ids = {}
    for dev in job["baselines"]:
        same = next((c["id"] for c in job["candidates"] if c["device"] == dev and fns.get(c["id"]) is not None
                     and project.manifest.model.backends[c["id"]].kind == "eager"), None)
        if same is not None:
            base_ids[dev] = same
            continue
        from .factory import make_module

        bid = f"eager@{dev}"
        base_ids[dev] = bid
        entries[bid] = {"batches": {}, "measure_s": 0.0, "warmup_s": 0.0, "error": None}
        devices[bid] = dev
        module = make_module(m, module_name, mod, dev)
        fns[bid] = lambda _m=module, **kw: _m(**kw)

    def timed(cid: str, b: int, n: int) -> list[float]:
        fn, x = fns[cid], inputs[devices[cid], b]
        if devices[cid] == "cuda":
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            for i in range(n):
                starts[i].record()
                fn(**x)
                ends[i].record()
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in zip(starts, ends)]
        out = []
        start = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            fn(**x)
            t1 = time.perf_counter()
            out.append((t1 - t0) * 1e3)
            if t1 - start > 2 * settings["block_s"] and len(out) >= 3:
                break  # slower than the warm-up said (a preempted host): keep the round short
        return out

    def calls_per_block(latencies_ms: list[float]) -> int:
        return max(3, min(1000, math.ceil(settings["block_s"] * 1e3 / max(statistics.median(latencies_ms), 1e-6))))

    def sync(cid: str) -> None:
        if devices[cid] == "cuda":
            torch.cuda.synchronize()

    live = [cid for cid in entries if entries[cid]["error"] is None]
    reps: dict[tuple[str, int], int] = {}
    samples: dict[tuple[str, int], list[float]] = {}
    t_start = time.perf_counter()
    with torch.no_grad():
        for cid in list(live):  # warm-up: the first call may compile; then about warmup_s of calls
            try:
                for b in job["batch"]:
                    t0 = time.perf_counter()
                    fns[cid](**inputs[devices[cid], b])
                    sync(cid)
                    calls: list[float] = []
                    t1 = time.perf_counter()
                    while len(calls) < 3 or time.perf_counter() - t1 < settings["warmup_s"]:
                        t2 = time.perf_counter()
                        fns[cid](**inputs[devices[cid], b])
                        sync(cid)
                        calls.append(time.perf_counter() - t2)
                    entries[cid]["warmup_s"] += time.perf_counter() - t0
                    reps[cid, b] = calls_per_block([c * 1e3 for c in calls])
                    samples[cid, b] = []
            except Exception as e:
                entries[cid]["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                live.remove(cid)
        history: list[tuple[str, ...]] = []
        rounds = 0
        stable = False
        gc.collect()
        while live:
            rounds += 1
            shift = rounds % len(live)
            order = live[shift:] + live[:shift]  # interleaved, and each round starts at another candidate
            gc.disable()
            try:
                for b in job["batch"]:
                    for cid in order:
                        t0 = time.perf_counter()
                        block = timed(cid, b, reps[cid, b])
                        entries[cid]["measure_s"] += time.perf_counter() - t0
                        samples[cid, b] += block
                        reps[cid, b] = calls_per_block(block)
            finally:
                gc.enable()
            medians = {cid: {b: statistics.median(samples[cid, b]) for b in job["batch"]} for cid in live}
            cands = {cid: v for cid, v in medians.items() if cid in {c["id"] for c in job["candidates"]}}
            baselines = {dev: medians[bid] for dev, bid in base_ids.items() if bid in medians}
            history.append(tuple(ranking(job["strategy"], job["budget_ms"], job["min_speedup"], cands, baselines, devices)))
            if rounds >= settings["min_rounds"] and len(history) >= settings["stable_rounds"] \
                    and len(set(history[-settings["stable_rounds"]:])) == 1:
                stable = True
                break
            if max(entries[cid]["measure_s"] for cid in live) >= settings["cap_s"]:
                break
    for cid in live:
        entries[cid]["batches"] = {str(b): _stats(samples[cid, b]) for b in job["batch"]}
    for e in entries.values():
        e["measure_s"], e["warmup_s"] = round(e["measure_s"], 3), round(e["warmup_s"], 3)
    baselines_out = {dev: entries[bid] for dev, bid in base_ids.items()}
    cand_ids = {c["id"] for c in job["candidates"]}
    return {"entries": {k: v for k, v in entries.items() if k in cand_ids}, "baselines": baselines_out, "rounds": rounds,
            "stable": stable, "seconds": round(time.perf_counter() - t_start, 3),
            "device": torch.cuda.get_device_name(0) if "cuda" in devices.values() else None}


def main(argv: list[str]) -> int:
    from .fsutil import atomic_write_json

    job = json.loads(Path(argv[0]).read_text())
    result = run_measurement(job)
    atomic_write_json(Path(job["result"]), result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
