"""Torch-TensorRT backends: configuration and version logic on the CPU; real builds on a GPU (marker `gpu`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aitune_build.backends.tensorrt_common import check_compile_config, plan_precision
from aitune_build.errors import UserError
from aitune_build.manifest import backend_config
from aitune_build.schema import normalise_backend
from aitune_build.toolchain import gpu_info, has_module

FIELDS = {"enabled_precisions", "workspace_size", "min_block_size", "optimization_level", "use_explicit_typing", "immutable_weights"}


def test_unknown_compile_config_key_names_key_and_version() -> None:
    with pytest.raises(UserError, match=r"backends.t.compile_config.optimisation_level: not a CompilationSettings field of the installed "
                                        r"torch_tensorrt 2.11.0 \(did you mean 'optimization_level'\?\)"):
        check_compile_config({"optimisation_level": 3}, FIELDS, "2.11.0", "backends.t.compile_config")
    check_compile_config({"optimization_level": 3, "engine_cache_size": 1 << 30}, FIELDS, "2.11.0", "k")


def test_managed_keys_are_refused() -> None:
    with pytest.raises(UserError, match="engine_cache_dir: set by aitune-build itself"):
        check_compile_config({"engine_cache_dir": "/tmp/x"}, FIELDS, "2.12.0", "k")


@pytest.mark.parametrize(
    "version,rtx,cast,precisions",
    [
        ("2.11.0", False, "float16", None),  # 2.10-2.12 would raise on enabled_precisions under explicit typing
        ("2.13.0", False, "float16", None),  # 2.13+ would ignore it silently
        ("2.14.1", False, "float16", None),
        ("2.11.0", True, "float16", None),  # TensorRT-RTX gives fp32 even with use_explicit_typing=False
        ("2.9.0", False, None, ["float16"]),  # weakly typed: enabled_precisions is honoured
    ],
)
def test_fp16_translation_per_version(version: str, rtx: bool, cast: str | None, precisions: list | None) -> None:
    plan = plan_precision("float16", {"enabled_precisions": ["float16"], "use_explicit_typing": False, "min_block_size": 1}, version, rtx)
    assert plan.cast == cast
    assert plan.settings.get("enabled_precisions") == precisions
    assert plan.settings["min_block_size"] == 1
    if cast:
        assert "use_explicit_typing" not in plan.settings


def test_aot_inductor_output_is_refused_where_it_crashed() -> None:
    from aitune_build.backends.tensorrt_common import known_aoti_crash

    assert known_aoti_crash("2.11.0", True) and not known_aoti_crash("2.11.0", False)
    assert not known_aoti_crash("2.12.0", True)


def test_fp32_needs_no_cast() -> None:
    plan = plan_precision("float32", {"enabled_precisions": ["float32"]}, "2.13.0", False)
    assert plan.cast is None and "enabled_precisions" not in plan.settings


def config(**table):
    return backend_config(normalise_backend(table))


def test_precision_comes_from_enabled_precisions_or_autocast() -> None:
    assert config(kind="torch_tensorrt_aot", compile_config={"enabled_precisions": ["float16"]}).precision == "float16"
    assert config(kind="torch_tensorrt_aot", compile_config={"enabled_precisions": ["torch.half"]}).precision == "float16"
    assert config(kind="torch_tensorrt_aot").precision == "float32"
    assert config(kind="torch_tensorrt_jit", autocast_enabled=True, autocast_dtype="bfloat16").precision == "bfloat16"


def test_gpu_key_has_trt_versions_and_gpu(tmp_path: Path) -> None:
    from aitune_build.backends import backend_for

    chain = backend_for("torch_tensorrt_aot")(config(kind="torch_tensorrt_aot")).toolchain()
    assert {"torch", "torch_tensorrt", "tensorrt", "gpu"} <= set(chain)


needs_gpu = pytest.mark.skipif(
    not (has_module("torch_tensorrt") and gpu_info()),
    reason="needs an NVIDIA GPU and torch_tensorrt (pip install torch-tensorrt or torch-tensorrt-rtx)",
)

GPU_MANIFEST = """
[project]
name = "gpu"

[modules.cnn]
factory = "models.cnn:build"
inputs = [{ name = "input", shape = [{ min = 1, opt = 4, max = 16 }, 3, 32, 32] }]

[modules.breaker]
factory = "models.breaker:build"
inputs = [{ name = "x", shape = [4, 8] }]

[backends.export]
kind = "export"
device = "cuda"

[backends.aot16]
kind = "torch_tensorrt_aot"
[backends.aot16.compile_config]
enabled_precisions = ["float16"]
min_block_size = 1

[backends.aot32]
kind = "torch_tensorrt_aot"
[backends.aot32.compile_config]
min_block_size = 1

[backends.aot_ts]
kind = "torch_tensorrt_aot"
output_format = "torchscript"
[backends.aot_ts.compile_config]
min_block_size = 1

[backends.aot_aoti]
kind = "torch_tensorrt_aot"
output_format = "aot_inductor"
[backends.aot_aoti.compile_config]
min_block_size = 1

[backends.jit16]
kind = "torch_tensorrt_jit"
dynamic_shapes = false
[backends.jit16.compile_config]
enabled_precisions = ["float16"]
min_block_size = 1

[backends.jit_full]
kind = "torch_tensorrt_jit"
fullgraph = true

[targets.cnn_export]
module = "cnn"
backend = "export"

[targets.cnn_aot16]
module = "cnn"
backend = "aot16"

[targets.cnn_aot32]
module = "cnn"
backend = "aot32"

[targets.cnn_aot_from_export]
from = "cnn_export"
backend = "aot32"

[targets.cnn_aot_ts]
module = "cnn"
backend = "aot_ts"

[targets.cnn_aot_aoti]
module = "cnn"
backend = "aot_aoti"

[targets.cnn_jit16]
module = "cnn"
backend = "jit16"

[targets.breaker_full]
module = "breaker"
backend = "jit_full"
"""

MODELS = {
    "models/__init__.py": "",
    "models/cnn.py": (
        "import torch\nfrom torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),"
        " nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))\n"
    ),
    "models/breaker.py": (
        "import torch\n\n\nclass Breaker(torch.nn.Module):\n    def forward(self, x):\n        y = x * 2\n"
        "        print('graph break')\n        return y + 1\n\n\ndef build():\n    return Breaker()\n"
    ),
}


@pytest.fixture
def gpu_project(tmp_path: Path) -> Path:
    root = tmp_path / "gpu"
    for rel, text in MODELS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "aitune.toml").write_text(GPU_MANIFEST)
    return root


@pytest.mark.gpu
@needs_gpu
def test_gpu_backends_end_to_end(gpu_project: Path) -> None:
    import torch

    import aitune_build

    from .conftest import run_cli

    names = ["cnn_export", "cnn_aot16", "cnn_aot32", "cnn_aot_from_export", "cnn_jit16"]
    code, out, data = run_cli(gpu_project, "build", "-k", "--json", *names)
    st = {t["name"]: t for t in data["targets"]}
    assert code == 0, json.dumps(data, indent=1)
    assert all(st[n]["status"] == "built" for n in names)
    rec16 = json.loads((gpu_project / "build/cnn_aot16/build.json").read_text())
    rec32 = json.loads((gpu_project / "build/cnn_aot32/build.json").read_text())
    # fp16 really ran in fp16: the engine takes and returns half tensors, and its error is above fp32 rounding
    # (fp32 engines use TF32 by default, so their error is ~5e-4 too: measured on an H200 with TensorRT-RTX 1.4)
    assert rec16["record"]["cast"] == "float16" and rec32["record"]["cast"] is None
    assert rec16["check"]["max_rel_err"] > 1e-4
    assert set(rec16["check"]["variants"]) == {"min", "opt", "max"}  # dynamic batch checked on the reloaded artifact
    assert rec16["toolchain"]["gpu"]["name"] and rec16["toolchain"]["torch_tensorrt"]
    # cache hit
    code, out, data = run_cli(gpu_project, "build", "--json", *names)
    assert {t["status"] for t in data["targets"]} == {"cached"}
    m = aitune_build.load("cnn_aot16", manifest=str(gpu_project / "aitune.toml"))
    for batch in (1, 7, 16):
        out16 = m(torch.randn(batch, 3, 32, 32, device="cuda"))
        assert out16.shape == (batch, 10) and out16.dtype == torch.float16
    out32 = aitune_build.load("cnn_aot32", manifest=str(gpu_project / "aitune.toml"))(torch.randn(2, 3, 32, 32, device="cuda"))
    assert out32.dtype == torch.float32
    jit = aitune_build.load("cnn_jit16", manifest=str(gpu_project / "aitune.toml"))
    assert jit(torch.randn(4, 3, 32, 32, device="cuda")).shape == (4, 10)
    assert any((gpu_project / "build/cnn_jit16/engine_cache").rglob("*")), "engine cache stored with the JIT target"


@pytest.mark.gpu
@needs_gpu
def test_gpu_fullgraph_with_graph_break_fails_clearly(gpu_project: Path) -> None:
    from .conftest import run_cli

    code, out, data = run_cli(gpu_project, "build", "--json", "breaker_full")
    res = data["targets"][0]
    assert code == 1 and res["status"] == "failed"
    assert "graph break" in res["reason"].lower() or "unsupported" in res["reason"].lower(), res["reason"]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("target, artifact", [("cnn_aot_ts", "model.ts"), ("cnn_aot_aoti", "model.pt2")])
def test_gpu_aot_other_output_formats(gpu_project: Path, target: str, artifact: str) -> None:
    """output_format = "torchscript" | "aot_inductor": built, checked at min/opt/max after reloading, loaded."""
    import torch

    import aitune_build

    from .conftest import run_cli

    code, out, data = run_cli(gpu_project, "build", "--json", target)
    from aitune_build.backends.tensorrt_common import installed, known_aoti_crash

    if target == "cnn_aot_aoti" and known_aoti_crash(*installed()[:2]):
        assert code == 2 and "'aot_inductor' crashes torch-tensorrt-rtx" in data["targets"][0]["reason"], data
        return
    log = gpu_project / f"build/{target}/build.log"
    assert code == 0, json.dumps(data, indent=1) + (log.read_text()[-4000:] if log.exists() else "")
    rec = json.loads((gpu_project / f"build/{target}/build.json").read_text())
    assert rec["artifact"] == artifact and set(rec["check"]["variants"]) == {"min", "opt", "max"}
    m = aitune_build.load(target, manifest=str(gpu_project / "aitune.toml"))
    for batch in (1, 7, 16):
        assert m(torch.randn(batch, 3, 32, 32, device="cuda")).shape == (batch, 10)


def test_subgraphs_that_torch_tensorrt_could_not_convert_are_collected_for_the_record() -> None:
    """torch.compile(backend="torch_tensorrt") returns a subgraph it cannot convert as plain PyTorch with only a warning
    on its logger (torch_tensorrt 2.x: dynamo/backend/backends.py); the JIT backend collects those while it builds
    and checks, so build.json and the build's output say the target is not all TensorRT. The record below is the one
    that module logs (its logger, message and exc_info), made here without torch_tensorrt."""
    import logging

    from aitune_build.backends.tensorrt_common import FALLBACK_LOGGER, FallbackLog, fallback_note

    log = logging.getLogger(FALLBACK_LOGGER)
    watched = FallbackLog()
    try:
        raise RuntimeError("Conversion of function torch._ops.aten.foo.default not currently supported!")
    except RuntimeError:
        log.warning("TRT conversion failed on the subgraph. See trace above. Returning GraphModule forward instead.",
                    exc_info=True)
    log.warning("require_full_compilation arg is not applicable for torch.compile with backend='torch_tensorrt")
    failures = watched.detach()
    log.warning("TRT conversion failed on the subgraph. See trace above. Returning GraphModule forward instead.")
    assert failures == ["RuntimeError: Conversion of function torch._ops.aten.foo.default not currently supported!"]
    note = fallback_note(failures)
    assert note.startswith("1 subgraph fell back to PyTorch: torch_tensorrt could not convert it (RuntimeError: ")
    assert "pass_through_build_failures = true" in note
