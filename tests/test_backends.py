"""One contract every CPU backend passes: build, check against eager at min/opt/max, cache, load back."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import run_cli

EXTRA = """
[backends.aoti]
kind = "inductor_aot"

[backends.jit]
kind = "inductor_jit"
dynamic_shapes = true

[targets.adder_aoti]
from = "adder_export"
backend = "aoti"

[targets.adder_jit]
module = "adder"
backend = "jit"

[targets.adder_eager]
module = "adder"
backend = "ref"
"""


@pytest.mark.slow
def test_every_cpu_backend_builds_checks_caches_and_loads(project: Path) -> None:
    import torch

    import aitune_build

    (project / "aitune.toml").write_text((project / "aitune.toml").read_text() + EXTRA)
    names = ["adder_export", "adder_aoti", "adder_jit", "adder_eager"]
    code, out, data = run_cli(project, "build", "--json", *names)
    assert code == 0, out
    assert {t["name"]: t["status"] for t in data["targets"]} == dict.fromkeys(names, "built")
    code, out, data = run_cli(project, "build", "--json", *names)
    assert {t["status"] for t in data["targets"]} == {"cached"}
    for name in names:
        m = aitune_build.load(name, manifest=str(project / "aitune.toml"))
        for n in (1, 3, 6):  # min, opt, max of the shared dim
            x, y = torch.randn(n), torch.randn(n)
            torch.testing.assert_close(m(x, y), x + y)
    # the from edge: a changed upstream artifact rebuilds the AOTInductor target
    code, out, _ = run_cli(project, "explain", "adder_aoti")
    assert "up-to-date" in out


def test_check_reproducible_export(built_project: Path) -> None:
    project = built_project
    code, out, data = run_cli(project, "build", "--check-reproducible", "--json", "adder_export", "mlp_eager")
    assert code == 0, out
    reasons = {t["name"]: t["reason"] for t in data["targets"]}
    assert "reproducible (rebuild gave identical bytes)" in reasons["adder_export"]


def test_fp16_check_tolerance_is_recorded_and_overridable(project: Path) -> None:
    text = (project / "aitune.toml").read_text().replace('[targets.adder_export]\nmodule = "adder"\nbackend = "exp"',
                                                        '[targets.adder_export]\nmodule = "adder"\nbackend = "exp"\ncheck = { rtol = 0.5, atol = 0.1 }')
    (project / "aitune.toml").write_text(text)
    assert run_cli(project, "build", "adder_export")[0] == 0
    import json

    rec = json.loads((project / "build/adder_export/build.json").read_text())
    assert rec["check"]["rtol"] == 0.5 and rec["check"]["atol"] == 0.1


def test_loaded_export_program_skips_torch_wrapper_and_checks_shapes(built_project: Path) -> None:
    """Exported programs are called flat (ProgramCall), with the input specs' bounds checked instead of torch's guards."""
    import torch

    import aitune_build
    from aitune_build.backends.exported import ProgramCall

    project = built_project
    m = aitune_build.load("mlp_export", manifest=str(project / "aitune.toml"))
    assert isinstance(m.fn, ProgramCall) and m.fn.flat, "fell back to ExportedProgram.module()'s per-call wrapper"
    program = torch.export.load(str(project / "build/mlp_export/model.pt2")).module()
    for batch in (1, 5, 8):  # the batch axis runs 1..8
        x = torch.randn(batch, 4)
        torch.testing.assert_close(m(x), program(x=x))
    with pytest.raises(ValueError, match=r"mlp_export: input 'x' has shape \[9, 4\]; the artifact takes \[1\.\.8, 4\]"):
        m(torch.randn(9, 4))  # load()'s check of the inputs against the specs
    with pytest.raises(ValueError, match=r"input 'x' has shape \[9, 4\]; this artifact takes \[1\.\.8, 4\]"):
        m.fn(x=torch.randn(9, 4))  # ProgramCall's own, for callers below load()
    with pytest.raises(ValueError, match=r"input 'x' has shape \[2, 5\]"):
        m(torch.randn(2, 5))


def test_a_dynamic_axis_whose_opt_is_1_exports_dynamic(project: Path) -> None:
    """opt = 1 is the common serving shape (one request at a time); torch.export specialises an axis to 1 when its
    example has size 1, so the build traced with opt used to fail ("specialized it to be a constant (1)")."""
    import torch

    import aitune_build

    toml = project / "aitune.toml"
    text = toml.read_text().replace("min = 1, opt = 4, max = 8", "min = 1, opt = 1, max = 8")
    toml.write_text(text.replace("min = 1, opt = 3, max = 6", "min = 1, opt = 1, max = 6"))  # adder: x and y share dim n
    code, out, _ = run_cli(project, "build", "mlp_export", "adder_export")
    assert code == 0, out
    m = aitune_build.load("mlp_export", manifest=str(toml))
    assert [m(torch.randn(b, 4)).shape[0] for b in (1, 3, 8)] == [1, 3, 8]
    add = aitune_build.load("adder_export", manifest=str(toml))
    assert [add(torch.ones(n), torch.ones(n)).shape[0] for n in (1, 2, 6)] == [1, 2, 6]


def test_trace_shapes_avoid_1_and_sizes_other_axes_have() -> None:
    """Duck shaping: a traced size equal to another axis's would let torch.export unify the two axes."""
    from aitune_build.inputs import trace_shapes
    from aitune_build.manifest import Axis, InputSpec

    def spec(name, *shape):
        return InputSpec(name=name, shape=shape, dtype="float32", range=None, sample=None)

    got = trace_shapes([spec("x", Axis(min=1, opt=1, max=8, dim="batch"), 2, Axis(min=1, opt=3, max=9, dim="seq")),
                        spec("m", Axis(min=1, opt=1, max=8, dim="batch"), Axis(min=1, opt=1, max=9, dim=None)),
                        spec("one", Axis(min=1, opt=1, max=1, dim=None))])
    assert got == {"x": (4, 2, 3), "m": (4, 5), "one": (1,)}


def _backends(tmp_path: Path, sections: str) -> dict:
    """{name: backend instance} for the [backends.*] SECTIONS of a manifest."""
    from aitune_build.backends import backend_for
    from aitune_build.manifest import load_manifest

    (tmp_path / "aitune.toml").write_text('[project]\nname = "k"\n' + sections)
    return {name: backend_for(c.kind)(c) for name, c in load_manifest(tmp_path / "aitune.toml").model.backends.items()}


def test_when_each_backend_gives_its_gpu_to_the_next_compile(tmp_path: Path) -> None:
    """From the first of these worker phases on, the next target may compile on a target's GPU: when its save starts
    where the save writes what was built (an exported program, also Torch-TensorRT's, saved without re-tracing),
    once the artifact is written where saving traces or compiles, and never while a JIT target runs (it compiles
    at load)."""
    backends = _backends(tmp_path,
                         '[backends.exp]\nkind = "export"\n'
                         '[backends.aoti]\nkind = "inductor_aot"\n'
                         '[backends.trt]\nkind = "torch_tensorrt_aot"\n'
                         '[backends.trt_ts]\nkind = "torch_tensorrt_aot"\noutput_format = "torchscript"\n'
                         '[backends.trt_aoti]\nkind = "torch_tensorrt_aot"\noutput_format = "aot_inductor"\n'
                         '[backends.jit]\nkind = "inductor_jit"\n'
                         '[backends.trt_jit]\nkind = "torch_tensorrt_jit"\n'
                         '[backends.eager]\nkind = "eager"\n')
    assert {name: b.gpu_free_phases for name, b in backends.items()} == {
        "exp": ("saving", "loading"), "aoti": ("loading",), "trt": ("saving", "loading"), "trt_ts": ("loading",),
        "trt_aoti": ("loading",), "jit": (), "trt_jit": (), "eager": ()}


def test_which_compiles_time_kernels_and_so_take_their_gpu_alone(tmp_path: Path) -> None:
    """A compile that times kernels must not run beside another target's check (gpus.GpuPool, exclusive)."""
    from aitune_build.backends.tensorrt_common import distribution

    backends = _backends(tmp_path,
                         '[backends.exp]\nkind = "export"\n'
                         '[backends.aoti]\nkind = "inductor_aot"\n'
                         '[backends.aoti_tuned]\nkind = "inductor_aot"\ninductor_configs = { max_autotune = true }\n'
                         '[backends.jit]\nkind = "inductor_jit"\n'
                         '[backends.jit_mode]\nkind = "inductor_jit"\nmode = "max-autotune"\n'
                         '[backends.jit_options]\nkind = "inductor_jit"\noptions = { max_autotune_gemm = true }\n'
                         '[backends.trt]\nkind = "torch_tensorrt_aot"\n'
                         '[backends.trt_jit]\nkind = "torch_tensorrt_jit"\n')
    times = {name: b.times_kernels for name, b in backends.items()}
    rtx = (distribution() or ("", False))[1]  # TensorRT-RTX picks kernels at run time; NVIDIA TensorRT's builder times
    assert times == {"exp": False, "aoti": False, "aoti_tuned": True, "jit": False, "jit_mode": True, "jit_options": True,
                     "trt": not rtx, "trt_jit": not rtx}
