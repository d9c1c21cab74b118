"""Backends: one file per kind, each a small class behind `Backend`; torch and friends are imported inside methods.

This module and every backend module import without torch, so planning and no-op builds stay light.
"""

from __future__ import annotations

import importlib

from ..vocabulary import BACKENDS as _KINDS
from .base import Backend, BuildContext


def backend_for(kind: str) -> type[Backend]:
    module, cls = _KINDS[kind].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


__all__ = ["Backend", "BuildContext", "backend_for"]
