"""Compare an artifact's outputs with eager's: every tensor leaf of a tensor, tuple, list, dict or model-output object."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

# (rtol, atol) by the precision a backend computes in. A leaf passes when
# max|got - ref| <= atol + rtol * max|ref|: a norm-relative bound that tf32 (~3e-4) and fp16 (~1e-3) pass.
DEFAULT_TOLERANCES = {"float32": (1e-3, 1e-5), "float16": (2e-2, 1e-3), "bfloat16": (6e-2, 1e-2)}


def tensor_leaves(obj: Any, path: str = "out") -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        return [(path, obj)]
    if isinstance(obj, Mapping):  # dicts and Hugging Face ModelOutput (an OrderedDict)
        return [leaf for k, v in obj.items() for leaf in tensor_leaves(v, f"{path}.{k}")]
    if isinstance(obj, (list, tuple)):
        return [leaf for i, v in enumerate(obj) for leaf in tensor_leaves(v, f"{path}[{i}]")]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [leaf for f in dataclasses.fields(obj) for leaf in tensor_leaves(getattr(obj, f.name), f"{path}.{f.name}")]
    return []


def compare(reference: Any, got: Any, rtol: float, atol: float) -> dict[str, Any]:
    ref_leaves, got_leaves = tensor_leaves(reference), tensor_leaves(got)
    if len(ref_leaves) != len(got_leaves):
        return {"passed": False, "reason": f"eager returned {len(ref_leaves)} tensors, the artifact {len(got_leaves)}"}
    worst_abs = worst_rel = 0.0
    for (path, r), (_, g) in zip(ref_leaves, got_leaves):
        if tuple(r.shape) != tuple(g.shape):
            return {"passed": False, "reason": f"{path}: shape {list(g.shape)}, eager gives {list(r.shape)}"}
        if not (r.dtype.is_floating_point or r.dtype.is_complex):
            if not torch.equal(r.cpu(), g.cpu().to(r.dtype)):
                return {"passed": False, "reason": f"{path}: {r.dtype} values differ from eager"}
            continue
        r64, g64 = r.detach().cpu().double(), g.detach().cpu().double()
        if not torch.isfinite(g64).all() and torch.isfinite(r64).all():
            return {"passed": False, "reason": f"{path}: non-finite values where eager is finite"}
        err = (g64 - r64).abs().max().item() if r64.numel() else 0.0
        scale = r64.abs().max().item() if r64.numel() else 0.0
        rel = err / scale if scale else err
        worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, rel)
        if err > atol + rtol * scale:
            return {"passed": False, "max_abs_err": err, "max_rel_err": rel,
                    "reason": f"{path}: max abs error {err:.3g} > atol {atol:g} + rtol {rtol:g} * max|eager| {scale:.3g}"}
    return {"passed": True, "max_abs_err": worst_abs, "max_rel_err": worst_rel, "leaves": len(ref_leaves)}
