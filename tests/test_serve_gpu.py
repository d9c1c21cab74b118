"""`aitune-build run` serving Torch-TensorRT artifacts (AOT and JIT) into an unmodified script, on a CUDA GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import run_cli

REPO = Path(__file__).resolve().parent.parent


def _gpu_ready() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    try:
        import torch_tensorrt  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"needs torch_tensorrt ({type(e).__name__})"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_gpu_ready() is not None, reason=str(_gpu_ready()))]

MODELS = textwrap.dedent("""
    import torch


    class SmallCNN(torch.nn.Module):
        def __init__(self, channels=16):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, channels, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(channels)
            self.fc = torch.nn.Linear(channels, 10)

        def forward(self, image):
            h = torch.relu(self.bn(self.conv(image)))
            return self.fc(h.mean(dim=(2, 3)))
""")

MANIFEST = textwrap.dedent("""
    [project]
    name = "gpu-serve"

    [modules.cnn]
    factory = "gpu_serve_models:SmallCNN"
    args = { channels = 16 }
    weights = "cnn.pt"
    inputs = [{ name = "image", shape = [{ dim = "batch", min = 1, opt = 4, max = 8 }, 3, 32, 32] }]

    [backends.trt_aot]
    kind = "torch_tensorrt_aot"
    compile_config = { enabled_precisions = ["float16"] }

    [backends.trt_jit]
    kind = "torch_tensorrt_jit"
    dynamic_shapes = true
    compile_config = { min_block_size = 1 }

    [targets.cnn_trt_aot]
    module = "cnn"
    backend = "trt_aot"
    serve = SERVE_AOT

    [targets.cnn_trt_jit]
    module = "cnn"
    backend = "trt_jit"
    serve = SERVE_JIT
""")

APP = textwrap.dedent("""
    import json, sys
    import torch
    from gpu_serve_models import SmallCNN

    model = SmallCNN(channels=16)
    model.load_state_dict(torch.load("cnn.pt"))
    model.eval().cuda()
    torch.manual_seed(3)
    outs = []
    with torch.no_grad():
        for b in (1, 4, 8):
            x = torch.randn(b, 3, 32, 32, device="cuda")
            y = model(x)
            outs.append({"x": x.cpu().tolist(), "y": y.float().cpu().tolist(), "dtype": str(y.dtype)})
    json.dump(outs, open(sys.argv[1], "w"))
""")


def _project(root: Path, served: str) -> Path:
    import torch

    root.mkdir(parents=True)
    (root / "gpu_serve_models.py").write_text(MODELS)
    (root / "app.py").write_text(APP)
    (root / "aitune.toml").write_text(MANIFEST.replace("SERVE_AOT", str(served == "aot").lower())
                                      .replace("SERVE_JIT", str(served == "jit").lower()))
    sys.path.insert(0, str(root))
    try:
        import importlib

        models = importlib.import_module("gpu_serve_models")
        importlib.reload(models)
        torch.manual_seed(0)
        net = models.SmallCNN(16)
        with torch.no_grad():  # BatchNorm statistics that are not the identity
            net.bn.running_mean.uniform_(-0.5, 0.5)
            net.bn.running_var.uniform_(0.5, 2.0)
        torch.save(net.state_dict(), root / "cnn.pt")
    finally:
        sys.path.remove(str(root))
    return root


@pytest.mark.parametrize("served", ["aot", "jit"])
def test_run_serves_torch_tensorrt_into_an_unmodified_script(tmp_path: Path, served: str) -> None:
    import torch

    project = _project(tmp_path / "proj", served)
    target = f"cnn_trt_{served}"
    code, out, _ = run_cli(project, "build", target)
    assert code == 0, out
    debug, result = tmp_path / "debug.json", tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AITUNE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keep torch_tensorrt's site
    proc = subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(project), "run", "--debug", str(debug), "--",
                           sys.executable, "app.py", str(result)], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stderr)  # pytest -rA shows it: what the hook and torch_tensorrt said
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(debug.read_text())["targets"][target]
    assert stats["served_calls"] == 3 and stats["eager_calls"] == 0, (stats, proc.stderr)
    # An AOT engine is served through torch_tensorrt's runtime library alone (the package's import is 7-9 s);
    # a JIT target compiles, which needs the package.
    assert json.loads(debug.read_text())["torch_tensorrt_imported"] is (served == "jit"), proc.stderr
    assert "warm start failed" not in proc.stderr, proc.stderr  # the JIT target started from its stored caches
    sys.path.insert(0, str(project))
    try:
        import importlib

        net = importlib.import_module("gpu_serve_models").SmallCNN(16)
    finally:
        sys.path.remove(str(project))
    net.load_state_dict(torch.load(project / "cnn.pt"))
    net.eval()
    tol = 2e-2 if served == "aot" else 5e-3  # the AOT target is fp16; fp32 engines may use TF32
    for call in json.loads(result.read_text()):
        assert call["dtype"] == "torch.float32"  # what the eager module returns, fp16 engine or not
        want = net(torch.tensor(call["x"]))
        got = torch.tensor(call["y"])
        assert (got - want).abs().max().item() <= 1e-3 + tol * want.abs().max().item()
