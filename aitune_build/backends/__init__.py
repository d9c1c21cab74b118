"""Backends: one file per kind, each a small class behind `Backend` with its config (a `BackendConfig`) beside it;
torch and friends are imported inside methods.

A kind is registered once, in vocabulary.BACKENDS (or AITUNE_BACKENDS for one outside this package); the manifest's
specs, the pydantic schema and the rules for `from` all derive from the class it names.
This module and every backend module import without torch, so planning and no-op builds stay light.
"""

from __future__ import annotations

import importlib

from ..errors import UserError
from ..vocabulary import BACKENDS_ENV, backend_registry
from .base import Backend, BackendConfig, BuildContext


def backend_for(kind: str) -> type[Backend]:
    """The class of a registered kind (a KeyError for a kind nobody registered)."""
    where = backend_registry()[kind]
    module, name = where.split(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"backend kind '{kind}': cannot import {where} ({e}); check {BACKENDS_ENV} and PYTHONPATH") from None
    if not (isinstance(cls, type) and issubclass(cls, Backend) and getattr(cls, "kind", None) == kind
            and issubclass(cls.config_class, BackendConfig)):
        raise UserError(f"backend kind '{kind}': {where} is not a Backend subclass with kind = '{kind}' and a "
                        "config_class deriving from BackendConfig")
    return cls


__all__ = ["Backend", "BackendConfig", "BuildContext", "backend_for"]
