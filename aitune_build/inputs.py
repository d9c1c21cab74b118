"""Example inputs from input specs, and the matching torch.export dynamic shapes. Imports torch: worker side only."""

from __future__ import annotations

from pathlib import Path

import torch

from .manifest import Axis, InputSpec

VARIANTS = ("min", "opt", "max")


def concrete_shape(spec: InputSpec, which: str) -> tuple[int, ...]:
    return tuple(getattr(d, which) if isinstance(d, Axis) else d for d in spec.shape)


def trace_shapes(specs: list[InputSpec]) -> dict[str, tuple[int, ...]]:
    """The example torch.export traces with ("trace"): opt, except that a dynamic axis whose opt is 1 gets the
    smallest size from 2 to its max that no other axis has. An example of size 1 makes torch.export specialise the
    axis to 1 ("You marked batch as dynamic but your code specialized it to be a constant (1)"), and a size another
    axis has would let it unify the two (duck shaping). Axes sharing a `dim` name get one size."""
    def dim_of(spec: InputSpec, i: int, d: Axis) -> object:
        return d.dim or (spec.name, i)

    used = {d.opt if isinstance(d, Axis) else d for s in specs for d in s.shape
            if not (isinstance(d, Axis) and d.opt == 1 and d.max >= 2)}
    chosen: dict[object, int] = {}
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        shape = []
        for i, d in enumerate(spec.shape):
            if not isinstance(d, Axis):
                shape.append(d)
            elif d.opt != 1 or d.max < 2:
                shape.append(d.opt)
            else:
                key = dim_of(spec, i, d)
                if key not in chosen:
                    chosen[key] = next((v for v in range(2, d.max + 1) if v not in used), 2)
                    used.add(chosen[key])
                shape.append(chosen[key])
        out[spec.name] = tuple(shape)
    return out


def variants(specs: list[InputSpec]) -> tuple[str, ...]:
    """The shape sets a check runs: min, opt and max where any axis is dynamic, else opt alone."""
    return VARIANTS if any(s.is_dynamic for s in specs) else ("opt",)


def make_inputs(specs: list[InputSpec], which: str, *, seed: int, root: Path, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    traced = trace_shapes(specs) if which == "trace" else None
    for spec in specs:
        shape = traced[spec.name] if traced is not None else concrete_shape(spec, which)
        dtype = getattr(torch, spec.dtype)
        if spec.sample is not None:
            t = _fit(torch.load(root / spec.sample, weights_only=True), shape).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=gen).bool()
        elif dtype.is_floating_point or dtype.is_complex:
            if spec.range is not None:
                lo, hi = spec.range
                t = (torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)
            else:
                t = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
        else:
            lo, hi = spec.range if spec.range is not None else (0, 16)
            t = torch.randint(int(lo), int(hi), shape, generator=gen, dtype=dtype)
        out[spec.name] = t.to(device)
    return out


def _fit(sample: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A recorded sample cut or tiled to `shape` (for the min and max variants of a dynamic axis)."""
    if not isinstance(sample, torch.Tensor):
        raise ValueError(f"sample file holds a {type(sample).__name__}, not a tensor")
    if sample.dim() != len(shape):
        raise ValueError(f"sample has shape {list(sample.shape)}, the spec wants rank {len(shape)}")
    t = sample
    for axis, want in enumerate(shape):
        have = t.shape[axis]
        if want > have:
            reps = [1] * t.dim()
            reps[axis] = -(-want // have)
            t = t.repeat(*reps)
        t = t.narrow(axis, 0, want)
    return t.contiguous()


def export_dynamic_shapes(specs: list[InputSpec]) -> dict[str, dict[int, object]] | None:
    """{input name: {axis: torch.export.Dim}}; axes that share a `dim` name share one Dim."""
    if not any(s.is_dynamic for s in specs):
        return None
    dims: dict[str, object] = {}
    out: dict[str, dict[int, object]] = {}
    for spec in specs:
        axes: dict[int, object] = {}
        for i, d in enumerate(spec.shape):
            if isinstance(d, Axis):
                name = d.dim or f"{spec.name}_{i}"
                if name not in dims:
                    dims[name] = torch.export.Dim(_ident(name), min=d.min, max=d.max)
                axes[i] = dims[name]
        out[spec.name] = axes
    return out


def _ident(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)
