"""The command line: parsing and formatting only; the work is done by plan, executor, store and friends."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import click

from .errors import AituneError, UserError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _DefaultToBuild(click.Group):
    """`aitune-build [build] [TARGET...]`: anything that is not a command name is a build argument."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        args = list(args)
        i = 0
        while i < len(args):
            a = args[i]
            if a in ("-C", "--manifest"):
                i += 2
                continue
            if a.startswith(("--manifest=", "-C")) or a in ("--help", "--version"):
                i += 1
                continue
            break
        if i >= len(args) or args[i] not in self.commands:
            if not any(a in ("--help", "--version") for a in args[:i]):
                args.insert(i, "build")
                ctx.meta["aitune.implicit_build"] = True  # `aitune-build bulid`: a typo of a command, or a target?
        return super().parse_args(ctx, args)


class _Ctx:
    def __init__(self, directory: str | None, manifest: str | None):
        self.directory = directory
        self.manifest = manifest

    def manifest_path(self) -> Path:
        if self.directory:
            try:
                os.chdir(self.directory)
            except OSError as e:
                raise UserError(f"-C {self.directory}: {e.strerror}") from None
        return Path(self.manifest or "aitune.toml")

    def open(self, readonly_cache: bool = False, gpus: str | None = None, gpu_model: str | None = None,
             remote_readonly: bool = False, no_remote: bool = False) -> Any:
        """The project, closed (its stat cache saved, remote uploads waited for) when the command ends, however it ends."""
        from .project import Project

        project = Project.open(self.manifest_path(), readonly_cache=readonly_cache, gpus=gpus, gpu_model=gpu_model)
        project.remote_mode = "read" if remote_readonly else None
        project.remote_disabled = no_remote
        click.get_current_context().call_on_close(project.close)
        return project


def _remote_options(fn: Any) -> Any:
    fn = click.option("--no-remote", is_flag=True, help="Ignore the remote cache for this run.")(fn)
    return click.option("--remote-readonly", is_flag=True, help="Read the remote cache, never upload (pull requests).")(fn)


def _run(fn: Any) -> None:
    """Print user errors as one line (exit 2), other known errors likewise (exit 1); keep tracebacks for bugs."""
    try:
        code = fn()
    except UserError as e:
        click.echo(f"aitune-build: error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    except BrokenPipeError:  # `aitune-build graph | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        sys.exit(0)
    except AituneError as e:
        click.echo(f"aitune-build: error: {e}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:  # disk full, read-only or vanished folders: the environment, not a bug
        from .paths import io_problem

        click.echo(f"aitune-build: error: {io_problem(e)}", err=True)
        sys.exit(EXIT_FAILED)
    except RecursionError:
        click.echo("aitune-build: error: input nested too deeply", err=True)
        sys.exit(EXIT_USAGE)
    sys.exit(code or 0)


@click.group(cls=_DefaultToBuild)
@click.option("-C", "directory", metavar="DIR", help="Run as if started in DIR.")
@click.option("--manifest", metavar="PATH", help="Manifest file (default: aitune.toml).")
@click.version_option(package_name="aitune-build", prog_name="aitune-build")
@click.pass_context
def main(ctx: click.Context, directory: str | None, manifest: str | None) -> None:
    """Make-like builds of compiled PyTorch models, declared in aitune.toml."""
    ctx.obj = _Ctx(directory, manifest)


@main.command("build")
@click.argument("targets", nargs=-1)
@click.option("-j", "--jobs", default=1, show_default=True, type=click.IntRange(min=1), help="Targets built in parallel.")
@click.option("-k", "--keep-going", is_flag=True, help="Keep building independent targets after a failure.")
@click.option("-f", "--force", is_flag=True, help="Rebuild even when up to date or cached.")
@click.option("-n", "--dry-run", is_flag=True, help="Say what would build and why; build nothing.")
@click.option("--locked", is_flag=True, help="Fail if any key differs from aitune.lock instead of rewriting it.")
@click.option("--cache-readonly", is_flag=True, help="Read the cache, never write it (untrusted builds).")
@click.option("--check-reproducible", is_flag=True, help="Rebuild cached targets of deterministic backends and compare bytes.")
@click.option("--retune", is_flag=True, help="Measure tuned targets' candidates again even if their selection is cached.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@click.option("--gpus", metavar="LIST", help="GPUs to build on, as CUDA_VISIBLE_DEVICES takes them (0,1 or GPU-<uuid>); default: every visible GPU.")
@click.option("--gpu-model", metavar="MODEL", help="Build GPU targets on GPUs of this model only (e.g. H100); overrides [project] gpu_model.")
@click.option("--executor", type=click.Choice(["local", "ray"]), help="Where to compile (default: [project] executor, else local).")
@click.option("--ray-address", metavar="ADDR", help="Ray cluster to use with --executor ray (default: $RAY_ADDRESS).")
@_remote_options
@click.option("-v", "--verbose", is_flag=True, help="Stream each worker's log (build/<target>/build.log).")
@click.pass_obj
def build_cmd(obj: _Ctx, targets: tuple[str, ...], jobs: int, keep_going: bool, force: bool, dry_run: bool,
              locked: bool, cache_readonly: bool, check_reproducible: bool, retune: bool, as_json: bool, gpus: str | None,
              gpu_model: str | None, executor: str | None, ray_address: str | None, remote_readonly: bool,
              no_remote: bool, verbose: bool) -> None:
    """Build TARGETS (default: all) and their upstreams; skip what is up to date."""

    def go() -> int:
        from . import lockfile
        from .executor import BuildOptions, build
        from .status import Status
        from .plan import select
        from .project import survey

        project = obj.open(readonly_cache=cache_readonly, gpus=gpus, gpu_model=gpu_model, remote_readonly=remote_readonly,
                           no_remote=no_remote)
        _command_typo(project.manifest.model.targets, targets)
        order = select(project.manifest.model, targets)
        runner = None
        if (executor or project.manifest.model.project.executor) == "ray":
            from .ray_executor import RayRunner

            runner = RayRunner.connect(project, ray_address, jobs)  # before any key: GPU keys name the cluster's GPU
        seen = None  # the lock as read before the build: update() reads it again only if it changed meanwhile
        if locked or dry_run or not cache_readonly:
            problems: dict[str, list[str]] = {}
            try:
                problems = lockfile.check_locked(project, order) if locked else {}
                if problems:
                    _emit_locked(problems, as_json, lockfile.lock_path(project).name)
                    return EXIT_FAILED
                if not locked and not cache_readonly and not dry_run:
                    seen = lockfile.check_readable(project)  # a malformed lock stops the build before it starts, not after
                if dry_run:
                    return _dry_run(survey(project, order), as_json)
            finally:
                if runner is not None and (problems or dry_run or sys.exc_info()[0] is not None):
                    runner.close()
        reporter = _Reporter(len(order), quiet=as_json, verbose=verbose)
        try:
            results = build(project, order, BuildOptions(jobs=jobs, keep_going=keep_going, force=force, named=targets,
                                                         check_reproducible=check_reproducible, retune=retune), reporter, runner)
        finally:
            reporter.close()
        from .remote import save_run

        save_run(project)
        if not cache_readonly and not locked:
            lockfile.update(project, results, seen)
        drift = lockfile.artifact_drift(project, results) if locked else {}
        summary = {s.value: sum(r.status == s for r in results) for s in Status}
        summary["seconds"] = round(reporter.elapsed(), 3)
        if as_json:
            doc = {"targets": [r.as_json() for r in results], "summary": summary}
            if drift:
                doc["lock_artifacts"] = drift
            if project._remote:
                doc["remote"] = project._remote.summary()
            click.echo(json.dumps(doc, indent=2))
        else:
            click.echo(", ".join(f"{v} {k}" for k, v in summary.items() if k != "seconds") + f" in {summary['seconds']:.2f}s")
            _emit_drift(drift)
        failed = [r for r in results if r.status == Status.FAILED]
        if any(r.error == "user" for r in failed):
            return EXIT_USAGE
        # A deterministic backend that built other bytes than the lock pins is not reproducible: --locked fails.
        return EXIT_FAILED if failed or any(d["deterministic"] for d in drift.values()) else EXIT_OK

    _run(go)


def _command_typo(known_targets: Any, targets: tuple[str, ...]) -> None:
    """`aitune-build bulid`: the first word was taken for a target; if it is none but looks like a command, say so."""
    ctx = click.get_current_context()
    if not targets or targets[0] in known_targets or not ctx.meta.get("aitune.implicit_build"):
        return
    import difflib

    from .errors import did_you_mean

    close = difflib.get_close_matches(targets[0], list(main.commands), n=1, cutoff=0.6)
    if close and not did_you_mean(targets[0], known_targets):
        raise UserError(f"unknown command '{targets[0]}' (did you mean `{close[0]}`?); commands: "
                        f"{', '.join(sorted(main.commands))}; targets: {', '.join(known_targets) or '(none)'}")


def _emit_drift(drift: dict[str, dict[str, Any]]) -> None:
    for name, d in drift.items():
        if d["deterministic"]:
            click.echo(f"aitune-build: error: {name}: not reproducible: built {d['built'][:16]}…, aitune.lock pins "
                       f"{d['locked'][:16]}… for the same key ({d['backend']} builds should be bit-for-bit identical)", err=True)
        else:
            click.echo(f"aitune-build: note: {name}: artifact bytes differ from aitune.lock ({d['backend']} builds are "
                       "not bit-for-bit deterministic; the key matches)", err=True)


def _emit_locked(problems: dict[str, list[str]], as_json: bool, lock_name: str) -> None:
    if as_json:
        click.echo(json.dumps({"locked": False, "targets": problems}, indent=2))
        return
    click.echo(f"aitune-build: --locked: the inputs differ from {lock_name}:", err=True)
    for name, lines in problems.items():
        click.echo(f"  {name}:", err=True)
        for line in lines:
            click.echo(f"    {line}", err=True)
    click.echo(f"run `aitune-build build` without --locked to update {lock_name}, and commit it", err=True)


def _dry_run(found: dict[str, Any], as_json: bool) -> int:
    from .project import describe_failure

    rows = []
    for name, s in found.items():
        if s.staleness.state == "error":
            status, reasons = "would-fail", list(s.staleness.reasons)
        elif not s.staleness.stale:
            status, reasons = "up-to-date", []
        elif s.in_store:
            status, reasons = "would-restore", ["would restore from cache", *s.staleness.reasons]
        else:
            status, reasons = "would-build", list(s.staleness.reasons)
        failed = describe_failure(s.failure)
        rows.append({"name": name, "status": status, "key": s.key, "reasons": reasons + ([failed] if failed else []),
                     "changes": s.staleness.changes, "cached": s.in_store, "last_failure": s.failure})
    if as_json:
        click.echo(json.dumps({"targets": rows}, indent=2))
    else:
        for r in rows:
            why = "; ".join(r["reasons"])
            click.echo(f"{r['status']:<12} {r['name']}" + (f"  ({why})" if why else ""))
    return EXIT_OK


def _where(result: Any) -> str:
    """' on GPU 1 (NVIDIA H100 80GB HBM3)', ' on node 3f2a…', or '' (a CPU target built here, or not built)."""
    if result is None:
        return ""
    parts = []
    if getattr(result, "gpu", None):
        parts.append(f"GPU {result.gpu['index']} ({result.gpu['name']})")
    if getattr(result, "node", None):
        parts.append(f"node {result.node[:12]}")
    return " on " + ", ".join(parts) if parts else ""


def _result_lines(name: str, result: Any) -> str:
    """`failed   mlp  0.52s  <first line>` and, below it, at most failures.DETAIL_LINES lines of detail."""
    from .failures import bounded

    head, *detail = bounded(result.reason, more="the --json output and build.log")
    line = f"{result.status:<8} {name:<24} {result.seconds:7.2f}s  {head}{_where(result)}"
    return "\n".join([line, *(f"    {d}" for d in detail)])

    head, *detail = bounded(result.reason, more="the --json output and build.log")
    return "\n".join([f"{result.status:<8} {name:<24} {result.seconds:7.2f}s  {head}", *(f"    {d}" for d in detail)])


HEARTBEAT_ENV = "AITUNE_HEARTBEAT_S"  # seconds between `still building ...` lines without a terminal (default 30)


class _Reporter:
    """Progress. On a terminal: a live line with each running target's elapsed time and phase (rich). Without one
    (CI, pipes): a line when a target starts and when it ends, and a heartbeat every AITUNE_HEARTBEAT_S seconds
    (`still building mlp_aoti (90 s, compiling)`). -v streams each worker's log. Nothing with --json.
    Phases come from the worker's progress file (executor.Listener's "worker" event)."""

    def __init__(self, total: int, quiet: bool, verbose: bool = False):
        import threading
        import time

        self.total, self.quiet, self.verbose, self.done = total, quiet, verbose, 0
        self.running: dict[str, dict[str, Any]] = {}  # name -> {t0, progress, log, offset, beat}
        self.t0 = time.perf_counter()
        self._status = None
        self._console = None
        self.tty = sys.stdout.isatty() and not os.environ.get("CI")
        try:
            self.heartbeat = max(0.05, float(os.environ.get(HEARTBEAT_ENV, "30")))
        except ValueError:
            self.heartbeat = 30.0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def elapsed(self) -> float:
        import time

        return time.perf_counter() - self.t0

    def __call__(self, event: str, name: str, payload: Any) -> None:
        if self.quiet:
            return
        import time

        with self._lock:
            if event == "start":  # payload: a TargetResult "building", with the GPU/node it builds on
                info = self.running.setdefault(name, {"progress": None, "log": None, "offset": 0})
                info.update(t0=time.monotonic(), beat=time.monotonic(), where=_where(payload))
                self._start_ticker()
                if self.tty:
                    self._live()
                else:
                    self._echo(f"building {name}{info['where']} ...")
            elif event == "worker":
                info = self.running.setdefault(name, {"t0": time.monotonic(), "offset": 0, "beat": time.monotonic()})
                info.update(progress=payload["progress"], log=payload["log"], offset=0)
            elif event == "done":
                info = self.running.pop(name, None)
                if info is not None and self.verbose:
                    self._tail(name, info)
                self.done += 1
                self._echo(_result_lines(name, payload))
                if self._console is not None:
                    self._live()

    def _echo(self, line: str) -> None:
        if self._console is not None:
            self._console.print(line, markup=False, highlight=False)
        else:
            click.echo(line)

    @staticmethod
    def phase(info: dict[str, Any]) -> str:
        """The worker's current phase: the last line of its progress file."""
        from .executor import read_phases

        path = info.get("progress")
        phases = read_phases(Path(path)) if path is not None else []
        return phases[-1] if phases else "starting"

    def _start_ticker(self) -> None:
        import threading

        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="aitune-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        import time

        step = min(1.0, self.heartbeat / 2, 0.25 if self.verbose else 1.0)
        while not self._stop.wait(step):
            with self._lock:
                now = time.monotonic()
                for name, info in self.running.items():
                    if self.verbose:
                        self._tail(name, info)
                    if not self.tty and now - info["beat"] >= self.heartbeat:
                        info["beat"] = now
                        self._echo(f"still building {name}{info.get('where', '')} ({now - info['t0']:.0f} s, {self.phase(info)})")
                if self.tty and self.running:
                    self._live()

    def _tail(self, name: str, info: dict[str, Any]) -> None:
        """-v: print what the worker wrote to its log since last time."""
        log = info.get("log")
        if log is None:
            return
        try:
            with open(log, "rb") as f:
                f.seek(info["offset"])
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        if not end:
            return
        info["offset"] += end
        for line in data[:end].decode("utf-8", "replace").splitlines():
            self._echo(f"  [{name}] {line}")

    def _live(self) -> None:
        import time

        if self._console is None:
            from rich.console import Console

            self._console = Console()
            self._status = self._console.status("")
            self._status.start()
        now = time.monotonic()
        running = ", ".join(f"{n}{i.get('where', '')} {now - i.get('t0', now):.0f}s {self.phase(i)}" for n, i in self.running.items())
        self._status.update(f"[{self.done}/{self.total}] " + (running or ""))

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(5)
        if self._status is not None:
            self._status.stop()


@main.command()
@click.argument("targets", nargs=-1)
@click.option("--json", "as_json", is_flag=True)
@_remote_options
@click.pass_obj
def status(obj: _Ctx, targets: tuple[str, ...], as_json: bool, remote_readonly: bool, no_remote: bool) -> None:
    """Up to date, stale (with reasons) or never built; and out of date against aitune.lock."""

    def go() -> int:
        from . import lockfile
        from .plan import select
        from .project import survey

        from .tune import read_selection

        project = obj.open(remote_readonly=remote_readonly, no_remote=no_remote)
        found = survey(project, select(project.manifest.model, targets))
        lock_diff = lockfile.compare(project, found)
        from .project import describe_failure

        rows = []
        for n, s in found.items():
            reasons = list(s.staleness.reasons) + (["cached (not materialised)"] if s.in_store else [])
            failed = describe_failure(s.failure)
            rows.append({"name": n, "state": s.staleness.state, "key": s.key, "reasons": reasons + ([failed] if failed else []),
                         "changes": s.staleness.changes, "cached": s.in_store, "last_failure": s.failure,
                         "lock": lock_diff.get(n, "matches")})
        _mark_remote(project, rows)
        selections = {n: read_selection(project, n) for n in found}
        for r in rows:
            if selections[r["name"]] is not None:
                r["selection"] = selections[r["name"]]
        if as_json:
            click.echo(json.dumps({"targets": rows}, indent=2))
        else:
            for r in rows:
                why = "; ".join(r["reasons"])
                lock = "" if r["lock"] == "matches" else f"  [lock: {r['lock']}]"
                click.echo(f"{r['state']:<12} {r['name']}" + (f"  ({why})" if why else "") + lock)
                for line in _selection_lines(r.get("selection")):
                    click.echo(f"  {line}")
        return EXIT_OK

    _run(go)


def _mark_remote(project: Any, rows: list[dict[str, Any]]) -> None:
    """`up-to-date (remote)` for targets whose current key only the remote cache holds (never the network otherwise)."""
    from .remote import configured

    if configured(project)[0] is None or project.remote_disabled:
        return
    wanted = [r for r in rows if r["state"] != "up-to-date" and r["key"] is not None]
    if not wanted or project.remote is None:
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        held = list(pool.map(lambda r: project.remote.has(r["key"]), wanted))
    for r, h in zip(wanted, held):
        if h:
            r["state"] = "up-to-date (remote)"
            r["reasons"] = [*r["reasons"], f"the remote cache holds key {r['key']}"]


@main.command()
@click.argument("target")
@click.option("--json", "as_json", is_flag=True)
@click.option("--remote", "against_remote", is_flag=True, help="Compare with what the remote cache holds for TARGET.")
@click.pass_obj
def explain(obj: _Ctx, target: str, as_json: bool, against_remote: bool) -> None:
    """Which key components changed since TARGET's last build: the answer to "why did this rebuild?"."""
    if against_remote:
        _run(lambda: _explain_remote(obj, target, as_json))
        return

    def go() -> int:
        from .keys import component_changes
        from .outputs import read_record
        from .reasons import NEVER_BUILT, describe
        from .plan import select
        from .project import survey

        from .tune import candidate_changes, read_selection

        project = obj.open()
        found = survey(project, select(project.manifest.model, [target]))[target]
        tuned = project.manifest.model.targets[target].candidates is not None
        per_candidate = candidate_changes(project, target) if tuned and found.components is not None else {}
        project.close()
        last = read_record(project.target_dir(target))
        if found.components is None:
            changes = found.staleness.changes
        elif last is None:
            changes = [NEVER_BUILT]
        else:
            changes = component_changes(last.get("components", {}), found.components)
            if tuned:  # "candidates.B: <key> -> <key>" says little: say what changed in each candidate
                changes = [c for c in changes if c["component"] != "candidates"]
                changes += [{**c, "candidate": b} for b, cs in per_candidate.items() for c in cs]
        selection = read_selection(project, target) if tuned else None
        from .project import describe_failure

        failed = describe_failure(found.failure)
        cached = "cached (not materialised): a build restores it from the cache" if found.in_store else None
        if as_json:
            doc = {"name": target, "state": found.staleness.state, "key": found.key,
                   "previous_key": last.get("key") if last else None, "changes": changes,
                   "reasons": [_describe_change(c) for c in changes], "cached": found.in_store,
                   "last_failure": found.failure, "timings": last.get("timings") if last else None}
            if tuned:
                doc["selection"] = selection
            click.echo(json.dumps(doc, indent=2))
        else:
            click.echo(f"{target}: {found.staleness.state}" + (f"; {cached}" if cached else ""))
            if failed:
                click.echo(f"  {failed}")
            if last and found.key and last.get("key") != found.key:
                click.echo(f"  key {last.get('key')} -> {found.key}")
            for c in changes:
                click.echo(f"  {_describe_change(c)}")
            if not changes and not found.staleness.stale:
                click.echo("  nothing changed since the last build")
            for line in _selection_lines(selection):
                click.echo(f"  {line}")
        return EXIT_OK

    _run(go)


def _explain_remote(obj: _Ctx, target: str, as_json: bool) -> int:
    from .keys import diff_components
    from .plan import select
    from .project import survey
    from .remote import Outage, require

    project = obj.open()
    found = survey(project, select(project.manifest.model, [target]))[target]
    remote = require(project)
    doc: dict[str, Any] = {"name": target, "key": found.key, "remote": remote.display, "remote_key": None, "holds": False}
    if found.components is None:
        doc["changes"] = found.staleness.reasons
    else:
        try:
            pointer = remote.pointer(target, found.components["toolchain"])
            doc["holds"] = remote.has(found.key)
        except Outage as e:
            raise AituneError(f"remote cache {remote.display} unavailable: {e}") from None
        if pointer is None:
            doc["changes"] = [f"the remote has no upload of '{target}' from project '{project.manifest.model.project.name}'"]
        else:
            doc["remote_key"] = pointer["key"]
            doc["changes"] = diff_components(pointer["components"], found.components) if pointer["key"] != found.key else []
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return EXIT_OK
    click.echo(f"{target}: {'the remote cache holds this key' if doc['holds'] else 'not in the remote cache'} ({doc['remote']})")
    if doc["remote_key"] and doc["remote_key"] != found.key:
        click.echo(f"  remote's last upload {doc['remote_key']} -> here {found.key}")
    for line in doc["changes"]:
        click.echo(f"  {line}")
    return EXIT_OK


def _describe_change(c: dict[str, Any]) -> str:
    """A change as text; a tuned target's candidate changes name their candidate."""
    from .reasons import describe

    return (f"candidate {c['candidate']}: " if c.get("candidate") else "") + describe(c)


def _selection_lines(selection: dict[str, Any] | None) -> list[str]:
    """A tuned target's measurement table and why its winner won (status, explain)."""
    if selection is None:
        return []
    from .tune import table

    batches = selection["batch"]
    lines = [f"selection: {selection['strategy']} on {selection['device']}, batch {', '.join(map(str, batches))}; "
             f"winner {selection['winner']}: {selection['why']}"]
    cols = [f"b={b} ms (spread)" for b in batches] + [f"items/s b={batches[-1]}", "vs eager", "max rel err"]
    lines.append(f"{'candidate':<16} {'kind':<20}" + "".join(f" {c:>18}" for c in cols) + "  verdict")
    for r in table(selection):
        cells = []
        for b in batches:
            median, spread = r["latency_ms"].get(b, (None, None))
            cells.append("-" if median is None else f"{median:.4g} ({spread:.0%})")
        thr, up, err = r["throughput"].get(batches[-1]), r["speedup_vs_eager"], r["max_rel_err"]
        cells += ["-" if thr is None else f"{thr:.4g}", "-" if up is None else f"{up:.2f}x", "-" if err is None else f"{err:.2g}"]
        lines.append(f"{r['backend']:<16} {r['kind']:<20}" + "".join(f" {c:>18}" for c in cells) + f"  {r['verdict']}")
    return lines


@main.command()
@click.option("--format", "fmt", type=click.Choice(["dot", "mermaid", "json"]), default="dot", show_default=True)
@click.pass_obj
def graph(obj: _Ctx, fmt: str) -> None:
    """The target graph: modules and `from` edges."""

    def go() -> int:
        project = obj.open()
        project.close()
        man = project.manifest.model
        edges = []
        for name, t in man.targets.items():
            src = f"module:{t.module}" if t.module else t.from_
            if t.candidates is not None:  # a tuned target: its candidates "T@B" feed its selection
                edges += [(f"{name}@{b}", name, f"select:{t.strategy}") for b in t.candidates]
            else:
                edges.append((src, name, man.backends[t.backend].kind))
        if fmt == "json":
            click.echo(json.dumps({"edges": [{"from": a, "to": b, "backend": k} for a, b, k in edges]}, indent=2))
        elif fmt == "dot":
            click.echo("digraph aitune {\n  rankdir=LR;")
            for m in man.modules:
                click.echo(f'  "module:{m}" [shape=box];')
            for a, b, k in edges:
                click.echo(f'  "{a}" -> "{b}" [label="{k}"];')
            click.echo("}")
        else:
            ident = lambda s: re.sub(r"[^A-Za-z0-9_]", "_", s)  # noqa: E731
            click.echo("graph LR")
            for m in man.modules:
                click.echo(f'  {ident("module:" + m)}["{m}"]')
            for a, b, k in edges:
                click.echo(f'  {ident(a)} -->|{k}| {ident(b)}["{b}"]')
        return EXIT_OK

    _run(go)


@main.command()
@click.argument("targets", nargs=-1)
@click.option("--cache", is_flag=True, help="Also empty the whole cache.")
@click.pass_obj
def clean(obj: _Ctx, targets: tuple[str, ...], cache: bool) -> None:
    """Remove materialised outputs (of TARGETS, default all)."""

    def go() -> int:
        from .paths import clean_cache, owns_out_dir, remove_owned
        from .plan import select

        project = obj.open()
        names = list(targets) if targets else select(project.manifest.model, [])  # all (a tuned target's folder holds its candidates')
        select(project.manifest.model, names)  # validates the names
        out = project.out_dir
        if out.exists() and not owns_out_dir(out):
            raise project.manifest.error("project.out_dir", f"{out} was not created by aitune-build (no .aitune-out "
                                         "marker in it); nothing removed")
        for n in names:
            if out.exists() and remove_owned(project.target_dir(n), out):
                click.echo(f"removed {project.target_dir(n)}")
        if cache:
            try:
                removed = clean_cache(project.cache_dir)
            except UserError as e:
                if os.environ.get("AITUNE_CACHE_DIR"):
                    raise UserError(f"AITUNE_CACHE_DIR: {e}") from None
                raise project.manifest.error("project.cache_dir", str(e)) from None
            for p in removed:
                click.echo(f"removed {p}")
        return EXIT_OK

    _run(go)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.I)


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise UserError(f"--max-size: cannot read '{text}' as a size (e.g. 500M, 2G, 1024)")
    unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(unit or " "))


@main.command()
@click.option("--max-size", required=True, help="Keep at most this much (e.g. 2G); least recently used go first.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def gc(obj: _Ctx, max_size: str, as_json: bool) -> None:
    """Shrink the cache to --max-size, least recently used entries first."""

    def go() -> int:
        limit = parse_size(max_size)
        project = obj.open()
        removed = project.store.gc(limit)
        left = sum(e[2] for e in project.store.entries())
        if as_json:
            click.echo(json.dumps({"removed": removed, "bytes_left": left}, indent=2))
        else:
            click.echo(f"removed {len(removed)} entries; {left} bytes left")
        return EXIT_OK

    _run(go)


@main.group()
def cache() -> None:
    """The shared remote cache: push, pull, stats, prune."""


def _print_outcomes(outcomes: dict[str, str], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"targets": outcomes}, indent=2))
    else:
        for name, what in outcomes.items():
            click.echo(f"{name:<24} {what}")


@cache.command("push")
@click.argument("targets", nargs=-1)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def cache_push(obj: _Ctx, targets: tuple[str, ...], as_json: bool) -> None:
    """Upload what is built locally (TARGETS and their upstreams; default all), e.g. from a nightly job."""

    def go() -> int:
        from .remote import push

        project = obj.open()
        outcomes = push(project, targets)
        _print_outcomes(outcomes, as_json)
        return EXIT_FAILED if any(v.startswith("remote unavailable") for v in outcomes.values()) else EXIT_OK

    _run(go)


@cache.command("pull")
@click.argument("targets", nargs=-1)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def cache_pull(obj: _Ctx, targets: tuple[str, ...], as_json: bool) -> None:
    """Download TARGETS' current entries into the local cache (default all), e.g. before an offline job."""

    def go() -> int:
        from .remote import pull

        project = obj.open()
        outcomes = pull(project, targets)
        _print_outcomes(outcomes, as_json)
        return EXIT_OK

    _run(go)


@cache.command("stats")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def cache_stats(obj: _Ctx, as_json: bool) -> None:
    """Entries and bytes in the local and the remote cache, and the last build's remote hits and uploads."""

    def go() -> int:
        from .remote import stats

        project = obj.open()
        doc = stats(project)
        if as_json:
            click.echo(json.dumps(doc, indent=2))
            return EXIT_OK
        loc = doc["local"]
        click.echo(f"local   {loc['entries']} entries, {loc['bytes']} bytes  ({loc['path']})")
        rem = doc["remote"]
        if rem is None:
            click.echo("remote  none configured")
        elif "unavailable" in rem:
            click.echo(f"remote  {rem['url']}: unavailable ({rem['unavailable']})")
        else:
            click.echo(f"remote  {rem['entries']} entries, {rem['blobs']} blobs, {rem['bytes']} bytes  ({rem['url']}, {rem['mode']})")
        last = doc["last_build"]
        if last:
            click.echo(f"last build: {last['hits']} downloaded, {last['misses']} missed ({last['corrupt']} corrupt), "
                       f"{last['uploaded']} uploaded, {last['bytes_down']} bytes down, {last['bytes_up']} bytes up")
        return EXIT_OK

    _run(go)


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


@cache.command("prune")
@click.option("--remote", "remote_flag", is_flag=True, required=True, help="Prune the remote cache (gc prunes the local one).")
@click.option("--older-than", required=True, help="Age of entries to delete, e.g. 30d, 12h.")
@click.option("-n", "--dry-run", is_flag=True, help="Say what would go; delete nothing.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def cache_prune(obj: _Ctx, remote_flag: bool, older_than: str, dry_run: bool, as_json: bool) -> None:
    """Delete remote entries uploaded more than --older-than ago, and the blobs only they used."""

    def go() -> int:
        from .remote import Outage, require

        m = _AGE.match(older_than)
        if not remote_flag or not m:
            raise UserError(f"--older-than: cannot read '{older_than}' as an age (e.g. 30d, 12h)")
        seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        project = obj.open()
        remote = require(project, write=True)
        try:
            doc = remote.prune(seconds, dry_run=dry_run)
        except Outage as e:
            raise AituneError(f"remote cache {remote.display} unavailable: {e}") from None
        if as_json:
            click.echo(json.dumps(doc, indent=2))
        else:
            verb = "would remove" if dry_run else "removed"
            click.echo(f"{verb} {doc['entries_removed']} entries and {doc['blobs_removed']} blobs ({doc['bytes_freed']} bytes)")
        return EXIT_OK

    _run(go)


@main.group()
def server() -> None:
    """The persistent build servers (AITUNE_BUILD_SERVER=1): status, stop."""


def _servers_json(stop: bool = False) -> list[dict[str, Any]]:
    import time

    from .daemon import servers

    return [{"socket": str(path), "pid": hello.get("pid"), "up_s": round(time.time() - hello.get("since", time.time()), 1),
             "imports_s": round(hello.get("imports", 0.0), 2), "modules": hello.get("modules"),
             "builds_connected": max(0, hello.get("clients", 1) - 1)} for path, hello in servers(stop)]


@server.command("status")
@click.option("--json", "as_json", is_flag=True)
def server_status(as_json: bool) -> None:
    """List this user's build servers that answer."""
    found = _servers_json()
    if as_json:
        click.echo(json.dumps({"servers": found}, indent=2))
        return
    if not found:
        click.echo("no build server running (AITUNE_BUILD_SERVER=1 keeps one up between builds)")
    for row in found:
        click.echo(f"pid {row['pid']}: up {row['up_s']:.0f} s, {row['builds_connected']} build(s) connected, "
                   f"{row['modules']} modules preloaded in {row['imports_s']} s ({row['socket']})")


@server.command("start")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def server_start(obj: _Ctx, as_json: bool) -> None:
    """Start the build server for this project's backends now (e.g. while a CI job checks out), so that the first
    build with AITUNE_BUILD_SERVER set finds it warm. Without AITUNE_BUILD_SERVER it idles out after 600 s."""

    def go() -> int:
        import time

        from .daemon import DEFAULT_IDLE_S, idle_seconds
        from .executor import server_kinds
        from .workers import _ForkServer, fork_unavailable, preload_for

        try:
            idle = idle_seconds() or DEFAULT_IDLE_S
        except ValueError as e:
            raise UserError(f"environment: {e}") from None
        project = obj.open()
        try:
            man = project.manifest.model
            preload = preload_for(server_kinds(man))
        finally:
            project.close()
        t0 = time.perf_counter()
        server = fork_unavailable() or _ForkServer.attach(preload, lambda *_: None, idle)
        took = time.perf_counter() - t0
        if isinstance(server, str):
            raise UserError(f"no build server: {server}")
        up = time.time() - (server.since or time.time())
        server.close()
        if as_json:
            click.echo(json.dumps({"pid": server.pid, "seconds": round(took, 3), "up_s": round(up, 1), "idle_s": idle}))
        else:
            click.echo(f"build server pid {server.pid} ready in {took:.1f} s (up {up:.0f} s; exits after {idle:.0f} s idle)")
        return 0

    _run(go)


@server.command("stop")
@click.option("--json", "as_json", is_flag=True)
def server_stop(as_json: bool) -> None:
    """Stop this user's build servers: they take no new build, and exit once the builds connected to them end."""
    stopped = [row["pid"] for row in _servers_json(stop=True)]
    if as_json:
        click.echo(json.dumps({"stopped": stopped}, indent=2))
    else:
        click.echo(f"stopped {len(stopped)} build server(s)" + (f": pid {', '.join(map(str, stopped))}" if stopped else ""))


@main.command()
def schema() -> None:
    """Print the JSON Schema of aitune.toml."""
    from .schema import manifest_schema

    click.echo(json.dumps(manifest_schema(), indent=2))


@main.command()
@click.argument("targets", nargs=-1)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Archive to write (.tar.gz).")
@click.option("--all-candidates", is_flag=True, help="Tuned targets: ship every built candidate too, not only the winner.")
@click.pass_obj
def package(obj: _Ctx, targets: tuple[str, ...], output: str, all_candidates: bool) -> None:
    """A byte-for-byte reproducible release archive of TARGETS (default: every built target)."""

    def go() -> int:
        from .release import write_archive

        project = obj.open(readonly_cache=True)
        digest = write_archive(project, list(targets), Path(output), candidates=all_candidates)
        click.echo(f"wrote {output}  sha256 {digest}")
        return EXIT_OK

    _run(go)


@main.command()
@click.argument("archive", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def verify(archive: str, as_json: bool) -> None:
    """Check a release archive: every digest, the lock inside, and no path escapes."""

    def go() -> int:
        from .release import verify_archive

        problem = verify_archive(Path(archive))
        if as_json:
            click.echo(json.dumps({"archive": archive, "ok": problem is None, "problem": problem}, indent=2))
        elif problem:
            click.echo(f"aitune-build: verify: {archive}: {problem}", err=True)
        else:
            click.echo(f"{archive}: OK")
        return EXIT_OK if problem is None else EXIT_FAILED

    _run(go)


@main.command("run", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--build-on-start", is_flag=True, help="Build missing or stale served targets before serving them.")
@click.option("--debug", "debug", metavar="PATH", help="Write a JSON record of served and eager calls at exit.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def run_cmd(obj: _Ctx, build_on_start: bool, debug: str | None, command: tuple[str, ...]) -> None:
    """Run COMMAND (e.g. -- python serve.py ARGS) with the `serve = true` targets' artifacts in place of their
    modules' forward; no code change. Modules that do not match what was built run eager, with a warning."""

    def go() -> int:
        from .serve.launch import exec_served

        project = obj.open(readonly_cache=True)  # a bad manifest is one line and exit 2, before the app starts
        if not any(t.serve for t in project.manifest.model.targets.values()):
            raise UserError(f"{project.manifest.display}: no target has serve = true; add it to the target to serve")
        exec_served(project, command, build_on_start, debug)
        return EXIT_OK  # not reached

    _run(go)


@main.command("record", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--module", "modules", multiple=True, metavar="PKG.MOD:CLASS",
              help="Record this class's calls (repeatable); default: the modules the application calls directly.")
@click.option("--backend", default="export", show_default=True, help="Backend (a [backends] name or a kind) of the target written.")
@click.option("--target", "target", metavar="NAME", help="Name of the target written (default MODULE_BACKEND).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def record_cmd(obj: _Ctx, modules: tuple[str, ...], backend: str, target: str | None, command: tuple[str, ...]) -> None:
    """Run COMMAND, record the inputs its modules receive, and write [modules] entries (shape ranges from what was
    seen) and a served target into aitune.toml."""

    def go() -> int:
        import tempfile

        from .serve.launch import run_recorded
        from .serve.manifest_edit import merge, update_manifest

        path = obj.manifest_path()
        with tempfile.TemporaryDirectory(prefix="aitune-record-") as folder:
            code = run_recorded(command, modules, Path(folder))
            recorded, chosen = merge(Path(folder))
        if code != 0:
            click.echo(f"aitune-build: record: the application exited with code {code}", err=True)
        edit = update_manifest(path, recorded, backend, target, list(chosen or modules))
        for key, rec in sorted(recorded.items()):
            click.echo(f"recorded {key}: {rec.calls} calls, {len(rec.signatures)} input shapes")
        for name, what in edit.modules.items():
            click.echo(f"{what} modules.{name}")
        for name, what in edit.targets.items():
            click.echo(f"{what} targets.{name}")
        for note in edit.notes:
            click.echo(f"note: {note}", err=True)
        click.echo(f"wrote {path}; next: aitune-build build, then aitune-build run -- {' '.join(command)}")
        return EXIT_OK

    _run(go)


if __name__ == "__main__":  # pragma: no cover
    main()
