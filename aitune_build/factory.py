"""The eager module of a [modules] entry: factory(**args), weights loaded, forward() checked, eval mode. Imports torch."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from typing import Any

from .failures import describe
from .manifest import LoadedManifest, ModuleSpec


def make_module(m: LoadedManifest, module_name: str, spec: ModuleSpec, device: str) -> Any:
    import torch

    key = f"modules.{module_name}"
    _add_to_path(str(m.root))
    module_path, fn_name = spec.factory.split(":")
    torch.manual_seed(0)  # a factory without weights initialises randomly: the same way every time
    try:
        fn = getattr(_import_from(str(m.root), module_path), fn_name)
        module = fn(**spec.args)
    except Exception as e:
        traceback.print_exc()
        raise m.error(f"{key}.factory", describe(e, m.root, f"{spec.factory}(**args) raised ")) from None
    if not isinstance(module, torch.nn.Module):
        raise m.error(f"{key}.factory", f"{spec.factory} returned a {type(module).__name__}, not a torch.nn.Module")
    if spec.weights is not None:
        try:
            state = torch.load(m.root / spec.weights, map_location="cpu", weights_only=True)
            module.load_state_dict(state)
        except Exception as e:
            # Keep torch's detail: which keys are missing or unexpected, which shapes differ, why unpickling refused.
            raise m.error(f"{key}.weights", f"cannot load {spec.weights} (save it with torch.save(model.state_dict(), "
                          f"path)): {type(e).__name__}: {str(e).strip()}") from None
    _check_forward(m, key, spec, module)
    return module.eval().to(device)


def _import_from(root: str, dotted: str) -> Any:
    """The project's module `dotted`, not a same-named one another project imported earlier in this process (two
    projects with a `models` package, loaded one after the other: the second must not get the first's classes)."""
    module = importlib.import_module(dotted)
    if _under(module, root):
        return module
    top = dotted.split(".")[0]
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]  # the other project's objects keep their module; only the name is freed
    if root in sys.path:
        sys.path.remove(root)
    _add_to_path(root)  # ahead of the other project's folder
    importlib.invalidate_caches()
    return importlib.import_module(dotted)


def _under(module: Any, root: str) -> bool:
    file = getattr(module, "__file__", None)
    return file is not None and os.path.realpath(file).startswith(os.path.realpath(root) + os.sep)


def _add_to_path(root: str) -> None:
    """Put the project folder on sys.path after the standard library, so that a project file named like a stdlib
    module (json.py, random.py) does not shadow it; project packages still come before site-packages."""
    if root in sys.path:
        return
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    after = 0
    for i, p in enumerate(sys.path):
        real = os.path.realpath(p) if p else ""
        if real in (stdlib, os.path.join(stdlib, "lib-dynload")) or p.endswith(".zip"):
            after = i + 1
    sys.path.insert(after, root)


def _check_forward(m: LoadedManifest, key: str, spec: ModuleSpec, module: Any) -> None:
    params = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for i, inp in enumerate(spec.inputs):
        if inp.name not in params:
            sig = ", ".join(params)
            raise m.error(f"{key}.inputs[{i}].name", f"'{inp.name}' is not a parameter of {type(module).__name__}.forward({sig})")
