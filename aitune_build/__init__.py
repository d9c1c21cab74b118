"""aitune-build: make-like builds of compiled PyTorch models, declared in aitune.toml.

Importing this package does not import torch.
"""

from __future__ import annotations

from .errors import AituneError, ManifestError, UserError

__version__ = "0.1.0"


def load(target: str, manifest: str = "aitune.toml", *, build: bool = False, archive: str | None = None,
         strict: bool = False):
    """A callable module from TARGET's artifact (see aitune_build.runtime.load): inputs checked against the specs,
    outputs without grad; a stale materialised artifact warns once (raises with strict=True)."""
    from .runtime import load as _load

    return _load(target, manifest, build=build, archive=archive, strict=strict)


__all__ = ["AituneError", "ManifestError", "UserError", "load", "__version__"]
