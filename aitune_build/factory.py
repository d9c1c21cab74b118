"""The eager module of a [modules] entry: factory(**args), weights loaded, forward() checked, eval mode. Imports torch."""

from __future__ import annotations

import importlib
import inspect
import sys
import traceback
from typing import Any

from .failures import describe
from .manifest import LoadedManifest, ModuleSpec


def make_module(m: LoadedManifest, module_name: str, spec: ModuleSpec, device: str) -> Any:
    import torch

    key = f"modules.{module_name}"
    if str(m.root) not in sys.path:
        sys.path.insert(0, str(m.root))
    module_path, fn_name = spec.factory.split(":")
    torch.manual_seed(0)  # a factory without weights initialises randomly: the same way every time
    try:
        fn = getattr(importlib.import_module(module_path), fn_name)
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


def _check_forward(m: LoadedManifest, key: str, spec: ModuleSpec, module: Any) -> None:
    params = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for i, inp in enumerate(spec.inputs):
        if inp.name not in params:
            sig = ", ".join(params)
            raise m.error(f"{key}.inputs[{i}].name", f"'{inp.name}' is not a parameter of {type(module).__name__}.forward({sig})")
