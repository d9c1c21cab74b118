"""aitune-build: make-like builds of compiled PyTorch models, declared in aitune.toml.

Importing this package does not import torch.
"""

from __future__ import annotations

from .errors import AituneError, ManifestError, UserError

__version__ = "0.1.0"


def load(target: str, manifest: str = "aitune.toml", *, build: bool = False, archive: str | None = None):
    """A callable module from TARGET's artifact (see aitune_build.runtime.load)."""
    from .runtime import load as _load

    return _load(target, manifest, build=build, archive=archive)


__all__ = ["AituneError", "ManifestError", "UserError", "load", "__version__"]
