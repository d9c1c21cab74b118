"""PyTorch's own compile caches ("mega-cache": FX graph, AOTAutograd, Inductor and autotuning entries) and Inductor's
compiled C++ kernels stored with a JIT target, so that its first call in a new process skips most of torch.compile's
work.

The build's worker (a fresh process, one per target) compiles while checking the artifact; afterwards
`torch.compiler.save_cache_artifacts()` serialises what those compiles produced into COMPILE_CACHE in the artifact
folder, which goes into the store entry with the other files (checksummed like them). `load()` hands the bytes to
`torch.compiler.load_cache_artifacts()` before compiling, so the first call finds its graphs in the local caches.
These entries hold generated code that torch runs, as the TensorRT engine cache does: they are read only from a
verified store entry or release archive of this target, never from anywhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any

COMPILE_CACHE = "compile_cache.bin"
# Inductor's compiled C++ kernels (CPU), which the mega-cache leaves out: on a cache hit Inductor would compile
# them again. Stored by their path relative to Inductor's cache folder, restored there when missing.
KERNELS = "inductor_kernels"


def save(artifact_dir: Path) -> dict[str, Any]:
    """Write this process's compile-cache artifacts next to the target's record; facts for build.json."""
    import torch

    from ..fsutil import atomic_write_bytes

    saver = getattr(torch.compiler, "save_cache_artifacts", None)
    if saver is None:
        return {"compile_cache": f"not available in torch {torch.__version__}"}
    got = saver()
    if not got or not got[0]:
        return {"compile_cache": "empty"}
    data, info = got
    atomic_write_bytes(artifact_dir / COMPILE_CACHE, data)
    kernels = _save_kernels(artifact_dir / KERNELS)
    return {"compile_cache": {"bytes": len(data), "entries": {k: len(v) for k, v in sorted(info.artifacts.items())},
                              "kernels": kernels}}


def _inductor_cache_dir() -> Path | None:
    try:
        from torch._inductor.runtime.runtime_utils import cache_dir
    except ImportError:
        return None
    return Path(cache_dir()).resolve()


def _save_kernels(dest: Path) -> int:
    """Copy the kernel libraries this process loaded from Inductor's cache folder (as /proc/self/maps lists them:
    hits and misses alike, nothing of other processes)."""
    import shutil

    root = _inductor_cache_dir()
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return 0
    if root is None:
        return 0
    found = sorted({line.split(maxsplit=5)[5] for line in maps.splitlines() if len(line.split(maxsplit=5)) == 6})
    n = 0
    for name in [*found, *_isa_probes(root)]:
        path = Path(name)
        if path.suffix != ".so" or not path.is_file() or root not in path.parents:
            continue
        target = dest / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        n += 1
    return n


def _isa_probes(root: Path) -> list[str]:
    """The libraries of Inductor's vector-ISA check (a test program it compiles into its cache folder and loads in a
    child process, so /proc/self/maps never lists it): without them a fresh cache folder compiles the check again at
    the first call, 3.3 s of a 5.5 s warm first call on the 2-core VM. Found by their source, next to them."""
    try:
        from torch._inductor.cpu_vec_isa import VecISA

        code = VecISA._avx_code.encode()
    except (ImportError, AttributeError):
        return []
    out = []
    try:
        subdirs = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    for sub in subdirs:
        try:
            entries = list(os.scandir(sub.path))
        except OSError:
            continue
        for e in entries:
            if not e.name.endswith(".cpp") or e.stat().st_size != len(code):
                continue
            try:
                if Path(e.path).read_bytes() == code:
                    out.append(e.path[: -len(".cpp")] + ".so")
            except OSError:
                continue
    return out


def _restore_kernels(src: Path) -> int:
    """Put stored kernel libraries into this process's Inductor cache folder where missing (atomic copies)."""
    from ..fsutil import atomic_copy

    root = _inductor_cache_dir()
    if root is None or not src.is_dir():
        return 0
    n = 0
    for path in sorted(src.rglob("*.so")):
        rel = path.relative_to(src)
        if path.is_symlink() or ".." in rel.parts:
            continue
        target = root / rel
        if not target.exists():
            atomic_copy(path, target)
            n += 1
    return n


def restore(artifact_dir: Path) -> dict[str, int] | None:
    """Load the stored compile caches into this process's torch (before the first compile). Entries per kind."""
    path = artifact_dir / COMPILE_CACHE
    if not path.is_file():
        return None
    import torch

    loader = getattr(torch.compiler, "load_cache_artifacts", None)
    if loader is None:
        return None
    info = loader(path.read_bytes())
    found = {k: len(v) for k, v in info.artifacts.items()} if info is not None else {}
    found["kernels"] = _restore_kernels(artifact_dir / KERNELS)
    return found


class NoGradCall:
    """Calls a torch.compile'd module under torch.no_grad(), as the build's check did: the compile caches stored
    by the build hold graphs compiled without autograd, so only a call in the same mode finds them."""

    def __init__(self, fn: Any):
        self.fn = fn

    def __call__(self, **inputs: Any) -> Any:
        import torch

        with torch.no_grad():
            return self.fn(**inputs)


class MarkDynamic:
    """Calls a torch.compile'd module with the declared dynamic axes of its inputs marked dynamic
    (`torch._dynamo.maybe_mark_dynamic`, on a view: the caller's tensor keeps no mark). Without this, Dynamo
    compiles the first call's shapes statically and goes dynamic only at the second shape, so which graphs exist —
    and whether the compile caches stored by the build (whose check calls min, opt, max) match the first call of
    another process — would depend on the order of the shapes the application happens to call with."""

    def __init__(self, fn: Any, inputs: Any):
        self.fn = fn
        self.axes = {s.name: [i for i, d in enumerate(s.shape) if not isinstance(d, int)] for s in inputs if s.is_dynamic}

    def __call__(self, **inputs: Any) -> Any:
        if self.axes:
            import torch

            mark = torch._dynamo.maybe_mark_dynamic
            for name, axes in self.axes.items():
                t = inputs.get(name)
                if isinstance(t, torch.Tensor):
                    t = t.view(t.shape)
                    for i in axes:
                        if i < t.dim():
                            mark(t, i)
                    inputs[name] = t
        return self.fn(**inputs)
