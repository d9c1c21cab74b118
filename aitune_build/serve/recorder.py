"""`aitune-build record`, in the application's process: what each chosen module receives, written at exit.

Chosen modules are classes named `pkg.mod:Class`, or, when none is named, every module the application calls
directly (not from inside another module's forward). Once the application has imported torch, nn.Module's
__call__ is wrapped to note each chosen call's inputs (names bound to forward's signature; dtype and shape of each
tensor; low/high values of integer tensors), __new__ to keep each module's constructor arguments, and
torch.load/load_state_dict to learn which file a module's weights came from. At exit, one JSON file per process is
written into AITUNE_RECORD; the `record` command merges them and writes aitune.toml (manifest_edit.py).
"""

from __future__ import annotations

import os
import threading
from typing import Any

_INIT = "_aitune_init_args"
_WEIGHTS = "_aitune_weights"
_MAX_SIGNATURES = 10_000

_classes: dict[str, dict[str, Any]] = {}  # "module:qualname" -> what was seen
_loaded: dict[int, tuple[str, int]] = {}  # id(state dict returned by torch.load) -> (file, len)
_local = threading.local()
_lock = threading.Lock()


def start(out_dir: str, modules: str) -> None:
    import atexit

    from .imports import when_imported

    chosen = {m.strip() for m in modules.split(",") if m.strip()}
    atexit.register(_write, out_dir, chosen)
    when_imported("torch", lambda torch: _install(torch, chosen))


def _install(torch: Any, chosen: set[str]) -> None:
    import inspect

    Module = torch.nn.Module
    call, new, load_sd, load = Module.__call__, Module.__dict__.get("__new__"), Module.load_state_dict, torch.load
    signatures: dict[type, Any] = {}

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        depth = getattr(_local, "depth", 0)
        cls = type(self)
        if (f"{cls.__module__}:{cls.__qualname__}" in chosen) if chosen else depth == 0:
            try:
                sig = signatures.get(cls)
                if sig is None:
                    sig = signatures[cls] = inspect.signature(cls.forward)
                _note(self, sig.bind(self, *args, **kwargs).arguments, torch)
            except Exception:  # noqa: BLE001  (recording never breaks the application)
                pass
        _local.depth = depth + 1
        try:
            return call(self, *args, **kwargs)
        finally:
            _local.depth = depth

    def __new__(cls: type, *args: Any, **kwargs: Any) -> Any:
        obj = new(cls, *args, **kwargs) if new is not None else object.__new__(cls)
        if args or kwargs:
            obj.__dict__[_INIT] = (args, kwargs)
        return obj

    def load_state_dict(self: Any, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        hit = _loaded.get(id(state_dict))
        self.__dict__[_WEIGHTS] = hit[0] if hit is not None and hit[1] == len(state_dict) else None
        return load_sd(self, state_dict, *args, **kwargs)

    def torch_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        out = load(f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)) and isinstance(out, dict):
            _loaded[id(out)] = (os.path.abspath(f), len(out))
        return out

    Module.__call__ = __call__
    Module.__new__ = staticmethod(__new__)
    Module.load_state_dict = load_state_dict
    torch.load = torch_load


def _note(module: Any, arguments: dict[str, Any], torch: Any) -> None:
    cls = type(module)
    key = f"{cls.__module__}:{cls.__qualname__}"
    sig: list[Any] = []
    values: dict[str, list] = {}
    other: dict[str, str] = {}
    for name, value in arguments.items():
        if name == "self":
            continue
        if isinstance(value, torch.Tensor):
            sig.append([name, str(value.dtype).removeprefix("torch."), list(value.shape)])
            if not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool) and value.numel():
                values[name] = [int(value.min()), int(value.max())]
        elif value is not None:
            other[name] = type(value).__name__
    with _lock:
        rec = _classes.get(key)
        if rec is None:
            rec = _classes[key] = {"module": cls.__module__, "qualname": cls.__qualname__, "calls": 0, "signatures": {},
                                   "values": {}, "other_args": {}, "init": _init_args(module), "instances": 0,
                                   "weights": module.__dict__.get(_WEIGHTS), "file": _file_of(cls),
                                   "tensors": len(module.state_dict())}
            rec["_ids"] = set()
        if id(module) not in rec["_ids"]:
            rec["_ids"].add(id(module))
            rec["instances"] += 1
        rec["calls"] += 1
        s = repr(sig)
        if s in rec["signatures"] or len(rec["signatures"]) < _MAX_SIGNATURES:
            rec["signatures"][s] = [sig, rec["signatures"].get(s, [sig, 0])[1] + 1]
        for name, (lo, hi) in values.items():
            old = rec["values"].get(name, [lo, hi])
            rec["values"][name] = [min(old[0], lo), max(old[1], hi)]
        rec["other_args"].update(other)


def _file_of(cls: type) -> str | None:
    import sys

    return getattr(sys.modules.get(cls.__module__), "__file__", None)


def _init_args(module: Any) -> dict[str, Any]:
    """The constructor's arguments by name, those that are TOML values; the others named in "unserializable"."""
    import inspect

    args, kwargs = module.__dict__.get(_INIT, ((), {}))
    try:
        bound = inspect.signature(type(module).__init__).bind(module, *args, **kwargs).arguments
    except (TypeError, ValueError):
        return {"args": {}, "unserializable": ["(could not bind the constructor's arguments)"]}
    out: dict[str, Any] = {}
    bad: list[str] = []
    for name, value in bound.items():
        if name == "self":
            continue
        plain = _plain(value)
        if plain is _NOT_PLAIN:
            bad.append(f"{name} ({type(value).__name__})")
        else:
            out[name] = plain
    return {"args": out, "unserializable": bad}


_NOT_PLAIN = object()


def _plain(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        items = [_plain(x) for x in v]
        return _NOT_PLAIN if any(x is _NOT_PLAIN for x in items) else items
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        items = {k: _plain(x) for k, x in v.items()}
        return _NOT_PLAIN if any(x is _NOT_PLAIN for x in items.values()) else items
    return _NOT_PLAIN


def _write(out_dir: str, chosen: set[str]) -> None:
    import json

    with _lock:
        classes = {k: {**{f: v for f, v in r.items() if f != "_ids"}, "signatures": list(r["signatures"].values())}
                   for k, r in _classes.items()}
    doc = {"pid": os.getpid(), "chosen": sorted(chosen), "classes": classes}
    try:
        os.makedirs(out_dir, exist_ok=True)
        tmp = os.path.join(out_dir, f".{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, os.path.join(out_dir, f"{os.getpid()}.json"))
    except OSError:
        pass
