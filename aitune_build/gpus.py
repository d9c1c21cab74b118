"""Which GPUs a build uses, which GPU model its keys name, and a pool that lends each GPU to one compile at a time.

The rule for mixed GPU models on one host: a build's GPU targets are built only on GPUs of one model, so their
keys never depend on which GPU a target happens to land on. That model is `gpu_model` (`[project] gpu_model` or
`build --gpu-model`) when given, else the model of the first visible GPU (CUDA device 0 of the build: the lowest
nvidia-smi index, or the first entry of `--gpus` / CUDA_VISIBLE_DEVICES). GPUs of other models stay idle.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any

# Test hook: backend kinds (comma-separated) treated as GPU-bound although their device is "cpu", so the scheduler
# can be tested on a machine without a GPU (with an nvidia-smi stub on PATH). Never set it for real builds.
TEST_GPU_BOUND_ENV = "AITUNE_TEST_GPU_BOUND_KINDS"


def test_gpu_bound(kind: str) -> bool:
    value = os.environ.get(TEST_GPU_BOUND_ENV)
    return bool(value) and kind in value.split(",")


@dataclass(frozen=True)
class Gpu:
    """One GPU as nvidia-smi names it."""

    index: str  # nvidia-smi's index
    uuid: str
    name: str
    compute_capability: str
    driver: str

    @classmethod
    def from_info(cls, d: dict[str, str]) -> Gpu:
        return cls(d["index"], d["uuid"], d["name"], d["compute_capability"], d["driver"])

    @property
    def model(self) -> dict[str, str]:
        """What a key names: the model and compute capability. Not the driver: see the README's key section."""
        return {"name": self.name, "compute_capability": self.compute_capability}

    @property
    def visible_devices(self) -> str:
        """The CUDA_VISIBLE_DEVICES value that pins a worker to this GPU (the UUID: independent of device order)."""
        return self.uuid

    def as_json(self) -> dict[str, str]:
        return {"index": self.index, "uuid": self.uuid, "name": self.name,
                "compute_capability": self.compute_capability, "driver": self.driver}


@dataclass(frozen=True)
class GpuPlan:
    """The GPU model that GPU targets' keys name, and the GPUs of that model they may build on."""

    model: dict[str, str] | None  # {"name", "compute_capability"}; None where no GPU is usable
    gpus: tuple[Gpu, ...] = ()


def plan_gpus(visible: list[dict[str, str]], gpu_model: str | None = None) -> GpuPlan:
    """Apply the one-model rule (module docstring) to the visible GPUs, in CUDA order."""
    gpus = [Gpu.from_info(d) for d in visible]
    if not gpus:
        return GpuPlan(None)
    if gpu_model:
        first = next((g for g in gpus if model_matches(gpu_model, g.name)), None)
        if first is None:
            names = sorted({g.name for g in gpus})
            raise UserError(f"gpu_model '{gpu_model}' matches none of the visible GPUs ({', '.join(names)}); "
                            "set gpu_model to one of them, or make such a GPU visible (--gpus / CUDA_VISIBLE_DEVICES)")
    else:
        first = gpus[0]
    return GpuPlan(first.model, tuple(g for g in gpus if g.model == first.model))


def model_matches(wanted: str, name: str) -> bool:
    """'NVIDIA H100 80GB HBM3' is matched by itself, case aside, and by any of its words ('H100')."""
    w = wanted.strip().lower()
    return w == name.lower() or w in name.lower().replace("-", " ").split()


OVERLAP_ENV = "AITUNE_GPU_OVERLAP"  # "0": a GPU compiles nothing else while a target's artifact is checked


def overlap_checks() -> bool:
    """Whether a GPU may compile the next target while the previous one's artifact is loaded and checked on it."""
    return os.environ.get(OVERLAP_ENV, "1") != "0"


class Cancelled(Exception):
    """GpuPool.cancel() was called (Ctrl-C): no GPU is lent any more."""


class Lease:
    """One compile's (or measurement's) hold on a GPU, from GpuPool.acquire(). give_back() ends the compile part
    early (idempotent, from any thread); the lease still *uses* the GPU until its block exits."""

    def __init__(self, pool: GpuPool, gpu: Gpu, lock: Any, exclusive: bool):
        self.pool, self.gpu, self._lock, self.exclusive = pool, gpu, lock, exclusive
        self._use: int | None = None  # the descriptor holding gpu-<uuid>.use
        self._given_back = False

    def give_back(self) -> None:
        self.pool._give_back(self)


class GpuPool:
    """Lends each GPU to one compile at a time: within this process (a condition) and across processes that share
    the lock folder (one lock file per GPU UUID, held while the compile runs). A GPU is given back when the block
    exits, whatever happens inside (a failed or crashed worker frees its GPU), or earlier through Lease.give_back():
    once a worker is done with the GPU (its backend's `gpu_free_phases`: its save started, or its artifact is written),
    the next compile may start on the GPU while that worker saves, loads and checks.

    Until its block exits, a lease also *uses* its GPU (in this process a count, across processes a shared flock on
    `gpu-<uuid>.use`). An exclusive lease — a tuned target's measurement, or a compile that times kernels — waits,
    once it holds the GPU, until no other lease uses it, so nothing runs beside it."""

    def __init__(self, gpus: tuple[Gpu, ...] | list[Gpu], lock_dir: Path | None, poll: float = 0.2):
        self.gpus = tuple(gpus)
        self.lock_dir = lock_dir
        self.poll = poll
        self._free = list(self.gpus)
        self._cond = threading.Condition()
        self._users: dict[str, int] = {}  # uuid -> leases in this process not yet ended (given back early or not)
        self._cancelled = False

    @contextmanager
    def acquire(self, exclusive: bool = False) -> Iterator[Lease]:
        if not self.gpus:
            raise RuntimeError("GpuPool.acquire: no GPU to lend")
        gpu, lock = self._take()
        lease = Lease(self, gpu, lock, exclusive)
        try:
            with self._cond:
                while exclusive and self._users.get(gpu.uuid) and not self._cancelled:
                    self._cond.wait()
                if self._cancelled:
                    raise Cancelled()
                self._users[gpu.uuid] = self._users.get(gpu.uuid, 0) + 1
            try:
                lease._use = self._use_lock(gpu, exclusive)
                try:
                    yield lease
                finally:
                    with self._cond:  # not while a give_back() from another thread uses it
                        fd, lease._use = lease._use, None
                    if fd is not None:
                        os.close(fd)  # closing the descriptor drops its flock
            finally:
                with self._cond:
                    self._users[gpu.uuid] -= 1
                    self._cond.notify_all()
        finally:
            self._give_back(lease)

    def cancel(self) -> None:
        """Ctrl-C: every wait for a GPU raises Cancelled from now on."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def _give_back(self, lease: Lease) -> None:
        with self._cond:
            if lease._given_back:
                return
            lease._given_back = True
            if lease.exclusive and lease._use is not None:  # a compile that timed kernels, now checking: shared use
                import fcntl

                try:
                    fcntl.flock(lease._use, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError:
                    pass
        try:
            if lease._lock is not None:
                lease._lock.release()
        finally:
            self._put_back(lease.gpu)

    def _put_back(self, gpu: Gpu) -> None:
        with self._cond:
            self._free.append(gpu)
            self._free.sort(key=self.gpus.index)
            self._cond.notify_all()

    def _use_lock(self, gpu: Gpu, exclusive: bool) -> int | None:
        """A descriptor holding `gpu-<uuid>.use` shared (exclusive: alone, waiting for other processes' users); None
        without a lock folder or where the file system has no flock (then other processes' users are not seen)."""
        if self.lock_dir is None:
            return None
        import errno
        import fcntl

        try:  # read-only suffices for flock, and works on a file another user created
            fd = os.open(self.lock_dir / f"gpu-{gpu.uuid}.use", os.O_RDONLY | os.O_CREAT, 0o666)
        except OSError:
            return None
        try:
            while True:
                try:
                    fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    pass
                except OSError as e:
                    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        os.close(fd)
                        return None
                    raise
                if self._cancelled:
                    raise Cancelled()
                time.sleep(min(self.poll, 0.1))
        except BaseException:
            os.close(fd)
            raise

    def _take(self) -> tuple[Gpu, Any]:
        while True:
            with self._cond:
                while not self._free and not self._cancelled:
                    self._cond.wait()
                if self._cancelled:
                    raise Cancelled()
                candidates = list(self._free)
                if self.lock_dir is None:
                    gpu = candidates[0]
                    self._free.remove(gpu)
                    return gpu, None
            # Another aitune-build on this machine may hold some: try each free one without waiting.
            for gpu in candidates:
                with self._cond:
                    if gpu not in self._free:
                        continue
                    self._free.remove(gpu)
                lock = self._file_lock(gpu)
                try:
                    if _try_acquire(lock):
                        return gpu, lock
                finally:
                    if not lock.is_locked:  # another aitune-build holds it (or the attempt failed)
                        self._put_back(gpu)
            time.sleep(self.poll)

    def _file_lock(self, gpu: Gpu) -> Any:
        from filelock import FileLock

        assert self.lock_dir is not None
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        # Not thread-local: Lease.give_back() releases it from the thread that watches the worker's phases.
        return FileLock(str(self.lock_dir / f"gpu-{gpu.uuid}.lock"), thread_local=False)


def _try_acquire(lock: Any) -> bool:
    from filelock import Timeout

    try:
        lock.acquire(timeout=0)
        return True
    except Timeout:
        return False
