"""Tuning on a GPU: Torch-TensorRT fp16 / fp32, Inductor and eager candidates for a CNN and a transformer encoder.

Run on the GPU machine:  AITUNE_TUNING_RECORDS=docs/gpu-runs python3 -m pytest -q -m gpu tests/test_tuning_gpu.py
Each selection.json is copied to $AITUNE_TUNING_RECORDS (default: the test's temporary folder).
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from aitune_build.toolchain import gpu_info, has_module

from .conftest import run_cli, statuses

needs_gpu = pytest.mark.skipif(
    not (has_module("torch_tensorrt") and has_module("torchvision") and gpu_info()),
    reason="needs an NVIDIA GPU, torch_tensorrt and torchvision",
)

MANIFEST = """
[project]
name = "tuning-gpu"

[modules.cnn]
factory = "models.cnn:build"
inputs = [{ name = "x", shape = [{ dim = "batch", min = 1, opt = 8, max = 8 }, 3, 224, 224] }]

[modules.encoder]
factory = "models.encoder:build"
inputs = [{ name = "x", shape = [{ dim = "batch", min = 1, opt = 8, max = 8 }, 128, 256] }]

[backends.trt_fp16]
kind = "torch_tensorrt_aot"
[backends.trt_fp16.compile_config]
enabled_precisions = ["float16"]

[backends.trt_fp32]
kind = "torch_tensorrt_aot"

[backends.inductor_gpu]
kind = "inductor_jit"
device = "cuda"

[backends.eager_gpu]
kind = "eager"
device = "cuda"

# random weights: fp16's error is a few 1e-3 of ResNet's output scale (as in benchmarks/gpu.py)
[targets.cnn]
module = "cnn"
candidates = ["trt_fp16", "trt_fp32", "inductor_gpu", "eager_gpu"]
batch = [1, 8]
check = { rtol = 0.05, atol = 0.01 }

[targets.cnn_throughput]
module = "cnn"
candidates = ["trt_fp16", "trt_fp32", "inductor_gpu", "eager_gpu"]
select = "max_throughput"
batch = [1, 8]
min_speedup = 1.01
check = { rtol = 0.05, atol = 0.01 }

[targets.encoder]
module = "encoder"
candidates = ["trt_fp16", "trt_fp32", "inductor_gpu", "eager_gpu"]
batch = [1, 8]
"""

MODELS = {
    "models/__init__.py": "",
    "models/cnn.py": "import torchvision\n\n\ndef build():\n    return torchvision.models.resnet18(weights=None)\n",
    "models/encoder.py": textwrap.dedent("""
        import torch
        from torch import nn


        class Block(nn.Module):
            def __init__(self, d, heads):
                super().__init__()
                self.heads = heads
                self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
                self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
                self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

            def forward(self, x):
                b, s, d = x.shape
                q, k, v = self.qkv(self.n1(x)).reshape(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
                a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                x = x + self.out(a.transpose(1, 2).reshape(b, s, d))
                return x + self.mlp(self.n2(x))


        class Encoder(nn.Module):
            def __init__(self, d=256, heads=4, layers=4):
                super().__init__()
                self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])

            def forward(self, x):
                return self.blocks(x)


        def build():
            return Encoder()
        """),
}


@pytest.mark.gpu
@needs_gpu
def test_gpu_selection_trt_inductor_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import aitune_build

    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    root = tmp_path / "p"
    for rel, text in MODELS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "aitune.toml").write_text(MANIFEST)
    records = Path(os.environ.get("AITUNE_TUNING_RECORDS", tmp_path / "records"))
    records.mkdir(parents=True, exist_ok=True)

    code, out, data = run_cli(root, "build", "-k", "--json")
    assert data is not None, out
    gpu = gpu_info()[0]["name"].replace(" ", "-")
    for name in ("cnn", "cnn_throughput", "encoder"):
        sel_path = root / "build" / name / "selection.json"
        if sel_path.exists():
            shutil.copyfile(sel_path, records / f"tuning-{gpu}-{name}.selection.json")
    assert code == 0, json.dumps(data, indent=2)
    assert statuses(data) == {"cnn": "built", "cnn_throughput": "built", "encoder": "built"}
    for name in ("cnn", "encoder"):
        sel = json.loads((root / "build" / name / "selection.json").read_text())
        rows = {c["backend"]: c for c in sel["candidates"]}
        assert sel["device"] == gpu_info()[0]["name"]
        # cnn and cnn_throughput share their candidates' keys: whichever selection runs second finds them cached
        assert {r["build"] for r in rows.values()} <= ({"built"} if name == "encoder" else {"built", "cached"})
        ok = {b: r for b, r in rows.items() if r["rejected"] is None}
        assert set(ok) == set(rows), {b: r["rejected"] for b, r in rows.items()}
        assert sel["winner"] == min(ok, key=lambda b: ok[b]["latency_ms"]["1"]["median"])
        assert rows["trt_fp16"]["check"]["precision"] == "float16"
        m = aitune_build.load(name, manifest=str(root / "aitune.toml"))
        shape = (2, 3, 224, 224) if name == "cnn" else (2, 128, 256)
        assert m(torch.randn(*shape, device="cuda")).shape[0] == 2
    thr = json.loads((root / "build/cnn_throughput/selection.json").read_text())
    cnn = {r["backend"]: r["build"] for r in json.loads((root / "build/cnn/selection.json").read_text())["candidates"]}
    for r in thr["candidates"]:  # same candidates as cnn: each built once, by whichever selection ran first
        assert {r["build"], cnn[r["backend"]]} == {"built", "cached"}, (r["backend"], r["build"], cnn[r["backend"]])
    eager = {r["backend"]: r for r in thr["candidates"]}["eager_gpu"]
    assert eager["rejected"] is not None and "below min_speedup" in eager["rejected"]

    # unchanged: nothing rebuilt, nothing measured
    before = (root / "build/cnn/selection.json").read_bytes()
    code, out, data = run_cli(root, "build", "--json")
    assert statuses(data) == {"cnn": "cached", "cnn_throughput": "cached", "encoder": "cached"}
    assert (root / "build/cnn/selection.json").read_bytes() == before
    code, out, _ = run_cli(root, "status")
    assert "winner" in out
    (records / f"tuning-{gpu}-status.txt").write_text(out)
