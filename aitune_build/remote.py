"""The shared remote cache: read-through on a local miss, write-back after a build. Knows nothing of torch.

Objects under the remote's URL (an S3/GCS/Azure bucket prefix or a shared folder, spoken to through obstore):

    aitune-v1/blobs/<sha256[:2]>/<sha256>             file contents, addressed by their sha256
    aitune-v1/entries/<key[:2]>/<key>.json            an entry's index: {format, key, files: {name: size/xxh3/sha256}, meta}
    aitune-v1/targets/<project>/<target>/<tc>.json    the key a target last uploaded with toolchain tc (for explain)

An upload writes the blobs first and the index last (create-only), so a reader never sees half an entry, and two
runners uploading one key each leave a complete entry: whichever index lands first names blobs that are all there.
A download streams each blob into a private folder, checks size, xxh3 and sha256 against the index, and moves the
folder into the local store (`ArtifactStore.put`): what the remote says is data to verify, never code to run or a
path to follow. A missing, partial or corrupt entry is a miss, reported once with its key. Any other error (network,
time-out after bounded retries, credentials, missing bucket) is an outage: one warning naming the remote and the
reason, and the rest of the run is local.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import xxhash

if TYPE_CHECKING:
    from concurrent.futures import Future

    from .store import ArtifactStore, Entry

ROOT = "aitune-v1"
INDEX_FORMAT = 1
ENV_URL = "AITUNE_REMOTE_CACHE"
ENV_TIMEOUT = "AITUNE_REMOTE_TIMEOUT"  # seconds a request may take, retries included (default 20)
READ, READ_WRITE = "read", "read-write"
_PART = 8 << 20  # upload part size (S3 parts are 5 MiB at least)
# Download chunks: obstore's stream() joins the HTTP body's pieces into chunks of at least this size; at 8 MiB each
# chunk is a fresh mmap'd buffer (page faults, copies out of cache) and the raw client itself spent ~3x the CPU of
# 1 MiB chunks on the 2-core VM (0.8 vs 0.25 s for 256 MiB). 1 MiB also keeps a chunk in cache for the three passes
# (xxh3, sha256, write). Files up to _INLINE_MAX are hashed in the receiving thread.
DOWNLOAD_CHUNK = 1 << 20
_INLINE_MAX = 8 << 20
_UPLOADS = 2  # entries uploaded side by side (each file is itself uploaded in parallel parts)
REMOTE_FETCHES = 8  # downloads in flight beside the -j compiles
_EARLY_PART = 5 << 20  # an early upload's parts: S3's smallest, so the part held back for the verdict is small
_EARLY_PIECE = 1 << 20  # what the early upload holds back until commit() at most, besides one unsent part
EARLY_MIN = _EARLY_PART  # smaller artifacts are uploaded after the check the usual way
_EARLY_SLOTS = REMOTE_FETCHES  # early uploads in flight (each waits for its check's verdict)
INSTALL_HINT = "pip install 'aitune-build[remote]'"


def redact(url: str) -> str:
    """url without userinfo and query (where signed URLs and tokens hide)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def configured(project: Any) -> tuple[str | None, str]:
    """(URL, mode) of the project's remote: env AITUNE_REMOTE_CACHE overrides [project] remote_cache."""
    settings = project.manifest.model.project
    url = os.environ.get(ENV_URL) or settings.remote_cache
    return (url or None), settings.remote_cache_mode


def open_remote(project: Any, mode: str | None = None, disabled: bool = False,
                report: Callable[[str], None] | None = None) -> RemoteCache | None:
    """The project's remote cache, or None where none is configured, it is disabled (--no-remote), or obstore is
    missing (one warning saying what to install). mode: READ forces read-only (--remote-readonly)."""
    url, configured_mode = configured(project)
    if url is None or disabled:
        return None
    report = report or _stderr
    try:
        import obstore  # noqa: F401
    except ImportError:
        report(f"remote cache {redact(url)} is configured but obstore is not installed ({INSTALL_HINT}); building locally")
        return None
    return RemoteCache(url, mode=mode or configured_mode, store=project.store, project_name=project.manifest.model.project.name,
                       report=report)


def _stderr(message: str) -> None:
    sys.stderr.write(f"aitune-build: warning: {message}\n")
    sys.stderr.flush()


def _timeout() -> float:
    try:
        return max(0.5, float(os.environ.get(ENV_TIMEOUT, "20")))
    except ValueError:
        return 20.0


def object_store(url: str) -> Any:
    """An obstore store for url. Credentials and endpoints come from the library's standard chain (AWS_* / GOOGLE_* /
    AZURE_* variables, profiles, instance roles); AWS_ENDPOINT_URL over plain http is allowed (local servers)."""
    from datetime import timedelta

    from obstore.store import LocalStore, from_url

    parts = urlsplit(url)
    if parts.scheme == "file":
        path = Path(parts.path)
        path.mkdir(parents=True, exist_ok=True)
        return LocalStore(path)
    budget = _timeout()
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or ""
    client = {"connect_timeout": timedelta(seconds=min(5.0, budget)), "read_timeout": timedelta(seconds=budget)}
    if endpoint.startswith("http://") or parts.scheme in ("http",):
        client["allow_http"] = True
    retry = {"max_retries": 3, "retry_timeout": timedelta(seconds=budget),
             "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2), "base": 2}}
    return from_url(url, client_options=client, retry_config=retry)


class Outage(Exception):
    """The remote cannot be used this run (network, time-out, credentials, missing bucket)."""


@dataclass
class Stats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    uploaded: int = 0
    already_there: int = 0
    sent_during_check: int = 0  # artifacts whose blob went up while their check ran (EarlyUpload)
    bytes_down: int = 0
    bytes_up: int = 0
    seconds_down: float = 0.0
    seconds_up: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class RemoteCache:
    url: str
    mode: str
    store: ArtifactStore
    project_name: str
    report: Callable[[str], None] = _stderr
    stats: Stats = field(default_factory=Stats)
    warnings: list[str] = field(default_factory=list)
    _obs: Any = None
    _down: str | None = None  # why the remote is off for the rest of the run
    _probed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pool: Any = None
    _early_pool: Any = None
    _early: list[EarlyUpload] = field(default_factory=list)
    _uploads: list[Future] = field(default_factory=list)

    @property
    def display(self) -> str:
        return redact(self.url)

    @property
    def writable(self) -> bool:
        return self.mode == READ_WRITE

    # -- errors ----------------------------------------------------------------------------------------------------

    def warn(self, message: str) -> None:
        with self._lock:
            self.warnings.append(message)
        self.report(message)

    def _outage(self, error: BaseException) -> Outage:
        reason = _reason(error)
        with self._lock:
            first = self._down is None
            if first:
                self._down = reason
        if first:
            self.warn(f"remote cache {self.display} unavailable ({reason}); building locally")
        return Outage(reason)

    def _client(self) -> Any:
        """The store, probed once per run (a missing bucket or wrong credentials show here, not as misses)."""
        if self._down is not None:
            raise Outage(self._down)
        with self._lock:
            if self._obs is None:
                try:
                    self._obs = object_store(self.url)
                except Exception as e:  # bad URL scheme, unknown option: the library's own message
                    self._down = _reason(e)
                    self.warnings.append(f"remote cache {self.display} unusable ({self._down}); building locally")
                    self.report(self.warnings[-1])
                    raise Outage(self._down) from None
        if not self._probed:
            import obstore

            try:
                obstore.list_with_delimiter(self._obs, f"{ROOT}/entries/")
            except Exception as e:
                raise self._outage(e) from None
            self._probed = True
        return self._obs

    @property
    def available(self) -> bool:
        try:
            self._client()
            return True
        except Outage:
            return False

    # -- paths -----------------------------------------------------------------------------------------------------

    @staticmethod
    def index_path(key: str) -> str:
        return f"{ROOT}/entries/{key[:2]}/{key}.json"

    @staticmethod
    def blob_path(sha256: str) -> str:
        return f"{ROOT}/blobs/{sha256[:2]}/{sha256}"

    def pointer_prefix(self, target: str) -> str:
        return f"{ROOT}/targets/{self.project_name}/{target}/"

    def pointer_path(self, target: str, toolchain: dict[str, Any]) -> str:
        tc = xxhash.xxh3_64_hexdigest(json.dumps(toolchain, sort_keys=True).encode())
        return f"{self.pointer_prefix(target)}{tc}.json"

    # -- read ------------------------------------------------------------------------------------------------------

    def index(self, key: str) -> dict[str, Any] | None:
        """The remote's index for key, checked for shape; None when absent or malformed (malformed: reported)."""
        import obstore

        obs = self._client()
        try:
            raw = bytes(obstore.get(obs, self.index_path(key)).bytes())
        except FileNotFoundError:
            return None
        except Exception as e:
            if _not_found(e):
                return None
            raise self._outage(e) from None
        problem = _check_index(raw, key)
        if isinstance(problem, str):
            self._corrupt(key, problem)
            return None
        return problem

    def has(self, key: str) -> bool:
        """Whether the remote holds an index for key (files are checked when fetched). False during an outage."""
        import obstore

        try:
            obs = self._client()
            obstore.head(obs, self.index_path(key))
            return True
        except Outage:
            return False
        except FileNotFoundError:
            return False
        except Exception as e:
            if _not_found(e):
                return False
            self._outage(e)
            return False

    def fetch(self, key: str, components: dict[str, Any] | None = None) -> Entry | None:
        """Download key's entry into the local store, every file verified; None on a miss or an outage.

        components: the key's components as computed here; they replace the remote's copy in the stored metadata (the
        runtime reads the module spec from them: nothing the remote says decides what code runs). With a read-only
        local store the entry is left in a private temp folder that the caller removes."""
        from .store import Entry

        try:
            idx = self.index(key)
        except Outage:
            return None
        if idx is None:
            with self._lock:
                self.stats.misses += 1
            return None
        tmp = self.store.new_tmp()
        try:
            problem = self.download(idx["files"], tmp)
            if problem is not None:
                self._corrupt(key, problem, idx)
                return None
            meta = {**idx["meta"], "key": key, "source": "remote"}
            if components is not None:
                meta.update(components=components, toolchain=components.get("toolchain"),
                            backend=components.get("backend", {}).get("kind", meta.get("backend")))
            if self.store.readonly:
                keep, tmp = tmp, None
                return Entry(key=key, path=keep, files=idx["files"], meta=meta)
            entry = self.store.put(key, tmp, meta, files=idx["files"])
            tmp = None
            return entry
        except Outage:
            return None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def download(self, files: dict[str, dict[str, Any]], folder: Path) -> str | None:
        """Stream the blobs of files ({name: size/xxh3/sha256}, names already checked safe) into folder, each checked
        against its digests: None, or the first problem ("name: what"). Counts a hit. Raises Outage."""
        t0 = time.perf_counter()
        got = 0
        for name, want in sorted(files.items()):
            problem = self._download(want, folder / name)
            if problem is not None:
                return f"{name}: {problem}"
            got += want["size"]
        with self._lock:
            self.stats.hits += 1
            self.stats.bytes_down += got
            self.stats.seconds_down += time.perf_counter() - t0
        return None

    def _download(self, want: dict[str, Any], dest: Path) -> str | None:
        """Stream one blob to dest, hashing on the way. None when it matches `want`, else what is wrong."""
        import obstore

        obs = self._client()
        dest.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        try:
            result = obstore.get(obs, self.blob_path(want["sha256"]))
            sink_type = _HashingWriter if want["size"] > _INLINE_MAX else _InlineHashingWriter  # small: no thread
            with sink_type(dest) as sink:  # a big file is hashed and written in a second thread while this one receives
                for chunk in result.stream(min_chunk_size=DOWNLOAD_CHUNK):
                    size += len(chunk)
                    if size > want["size"]:
                        return f"longer than the {want['size']} bytes recorded"
                    sink.put(chunk)
        except FileNotFoundError:
            return "missing"
        except Exception as e:
            if _not_found(e):
                return "missing"
            raise self._outage(e) from None
        if size != want["size"]:
            return f"{size} bytes, {want['size']} recorded (truncated)"
        if sink.sha256 != want["sha256"] or sink.xxh3 != want["xxh3"]:
            return "does not match its checksum"
        return None

    def _corrupt(self, key: str, problem: str, idx: dict[str, Any] | None = None) -> None:
        """A partial or corrupt remote entry: a miss, reported once; in read-write mode its index and bad blob go, so
        the rebuild's upload replaces them (the index is create-only)."""
        with self._lock:
            self.stats.misses += 1
            self.stats.corrupt += 1
        self.warn(f"remote cache entry {key} is incomplete or corrupt ({problem}); not used, it will be rebuilt")
        if not self.writable:
            return
        import obstore

        try:
            obs = self._client()
            obstore.delete(obs, self.index_path(key))
            if idx is not None and ":" in problem:
                name = problem.split(":", 1)[0]
                sha = idx["files"].get(name, {}).get("sha256")
                if sha:
                    obstore.delete(obs, self.blob_path(sha))
        except Outage:
            pass
        except Exception:
            pass  # best effort: a reader verifies anyway

    # -- write -----------------------------------------------------------------------------------------------------

    def upload(self, entry: Entry, target: str | None = None, early: EarlyUpload | None = None) -> None:
        """Upload entry in the background (finish() waits); nothing in read mode or during an outage. early: its
        artifact's blob, started while the build still checked it (committed here, or withdrawn)."""
        if not self.writable or self._down is not None:
            if early is not None:
                early.withdraw()
            return
        with self._lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=_UPLOADS, thread_name_prefix="aitune-upload")
            self._uploads.append(self._pool.submit(self._upload_quietly, entry, target, early))

    def _upload_quietly(self, entry: Entry, target: str | None, early: EarlyUpload | None = None) -> None:
        try:
            self.upload_now(entry, target, early)
        except Outage:
            pass
        finally:
            if early is not None:
                early.withdraw()  # no-op once committed

    def upload_early(self, folder: Path, name: str) -> EarlyUpload | None:
        """Start sending folder/name, a built artifact whose check still runs; see EarlyUpload. None in read mode,
        during an outage, or for a file of one part or less (nothing to overlap)."""
        if not self.writable or self._down is not None:
            return None
        try:
            f = open(folder / name, "rb")  # opened now: the store renames the folder once the build is done
        except OSError:
            return None
        if os.fstat(f.fileno()).st_size <= EARLY_MIN:
            f.close()
            return None
        early = EarlyUpload(self, f, name)
        with self._lock:
            if self._early_pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._early_pool = ThreadPoolExecutor(max_workers=_EARLY_SLOTS, thread_name_prefix="aitune-early")
            early.future = self._early_pool.submit(early.run)
            self._early.append(early)
        return early

    def upload_now(self, entry: Entry, target: str | None = None, early: EarlyUpload | None = None) -> bool:
        """Blobs first, then the index (create-only), then the target's pointer. True when this call uploaded the
        index, False when the remote had it already. Raises Outage. early: the artifact's blob already in flight;
        committed with the stored entry's digests (sent again the usual way if that fails)."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, NotSupportedError, PreconditionError

        obs = self._client()
        t0 = time.perf_counter()
        sent = 0
        try:
            for name, want in sorted(entry.files.items()):
                if early is not None and name == early.name and early.commit(want):
                    sent += early.sent
                    with self._lock:
                        self.stats.sent_during_check += early.sent > 0  # 0: the blob was there already
                    continue
                path = self.blob_path(want["sha256"])
                try:
                    if obstore.head(obs, path)["size"] == want["size"]:
                        continue  # content-addressed: the same bytes are there (a reader verifies them anyway)
                except FileNotFoundError:
                    pass
                except Exception as e:
                    if not _not_found(e):
                        raise
                obstore.put(obs, path, entry.path / name, chunk_size=_PART, max_concurrency=4)
                sent += want["size"]
            meta = {k: v for k, v in entry.meta.items() if k != "source"}
            body = json.dumps({"format": INDEX_FORMAT, "key": entry.key, "files": entry.files, "meta": meta},
                              sort_keys=True).encode()
            created = True
            try:
                obstore.put(obs, self.index_path(entry.key), body, mode="create")
            except (AlreadyExistsError, PreconditionError):
                created = False  # another runner uploaded this key first: entries are immutable
            except NotSupportedError:
                obstore.put(obs, self.index_path(entry.key), body)
            components = meta.get("components")
            if target and isinstance(components, dict):
                pointer = {"format": INDEX_FORMAT, "target": target, "key": entry.key, "components": components,
                           "updated": time.time()}
                obstore.put(obs, self.pointer_path(target, components.get("toolchain", {})),
                            json.dumps(pointer, sort_keys=True).encode())
        except Outage:
            raise
        except Exception as e:
            raise self._outage(e) from None
        with self._lock:
            self.stats.uploaded += created
            self.stats.already_there += not created
            self.stats.bytes_up += sent
            self.stats.seconds_up += time.perf_counter() - t0
        return created

    def finish(self) -> None:
        """Wait for the uploads started by upload()."""
        from concurrent.futures import wait

        with self._lock:
            pending, self._uploads = self._uploads, []
        if pending:
            wait(pending)  # these commit their early uploads
        with self._lock:
            early, self._early = self._early, []
        for e in early:
            e.withdraw()  # a no-op once committed; else its build never handed it over (failed, interrupted)
        wait([e.future for e in early if e.future is not None])
        for pool in (self._pool, self._early_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._early_pool = None

    # -- explain, stats, prune -------------------------------------------------------------------------------------

    def pointer(self, target: str, toolchain: dict[str, Any]) -> dict[str, Any] | None:
        """What the remote last saw uploaded for target: the pointer for this toolchain, else the newest one."""
        import obstore

        obs = self._client()
        try:
            found = [m for batch in obstore.list(obs, prefix=self.pointer_prefix(target)) for m in batch]
        except Exception as e:
            raise self._outage(e) from None
        if not found:
            return None
        exact = self.pointer_path(target, toolchain)
        pick = next((m for m in found if m["path"] == exact), None) or max(found, key=lambda m: m["last_modified"])
        try:
            data = json.loads(bytes(obstore.get(obs, pick["path"]).bytes()))
        except Exception:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("components"), dict) or not isinstance(data.get("key"), str):
            return None
        return data

    def listing(self) -> dict[str, Any]:
        """Entries and bytes on the remote."""
        import obstore

        obs = self._client()
        try:
            entries = [m for batch in obstore.list(obs, prefix=f"{ROOT}/entries/") for m in batch]
            blobs = [m for batch in obstore.list(obs, prefix=f"{ROOT}/blobs/") for m in batch]
        except Exception as e:
            raise self._outage(e) from None
        return {"entries": len(entries), "blobs": len(blobs), "bytes": sum(m["size"] for m in blobs + entries)}

    def prune(self, older_than_s: float, dry_run: bool = False) -> dict[str, Any]:
        """Delete entries uploaded more than older_than_s ago, then blobs no remaining entry names (and as old)."""
        import datetime

        import obstore

        obs = self._client()
        cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=older_than_s)
        try:
            entries = [m for batch in obstore.list(obs, prefix=f"{ROOT}/entries/") for m in batch]
            old = [m["path"] for m in entries if m["last_modified"] < cutoff]
            keep_blobs: set[str] = set()
            for m in entries:
                if m["path"] in old:
                    continue
                try:
                    idx = json.loads(bytes(obstore.get(obs, m["path"]).bytes()))
                    keep_blobs |= {self.blob_path(f["sha256"]) for f in idx["files"].values()}
                except Exception:
                    continue
            blobs = [m for batch in obstore.list(obs, prefix=f"{ROOT}/blobs/") for m in batch]
            gone_blobs = [m for m in blobs if m["path"] not in keep_blobs and m["last_modified"] < cutoff]
            if not dry_run:
                for p in old:
                    obstore.delete(obs, p)
                for m in gone_blobs:
                    obstore.delete(obs, m["path"])
        except Exception as e:
            raise self._outage(e) from None
        return {"entries_removed": len(old), "blobs_removed": len(gone_blobs), "bytes_freed": sum(m["size"] for m in gone_blobs)}

    def summary(self) -> dict[str, Any]:
        return {"url": self.display, "mode": self.mode, "available": self._down is None, **self.stats.as_json(),
                "warnings": list(self.warnings)}


class _Withdrawn(Exception):
    """An early upload's verdict: not the checked, stored bytes (check failed, build failed, bytes changed)."""


class EarlyUpload:
    """A built artifact's blob sent while its worker still loads and checks it (the worker has written the artifact
    when it reports "loading"), so that the upload overlaps the check instead of following it.

    The blob's address is the file's sha256, hashed first. The put is a multipart upload whose last piece waits for
    commit(want): the entry the store recorded for the checked artifact. Unless want's size and sha256 equal those of
    the bytes actually sent (hashed again while sending), the last piece raises instead: the multipart upload fails,
    the server drops its parts, and no object appears. withdraw() (check or build failed) does the same. So only
    checked, stored bytes ever become a remote object; the index is still written last, by upload_now."""

    def __init__(self, remote: RemoteCache, file: Any, name: str):
        self.remote, self.file, self.name = remote, file, name
        self.future: Future | None = None
        self.sent = 0
        self.streamed = 0  # bytes handed to the put so far (a withdrawn upload stops within a piece or so)
        self._want: dict[str, Any] | None = None
        self._decided = threading.Event()

    def commit(self, want: dict[str, Any]) -> bool:
        """Let the put finish if want is what was sent; True when the blob is on the remote. An upload that never
        started (every early slot waits on a check) is cancelled instead: the caller uploads the usual way, and no
        upload thread ever waits on an early upload that waits for a thread."""
        self._want = want
        self._decided.set()
        if self.future is None or self._cancel():
            return False
        return self.future.result() is True

    def withdraw(self) -> None:
        self._decided.set()
        self._cancel()

    def _cancel(self) -> bool:
        if self.future is not None and self.future.cancel():
            self.file.close()
            return True
        return False

    def run(self) -> bool:
        import obstore

        with self.file as f:
            sha, size = hashlib.sha256(), 0
            while block := f.read(_PART):
                sha.update(block)
                size += len(block)
            digest = sha.hexdigest()
            try:
                obs = self.remote._client()
                path = self.remote.blob_path(digest)
                try:
                    if obstore.head(obs, path)["size"] == size:  # content-addressed: these bytes are there already
                        self._decided.wait()
                        return self._matches(digest, size)
                except Exception as e:
                    if not _not_found(e):
                        return False
                if self._refused(digest, size):
                    return False  # withdrawn while hashing: send nothing
                f.seek(0)
                obstore.put(obs, path, self._pieces(f, digest, size), chunk_size=_EARLY_PART, max_concurrency=4)
            except Exception:  # _Withdrawn, or an outage that upload_now meets (and reports) again
                return False
        self.sent = size
        return True

    def _matches(self, digest: str, size: int) -> bool:
        want = self._want
        return want is not None and want.get("sha256") == digest and want.get("size") == size

    def _refused(self, digest: str, size: int) -> bool:
        """Decided, and not for these bytes: withdrawn, or the store holds others."""
        return self._decided.is_set() and not self._matches(digest, size)

    def _pieces(self, f: Any, digest: str, size: int) -> Any:
        check, n = hashlib.sha256(), 0
        piece = f.read(_EARLY_PIECE)
        while piece:
            after = f.read(_EARLY_PIECE)
            check.update(piece)
            n += len(piece)
            if not after:  # the last piece completes the object: only for the checked bytes the store holds
                self._decided.wait()
                if n != size or check.hexdigest() != digest or not self._matches(digest, size):
                    raise _Withdrawn()
            elif self._refused(digest, size):
                raise _Withdrawn()  # withdrawn (or other bytes stored) mid-way: stop sending now, not at the end
            self.streamed += len(piece)
            yield piece
            piece = after


class _HashingWriter:
    """Writes chunks to a file and hashes them (xxh3-128, sha256) in a thread of its own: hashlib and file writes
    release the GIL, so hashing overlaps receiving. At most a few chunks wait in the queue (bounded memory)."""

    def __init__(self, dest: Path):
        import queue

        self.dest = dest
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.xxh3 = self.sha256 = ""
        self.thread = threading.Thread(target=self._run, name="aitune-hash", daemon=True)

    def __enter__(self) -> _HashingWriter:
        self.thread.start()
        return self

    def put(self, chunk: Any) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(chunk)

    def _run(self) -> None:
        xx, sha = xxhash.xxh3_128(), hashlib.sha256()
        try:
            with open(self.dest, "wb") as f:
                while (chunk := self.queue.get()) is not None:
                    view = memoryview(chunk)
                    xx.update(view)
                    sha.update(view)
                    f.write(view)
        except BaseException as e:  # noqa: BLE001  # handed to the receiving thread
            self.error = e
            while self.queue.get() is not None:
                pass
            return
        self.xxh3, self.sha256 = xx.hexdigest(), sha.hexdigest()

    def __exit__(self, *exc: object) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error


class _InlineHashingWriter:
    """_HashingWriter's interface without the thread, for files of a chunk or less."""

    def __init__(self, dest: Path):
        self.f = open(dest, "wb")
        self.xx, self.sha = xxhash.xxh3_128(), hashlib.sha256()
        self.xxh3 = self.sha256 = ""

    def __enter__(self) -> _InlineHashingWriter:
        return self

    def put(self, chunk: Any) -> None:
        view = memoryview(chunk)
        self.xx.update(view)
        self.sha.update(view)
        self.f.write(view)

    def __exit__(self, *exc: object) -> None:
        self.f.close()
        self.xxh3, self.sha256 = self.xx.hexdigest(), self.sha.hexdigest()


def _not_found(e: BaseException) -> bool:
    try:
        from obstore.exceptions import NotFoundError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, (NotFoundError, FileNotFoundError))


def _reason(e: BaseException) -> str:
    """The first line of an error, credentials and query strings taken out of any URL in it."""
    import re

    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"(\w+://)[^/@\s]*@", r"\1***@", text)
    text = re.sub(r"(\w+://[^\s?]*)\?\S*", r"\1", text)
    return f"{type(e).__name__}: {text[:300]}"


_HEX = set("0123456789abcdef")


def _check_index(raw: bytes, key: str) -> dict[str, Any] | str:
    """The parsed index, or what is wrong with it. Names must be plain relative paths: never followed outside."""
    try:
        idx = json.loads(raw)
    except ValueError:
        return "index is not JSON (partial upload?)"
    if not isinstance(idx, dict) or idx.get("format") != INDEX_FORMAT or idx.get("key") != key:
        return "index has an unknown format or another key"
    files, meta = idx.get("files"), idx.get("meta")
    if not isinstance(files, dict) or not files or not isinstance(meta, dict):
        return "index lists no files"
    for name, want in files.items():
        norm = posixpath.normpath(name) if isinstance(name, str) else ""
        if (not norm or norm != name or name.startswith("/") or name.split("/")[0] == ".." or "\\" in name or "\0" in name
                or name == "entry.json"):
            return f"index names an unsafe path {name!r}"
        if (not isinstance(want, dict) or not isinstance(want.get("size"), int) or want["size"] < 0
                or not isinstance(want.get("sha256"), str) or len(want["sha256"]) != 64 or not set(want["sha256"]) <= _HEX
                or not isinstance(want.get("xxh3"), str)):
            return f"index has bad digests for {name!r}"
    if meta.get("key") != key or meta.get("artifact") not in files or not isinstance(meta.get("components"), dict):
        return "index metadata does not describe this key"
    return idx


# -- commands (cache push / pull) ------------------------------------------------------------------------------------


def require(project: Any, write: bool = False) -> RemoteCache:
    """The project's remote for a command that needs one; a UserError saying how to configure it otherwise."""
    from .errors import UserError

    url, _ = configured(project)
    if url is None:
        raise UserError("no remote cache configured: set [project] remote_cache = \"s3://bucket/prefix\" in aitune.toml "
                        f"or {ENV_URL}")
    remote = project.remote
    if remote is None:
        raise UserError(f"the remote cache needs obstore: {INSTALL_HINT}" if not project.remote_disabled
                        else "--no-remote: this command needs the remote cache")
    if write and not remote.writable:
        raise UserError(f"remote cache {remote.display} is read-only here (--remote-readonly or remote_cache_mode = \"read\")")
    return remote


_RECORD_ONLY = ("format", "files", "materialised_at")


def push(project: Any, names: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Upload what is built locally (named targets and their upstreams; default all). {target: outcome}."""
    from .plan import select
    from .project import survey

    remote = require(project, write=True)
    found = survey(project, select(project.manifest.model, names))
    out: dict[str, str] = {}
    for name, s in found.items():
        if s.key is None:
            out[name] = "not built here (run `aitune-build build` first)"
            continue
        entry = project.store.get(s.key) or (None if s.staleness.stale else _store_from_output(project, name, s.key, s.previous))
        if entry is None:
            out[name] = "not built here (run `aitune-build build` first)"
            continue
        try:
            out[name] = "uploaded" if remote.upload_now(entry, name) else "already on the remote"
        except Outage as e:
            out[name] = f"remote unavailable ({e})"
    return out


def _store_from_output(project: Any, name: str, key: str, record: dict[str, Any] | None) -> Entry | None:
    """Put an intact output folder back into the local store (the store was emptied or gc'd since the build)."""
    if record is None or project.store.readonly:
        return None
    from .fsutil import atomic_copy

    tmp = project.store.new_tmp()
    try:
        for fname in record["files"]:
            atomic_copy(project.target_dir(name) / fname, tmp / fname)
        meta = {k: v for k, v in record.items() if k not in _RECORD_ONLY}
        return project.store.put(key, tmp, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pull(project: Any, names: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Download the entries of the targets' current keys into the local store (a later build restores them from
    there without the network). Independent targets download side by side. {target: outcome}."""
    from concurrent.futures import ThreadPoolExecutor

    from .keys import key_of
    from .plan import select

    remote = require(project)
    man = project.manifest.model
    order = select(man, names)
    digests: dict[str, str] = {}
    out: dict[str, str] = {}

    def one(name: str) -> None:
        up = man.targets[name].from_
        if up is not None and up not in digests:
            out[name] = f"skipped: upstream '{up}' is neither local nor on the remote"
            return
        comps = project.fingerprinter.components(name, digests.get(up) if up else None)
        key = key_of(comps)
        with project.store.lock(key) if not project.store.readonly else _NullLock():
            entry = project.store.get(key)
            outcome = "already local"
            if entry is None:
                entry = remote.fetch(key, comps)
                outcome = "downloaded" if entry is not None else ("not on the remote" if remote.available else "remote unavailable")
        if entry is not None:
            digests[name] = entry.files[entry.meta["artifact"]]["xxh3"]
            if project.store.readonly and outcome == "downloaded":
                shutil.rmtree(entry.path, ignore_errors=True)
        out[name] = f"{outcome} ({key})"

    roots = [n for n in order if man.targets[n].from_ is None]
    for n in roots:  # sources hashed once, in this thread (the fingerprinter memoises)
        project.fingerprinter.components(n)
    with ThreadPoolExecutor(max_workers=REMOTE_FETCHES) as pool:
        list(pool.map(one, roots))
    for n in order:
        if n not in roots:
            one(n)
    return {n: out[n] for n in order}


class _NullLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


RUN_STATS = "remote-last-run.json"


def save_run(project: Any) -> None:
    """Remember this run's remote counts for `cache stats`."""
    remote = project._remote
    if not remote or project.readonly_cache:
        return
    from .fsutil import atomic_write_json

    try:
        atomic_write_json(project.cache_dir / RUN_STATS, {"at": time.time(), **remote.summary()})
    except OSError:
        pass


def stats(project: Any) -> dict[str, Any]:
    """Local and remote entries and bytes, and the last build's remote counts."""
    from .fsutil import read_json

    local = project.store.entries() if (project.cache_dir / "store-v1").is_dir() else []
    out: dict[str, Any] = {"local": {"path": str(project.cache_dir), "entries": len(local), "bytes": sum(e[2] for e in local)}}
    url, mode = configured(project)
    out["remote"] = None
    if url is not None and project.remote is not None:
        remote = project.remote
        try:
            out["remote"] = {"url": remote.display, "mode": remote.mode, **remote.listing()}
        except Outage as e:
            out["remote"] = {"url": remote.display, "mode": remote.mode, "unavailable": str(e)}
    out["last_build"] = read_json(project.cache_dir / RUN_STATS)
    return out
