"""What makes a live module the one a target was built from: its class and a digest of its parameters and buffers.

The worker records both in build.json at build time (from the eager reference module); the serving hook computes
the digest of the application's own instance before its first served call. Imports torch (callers have).
"""

from __future__ import annotations

from typing import Any

DIGEST_VERSION = 1


def class_of(module: Any) -> dict[str, str]:
    cls = type(module)
    return {"module": cls.__module__, "qualname": cls.__qualname__}


def state_digest(module: Any) -> str:
    """xxh3-128 over every parameter and buffer: name, dtype, shape and bytes, in name order, device-independent."""
    import torch
    import xxhash

    h = xxhash.xxh3_128(f"aitune-state-v{DIGEST_VERSION}".encode())
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    for name in sorted(tensors):
        t = tensors[name]
        if t is None:
            continue
        t = t.detach()
        h.update(f"\0{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().data if flat.dtype != torch.uint8 else flat.numpy().data)
    return h.hexdigest()


def identity(module: Any) -> dict[str, Any]:
    """What the worker records for a target: {"class": {module, qualname}, "state_xxh3", "digest_version"}."""
    return {"class": class_of(module), "state_xxh3": state_digest(module), "digest_version": DIGEST_VERSION}
