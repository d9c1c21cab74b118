"""An opened project: its manifest and where its outputs, cache and stat cache live."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .hashing import STATE_VERSION, StateCache
from .keys import Fingerprinter
from .manifest import CANDIDATE_SEP, DEFAULT_CACHE_DIR, LoadedManifest, Manifest, checked, parse, read_bytes, validate, validation_digest

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any
    from .remote import RemoteCache
    from .store import ArtifactStore

STATE_FILE = f"state-v{STATE_VERSION}.json"
_REMOTE_OPEN = threading.Lock()


@dataclass
class Project:
    """An opened project: its manifest, cache, state file and key computer."""

    manifest: LoadedManifest
    cache_dir: Path
    state: StateCache
    fingerprinter: Fingerprinter
    readonly_cache: bool = False
    remote_mode: str | None = None  # "read" forces the remote read-only (--remote-readonly)
    remote_disabled: bool = False  # --no-remote
    _store: ArtifactStore | None = None
    _remote: RemoteCache | None | bool = False  # False: not opened yet
    _out_dir: Path | None = None
    _target_dirs: dict[str, Path] = field(default_factory=dict)  # a no-op build asks several times per target

    @classmethod
    def open(cls, manifest_path: str | Path, readonly_cache: bool = False,
             toolchain_override: dict[str, Any] | None = None, gpus: str | None = None,
             gpu_model: str | None = None) -> Project:
        path = Path(manifest_path)
        root = path.resolve().parent
        raw = read_bytes(path)
        digest = validation_digest(raw)
        env = os.environ.get("AITUNE_CACHE_DIR")

        def state_in(cache_dir: Path) -> StateCache:
            return StateCache(cache_dir / STATE_FILE if (cache_dir.is_dir() or not readonly_cache) else None)

        # The state file, which remembers validated manifests, lives in the cache dir that the manifest names. Look
        # in the usual place first; a hit there tells where the manifest puts it (the digest covers project.cache_dir).
        cache_dir = Path(env).resolve() if env else root / DEFAULT_CACHE_DIR
        state = state_in(cache_dir)
        model = _remembered(state, digest)
        if model is not None and not env and root / model.project.cache_dir != cache_dir:
            model = None  # remembered here while AITUNE_CACHE_DIR pointed here: look where the manifest says
        if model is None:
            data = parse(raw, path)
            declared = data.get("project", {}).get("cache_dir") if isinstance(data.get("project"), dict) else None
            if not env and isinstance(declared, str) and root / declared != cache_dir:
                cache_dir = root / declared
                state = state_in(cache_dir)
                model = _remembered(state, digest)
            if model is None:
                normal = validate(data, path)  # a bad project.cache_dir is reported here
                state.set_validated(digest, normal)
                model = Manifest.from_json(normal)
        m = checked(path, model)
        _check_layout(m, cache_dir, env)
        fp = Fingerprinter(m, state, toolchain_override=toolchain_override, gpus=gpus, gpu_model=gpu_model)
        return cls(manifest=m, cache_dir=cache_dir, state=state, fingerprinter=fp, readonly_cache=readonly_cache)

    def prepare_out_dir(self) -> None:
        """Create (or adopt) out_dir with its marker before anything is written into it."""
        from .paths import ensure_out_dir

        ensure_out_dir(self.out_dir)

    @property
    def store(self) -> ArtifactStore:
        if self._store is None:
            from .store import ArtifactStore  # a no-op build never opens the store

            self._store = ArtifactStore(self.cache_dir, self.state, readonly=self.readonly_cache)
        return self._store

    @property
    def remote(self) -> RemoteCache | None:
        """The shared remote cache, opened at first use (a no-op build never touches it); None when there is none."""
        if self._remote is False:
            with _REMOTE_OPEN:  # executor threads ask at once: one remote per project, one warning
                if self._remote is False:
                    from .remote import open_remote

                    self._remote = open_remote(self, mode=self.remote_mode, disabled=self.remote_disabled)
        return self._remote  # type: ignore[return-value]

    @property
    def out_dir(self) -> Path:
        if self._out_dir is None:
            self._out_dir = self.manifest.root / self.manifest.model.project.out_dir
        return self._out_dir

    def target_dir(self, target: str) -> Path:
        found = self._target_dirs.get(target)
        if found is None:
            parent, sep, backend = target.partition(CANDIDATE_SEP)  # a tuned target's candidate T@B: <out_dir>/T/candidates/B
            out_dir = self.out_dir
            found = self._target_dirs[target] = out_dir / parent / "candidates" / backend if sep else out_dir / target
        return found

    def finish_uploads(self) -> None:
        """Wait for the remote cache's uploads (they overlap the build; the build waits for them before it returns)."""
        if self._remote:
            self._remote.finish()

    def close(self) -> None:
        """Wait for remote uploads, save the stat cache (a read-only cache is left as it is). The project stays usable."""
        self.finish_uploads()
        if not self.readonly_cache:
            self.state.save()

    def __enter__(self) -> Project:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_layout(m: LoadedManifest, cache_dir: Path, env: str | None) -> None:
    from .paths import check_layout, source_paths

    model = m.model
    files = [m.path.name] + [mod.weights for mod in model.modules.values() if mod.weights]
    files += [i.sample for mod in model.modules.values() for i in mod.inputs if i.sample]
    sources = source_paths(m.root, [mod.factory for mod in model.modules.values()], files)
    out = ("project.out_dir", model.project.out_dir, m.root / model.project.out_dir)
    cache = ("AITUNE_CACHE_DIR", env, cache_dir) if env else ("project.cache_dir", model.project.cache_dir, cache_dir)
    from .errors import ManifestError, UserError

    try:
        check_layout(m.root, out, cache, sources)
    except UserError as e:
        if str(e).startswith("AITUNE_CACHE_DIR"):
            raise
        raise ManifestError(m.display, "", str(e)) from None


def _remembered(state: StateCache, digest: str) -> Manifest | None:
    """The manifest as validated before, or None when it was not or the record does not convert (a damaged state
    file is never served: the manifest is validated again)."""
    normal = state.validated(digest)
    if normal is None:
        return None
    try:
        return Manifest.from_json(normal)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


@dataclass(frozen=True)
class Survey:
    """One target as it stands now, without building anything."""

    name: str
    key: str | None  # None when an upstream must rebuild first, or the target's inputs are broken
    components: dict[str, Any] | None
    previous: dict[str, Any] | None  # the last build.json
    staleness: Any  # plan.Staleness
    in_store: bool = False  # not materialised, but the cache holds its key: a build restores it
    failure: dict[str, Any] | None = None  # the last failed build ({when, reason, ...}) when there is one
    artifact_xxh3: str | None = None  # the artifact a build would give, where known (materialised or in the cache)


def survey(project: Project, order: list[str]) -> dict[str, Survey]:
    """Key, previous build and staleness of each target in order (upstreams first). Reads files; builds nothing,
    imports no torch; looks into the cache only for the entry.json of a key that is not materialised."""
    from .errors import UserError
    from .outputs import BuildRecord, holds, read_failure, read_record
    from .plan import Staleness, assess
    from .reasons import change
    from .store import entry_record

    man = project.manifest.model
    found: dict[str, Survey] = {}
    for name in order:
        folder = project.target_dir(name)
        previous = read_record(folder)
        failure = read_failure(folder)
        up = man.targets[name].from_
        upstream_stale = None
        upstream_digest = None
        if up is not None:
            up_survey = found.get(up) or survey(project, [up])[up]
            if up_survey.artifact_xxh3 is None:
                upstream_stale = up
            else:
                upstream_digest = up_survey.artifact_xxh3
        if upstream_stale is not None:
            found[name] = Survey(name, None, None, previous, assess(None, None, previous, False, upstream_stale),
                                 failure=failure)
            continue
        try:
            key, comps = project.fingerprinter.key(name, upstream_digest)
        except UserError as e:  # this target's inputs cannot be read (a file that does not parse, ...)
            found[name] = Survey(name, None, None, previous, Staleness("error", [change("inputs", None, "error", new=str(e))]),
                                 failure=failure)
            continue
        current = holds(folder, previous, key, project.state)
        staleness = assess(key, comps, previous, current)
        in_store, art = False, None
        if current:
            art = BuildRecord(previous).artifact_digest()
        else:
            entry = entry_record(project.cache_dir, key)
            if entry is not None:
                in_store = True
                artifact = entry.get("meta", {}).get("artifact")
                art = entry.get("files", {}).get(artifact, {}).get("xxh3")
        found[name] = Survey(name, key, comps, previous, staleness, in_store, failure, art)
    return found


def describe_failure(failure: dict[str, Any] | None) -> str | None:
    """'last build failed 2026-11-27 21:03 (4 min ago): <first line>' for a recorded failure."""
    if not failure:
        return None
    import time

    when = failure.get("when") or 0
    ago = max(0, time.time() - when)
    rel = f"{int(ago)} s ago" if ago < 120 else f"{int(ago // 60)} min ago" if ago < 7200 else f"{int(ago // 3600)} h ago"
    first = str(failure.get("reason", "")).splitlines()[0] if failure.get("reason") else "failed"
    return f"last build failed {time.strftime('%Y-%m-%d %H:%M', time.localtime(when))} ({rel}): {first}"
