"""Serving one class: checks before the first call, the artifact in place of forward, eager whenever in doubt.

Called (bootstrap.py) right after the module that defines a served target's class has been imported, so torch is
already loaded by the application. For each candidate target of that module:

1. the target is up to date (key, artifact files) and the live class's source file is the one its key hashed
   (AITUNE_BUILD_ON_START=1 builds a stale target first, progress on stderr);
2. the class's forward is replaced by `ServedForward`. An instance's first call computes the digest of its
   parameters and buffers and picks the candidate built with those weights (none: eager, one warning naming the
   target and the reason); the artifact is loaded then, once per process, through aitune_build.load();
3. each call checks the inputs against the built names, dtypes, devices and shape ranges (a few integer
   comparisons) and runs eager for a call that does not fit, warning once per target and reason.

`load_state_dict` and `.to()`/`.half()`/`.cuda()` on the instance or an ancestor, and assigning a module, parameter
or tensor attribute on the instance itself, make the next call check the weights again. In-place edits of parameter
data, and assignments inside its submodules, after the first call are not seen.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..failures import summary
from .bootstrap import NOT_SERVED, WARNINGS, warn

_STATE = "_aitune_serving"  # per instance, in its __dict__: the ServedTarget it calls, or None for eager
_inside = threading.local()  # set while an artifact runs: a module it calls (eager, JIT targets) runs eager
TARGETS: dict[str, ServedTarget] = {}  # every target considered in this process, for the debug record


class ServedTarget:
    """One `serve = true` target: its checks, its artifact (loaded on first use) and its call counts."""

    def __init__(self, manifest: str, name: str, record: dict[str, Any], qualname: str):
        self.manifest, self.name, self.record, self.qualname = manifest, name, record, qualname
        comps = record["components"]
        self.inputs = [i["name"] for i in comps["module"]["inputs"]]
        self.specs = {i["name"]: i for i in comps["module"]["inputs"]}
        self.device_type = comps["backend"].get("device", "cpu")
        self.cuda = self.device_type == "cuda"
        self.cast = (record.get("record") or {}).get("cast")
        self.state_xxh3 = record["record"]["module"]["state_xxh3"]
        self.bounds: dict[str, list[tuple[int, int]]] = {}
        self.dims: dict[str, list[tuple[str, int]]] = {}  # shared dim name -> (input, axis) that must be equal
        for spec in comps["module"]["inputs"]:
            axes = []
            for j, d in enumerate(spec["shape"]):
                if isinstance(d, dict):
                    axes.append((d["min"], d["max"]))
                    if d.get("dim"):
                        self.dims.setdefault(d["dim"], []).append((spec["name"], j))
                else:
                    axes.append((d, d))
            self.bounds[spec["name"]] = axes
        self.dims = {k: v for k, v in self.dims.items() if len(v) > 1}
        self.dtypes: dict[str, Any] = {}
        self.out_dtype: Any = None  # what the eager module returns for floating outputs (see _uncast)
        self.fn: Any = None
        self.status = "patched"  # patched | serving | failed | skipped
        self.error: str | None = None  # the traceback of what made it fail (debug record only)
        self.served_calls = 0
        self.eager_calls = 0
        self.timings: dict[str, float] = {}  # seconds: check, weights_digest, load, first_call (the debug record)
        self.eager_reasons: dict[str, int] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    # --- per call --------------------------------------------------------------------------------------------

    def misfit(self, inputs: dict[str, Any], tensor_type: type) -> tuple[str, str] | None:
        """(kind, reason) when these inputs cannot go to the artifact, None when they fit."""
        if inputs.keys() != self.bounds.keys():
            return "arguments", f"arguments {sorted(inputs)} are not the built inputs {sorted(self.bounds)}"
        for name, bounds in self.bounds.items():
            t = inputs[name]
            if type(t) is not tensor_type:
                return "type", f"input '{name}' is a {type(t).__name__}, not a plain tensor"
            if t.dtype is not self.dtypes[name]:
                return "dtype", f"input '{name}' has dtype {str(t.dtype).removeprefix('torch.')}; the artifact takes {self.specs[name]['dtype']}"
            if t.is_cuda is not self.cuda:  # is_cuda: no torch.device object made per call
                return "device", f"input '{name}' is on {t.device.type}; the artifact runs on {self.device_type}"
            if t.requires_grad:
                return "grad", f"input '{name}' requires grad"
            shape = t.shape
            fits = len(shape) == len(bounds)
            if fits:
                for d, (lo, hi) in zip(shape, bounds):
                    if not lo <= d <= hi:
                        fits = False
                        break
            if not fits:
                want = ", ".join(str(lo) if lo == hi else f"{lo}..{hi}" for lo, hi in bounds)
                return "shape", f"input '{name}' has shape {list(shape)}; the artifact takes [{want}]"
        for dim, axes in self.dims.items():
            sizes = {inputs[n].shape[j] for n, j in axes}
            if len(sizes) > 1:
                return "shape", f"axes of dim '{dim}' differ ({', '.join(f'{n}[{j}]' for n, j in axes)}: {sorted(sizes)})"
        return None

    def eager(self, kind: str, reason: str) -> None:
        self.eager_calls += 1
        self.eager_reasons[kind] = self.eager_reasons.get(kind, 0) + 1
        if kind not in self._warned:
            self._warned.add(kind)
            warn(f"{self.name}: {reason}; this call runs eager (warned once)")

    def warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warn(f"{self.name}: {message}")

    # --- first use -------------------------------------------------------------------------------------------

    def ensure_loaded(self) -> bool:
        if self.fn is not None:
            return True
        if self.status == "failed":
            return False
        with self._lock:
            if self.fn is None and self.status != "failed":
                try:
                    import torch

                    from ..runtime import load

                    self.dtypes = {n: getattr(torch, s["dtype"]) for n, s in self.specs.items()}
                    self.out_dtype = next((d for d in self.dtypes.values() if d.is_floating_point), torch.float32)
                    t0 = time.perf_counter()
                    loaded = load(self.name, self.manifest)
                    self.timings["load"] = round(time.perf_counter() - t0, 4)
                    self.fn = getattr(loaded, "fn", loaded)  # the backend's callable: inputs are bound by name here
                    self.status = "serving"
                except Exception as e:  # noqa: BLE001
                    self.fail(f"cannot load the artifact ({summary(e)})", e)
        return self.fn is not None

    def fail(self, why: str, error: BaseException | None = None) -> None:
        import traceback

        self.status = "failed"
        self.fn = None
        if error is not None:  # the whole story for the debug record (AITUNE_SERVE_DEBUG); the warning stays short
            self.error = "".join(traceback.format_exception(error))[-20_000:]
        self.warn_once("failed", f"{why}; {self.qualname} runs eager from now on")

    def debug(self) -> dict[str, Any]:
        found = {"status": self.status, "class": self.qualname, "served_calls": self.served_calls,
                 "eager_calls": self.eager_calls, "eager_reasons": dict(self.eager_reasons), "timings": dict(self.timings)}
        if self.error:
            found["error"] = self.error
        return found


def _in_worker() -> bool:
    """aitune-build's own build worker imports the factory's module: never patch there."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return "aitune_build.worker" in sys.modules or getattr(spec, "name", None) == "aitune_build.worker"


def serve_module(manifest: str, module: Any, candidates: list[tuple[str, str]]) -> None:
    """Patch the served classes of `module`, just imported. candidates: (target, class qualname)."""
    if _in_worker() or os.environ.get("AITUNE_SERVE") == "0":
        return
    from .bootstrap import _read_record

    by_class: dict[str, list[ServedTarget]] = {}
    for target, qualname in candidates:
        served = _check_target(manifest, module, target, qualname, _read_record(manifest, target) or {})
        if served is None:
            NOT_SERVED[target] = WARNINGS[-1] if WARNINGS else "not served"
        else:
            by_class.setdefault(qualname, []).append(served)
    for qualname, targets in by_class.items():
        cls = _resolve(module, qualname)
        if not isinstance(cls, type):
            for t in targets:
                t.status = "skipped"
                warn(f"{t.name}: {module.__name__} has no class {qualname} (it was built from one); running eager")
            continue
        _patch(cls, targets)


def _check_target(manifest: str, module: Any, target: str, qualname: str, record: dict[str, Any]) -> ServedTarget | None:
    """The target, checked up to date and built from this module's source; None (with a warning) otherwise."""
    from ..errors import AituneError
    from ..hashing import hash_file
    from ..manifest import module_file
    from ..plan import select
    from ..project import Project, survey

    build_on_start = os.environ.get("AITUNE_BUILD_ON_START") == "1"
    t0 = time.perf_counter()
    try:
        project = Project.open(manifest, readonly_cache=True)
        found = survey(project, select(project.manifest.model, [target]))[target]
        if not project.manifest.model.targets[target].serve:
            return None
        if found.staleness.stale:
            why = "; ".join(found.staleness.reasons[:3])
            if not build_on_start:
                warn(f"{target} is {found.staleness.state} ({why}); {qualname} runs eager. Rebuild it: "
                     f"aitune-build --manifest {manifest} build {target} (or set AITUNE_BUILD_ON_START=1)")
                return None
            warn(f"{target} is {found.staleness.state} ({why}); building it first (AITUNE_BUILD_ON_START=1)")
            if not build_targets(manifest, [target]):
                return None
            from .bootstrap import _read_record

            record = _read_record(manifest, target) or {}
        comps = record["components"]
        root = project.manifest.root
    except AituneError as e:
        warn(f"{target}: {e}; {qualname} runs eager")
        return None
    cls_rec = ((record.get("record") or {}).get("module") or {}).get("class") or {}
    if (cls_rec.get("module"), cls_rec.get("qualname")) != (module.__name__, qualname):
        warn(f"{target}: now built from {cls_rec.get('module')}.{cls_rec.get('qualname')}, not {module.__name__}.{qualname}; running eager")
        return None
    # The class's source must be the file the key hashed (a project-local module); a third-party class (say
    # torchvision's ResNet) is covered by its name and the weights digest.
    local = module_file(root, module.__name__)
    if local is not None:
        rel = local.relative_to(root).as_posix()
        live = getattr(module, "__file__", None)
        want = comps["sources"].get(rel)
        if want is None:
            warn(f"{target}: its key does not cover {rel}, where {qualname} is defined; running eager")
            return None
        if live is None or hash_file(Path(live)) != want:
            warn(f"{target}: the application imported {qualname} from {live}, which differs from {rel} in the target's key; running eager")
            return None
    served = ServedTarget(manifest, target, record, qualname)
    served.timings["check"] = round(time.perf_counter() - t0, 4)
    TARGETS[target] = served
    return served


def build_targets(manifest: str, targets: list[str]) -> bool:
    """Build targets now (AITUNE_BUILD_ON_START=1), progress on stderr. True when all of them are built or cached."""
    from ..errors import AituneError
    from ..executor import FAILED, SKIPPED, BuildOptions, build
    from ..plan import select
    from ..project import Project

    def listen(event: str, name: str, result: Any) -> None:
        if event == "start":
            sys.stderr.write(f"aitune-build: serve: building {name} ...\n")
        else:
            sys.stderr.write(f"aitune-build: serve: {result.status:<8} {name} {result.seconds:.2f}s {result.reason}\n")
        sys.stderr.flush()

    before = os.environ.get("AITUNE_SERVE")
    os.environ["AITUNE_SERVE"] = "0"  # the build's worker processes inherit the environment: no hook there
    try:
        project = Project.open(manifest)
        results = build(project, select(project.manifest.model, targets), BuildOptions(named=tuple(targets)), listen)
    except AituneError as e:
        warn(f"building {', '.join(targets)} failed: {e}")
        return False
    finally:
        if before is None:
            os.environ.pop("AITUNE_SERVE", None)
        else:
            os.environ["AITUNE_SERVE"] = before
    bad = [r for r in results if r.status in (FAILED, SKIPPED)]
    for r in bad:
        warn(f"{r.name} {r.status}: {r.reason}")
    return not bad


def _resolve(module: Any, qualname: str) -> Any:
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _patch(cls: type, targets: list[ServedTarget]) -> None:
    import torch

    original = cls.__dict__.get("forward") or cls.forward
    if getattr(original, "__aitune_served__", None) is not None:
        return  # patched already (the hook was entered twice)
    served_forward = ServedForward(cls, original, targets, torch)
    cls.forward = served_forward.as_method()
    original_apply = cls._apply
    original_load = cls._load_from_state_dict

    @functools.wraps(original_apply)
    def _apply(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.__dict__.pop(_STATE, None)  # moved or cast: check the weights again at the next call
        return original_apply(self, *args, **kwargs)

    @functools.wraps(original_load)
    def _load_from_state_dict(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.__dict__.pop(_STATE, None)  # new weights: check them again at the next call
        return original_load(self, *args, **kwargs)

    original_setattr = cls.__setattr__
    held = (torch.nn.Module, torch.Tensor)

    @functools.wraps(original_setattr)
    def __setattr__(self: Any, name: str, value: Any) -> None:
        if isinstance(value, held):
            self.__dict__.pop(_STATE, None)  # a new submodule, parameter or buffer: check the weights again
        original_setattr(self, name, value)

    cls._apply = _apply
    cls._load_from_state_dict = _load_from_state_dict
    cls.__setattr__ = __setattr__


class ServedForward:
    """The forward that replaces a served class's: the artifact when the instance and the inputs fit, else eager."""

    def __init__(self, cls: type, original: Any, targets: list[ServedTarget], torch: Any):
        import inspect

        self.cls, self.original, self.targets = cls, original, targets
        self.tensor = torch.Tensor
        compiler = getattr(torch, "compiler", None)
        self.compiling = getattr(compiler, "is_compiling", None) or (lambda: False)
        params = list(inspect.signature(original).parameters.values())[1:]
        self.positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._lock = threading.Lock()

    def as_method(self) -> Any:
        original, call = self.original, self.__call__

        @functools.wraps(original)
        def forward(module: Any, *args: Any, **kwargs: Any) -> Any:
            return call(module, args, kwargs)

        forward.__aitune_served__ = self  # type: ignore[attr-defined]
        return forward

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> Any:
        original = self.original
        # compiling() first: under torch.compile/export tracing (a JIT target's own load included) it is a constant.
        if self.compiling() or type(module) is not self.cls or getattr(_inside, "active", False):
            return original(module, *args, **kwargs)
        try:
            target = module.__dict__.get(_STATE, _STATE)
            if target is _STATE:
                target = self._bind(module)
            if type(target) is not ServedTarget:
                target.count()  # an _Unmatched instance
                return original(module, *args, **kwargs)
            if target.fn is None:
                target.eager("failed", "the artifact failed")
                return original(module, *args, **kwargs)
            if module.training:
                target.eager("training", f"{self.cls.__qualname__} is in training mode (the artifact is the eval-mode module; call .eval())")
                return original(module, *args, **kwargs)
            if len(args) > len(self.positional):
                target.eager("arguments", f"{len(args)} positional arguments")
                return original(module, *args, **kwargs)
            inputs = dict(zip(self.positional, args))
            if kwargs:
                inputs.update(kwargs)
            why = target.misfit(inputs, self.tensor)
            if why is not None:
                target.eager(*why)
                return original(module, *args, **kwargs)
        except Exception as e:  # noqa: BLE001  (a bug of ours: eager, never the application's crash)
            warn(f"{self.cls.__qualname__}: the serving hook raised {type(e).__name__}: {e}; running eager")
            module.__dict__[_STATE] = _Unmatched([], "hook")
            return original(module, *args, **kwargs)
        _inside.active = True
        t0 = time.perf_counter() if not target.served_calls else 0.0
        try:
            out = target.fn(**inputs)
        except Exception as e:  # noqa: BLE001
            target.fail(f"the artifact raised {summary(e)}", e)
            return original(module, *args, **kwargs)
        finally:
            _inside.active = False
        if not target.served_calls:
            target.timings["first_call"] = round(time.perf_counter() - t0, 4)
        target.served_calls += 1
        if target.cast is not None:
            out = _uncast(out, target.out_dtype)
        return out

    def _bind(self, module: Any) -> ServedTarget | _Unmatched:
        """The target built with this instance's weights (loaded), or an _Unmatched: this instance runs eager."""
        from .identity import state_digest

        with self._lock:
            t0 = time.perf_counter()
            digest = state_digest(module)
            took = round(time.perf_counter() - t0, 4)
            for t in self.targets:
                t.timings.setdefault("weights_digest", took)
            match: ServedTarget | _Unmatched | None = next((t for t in self.targets if t.state_xxh3 == digest), None)
            if match is None:
                for t in self.targets:
                    t.warn_once("weights", f"this {self.cls.__qualname__}'s parameters and buffers differ from the weights the "
                                           "target was built with (other weights loaded, or other constructor arguments); "
                                           "it runs eager")
                match = _Unmatched(self.targets, "weights")
            elif not match.ensure_loaded():
                match = _Unmatched([match], "failed")
            module.__dict__[_STATE] = match
        return match


class _Unmatched:
    """An instance that runs eager: its weights match no target, or its target failed. Counts its calls."""

    def __init__(self, targets: list[ServedTarget], kind: str):
        self.targets, self.kind = targets, kind

    def count(self) -> None:
        for t in self.targets:
            t.eager_calls += 1
            t.eager_reasons[self.kind] = t.eager_reasons.get(self.kind, 0) + 1


def _uncast(out: Any, dtype: Any) -> Any:
    """A reduced-precision artifact (fp16 TensorRT) returns half tensors; the application's module returned its
    inputs' floating dtype, so the served call does too."""
    import torch

    if isinstance(out, torch.Tensor):
        return out.to(dtype) if out.is_floating_point() else out
    import torch.utils._pytree as pytree

    return pytree.tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, out)
