"""Seconds of torch_tensorrt.save for one compiled ResNet-18 (fp32, dynamic batch 1-8), retrace=True (the default,
re-exports the compiled graph) vs retrace=False (what aitune-build does since session 7), alternated, in one process.

    CUDA_VISIBLE_DEVICES=0 python benchmarks/trt_save_probe.py --out save.json [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import torch
    import torch_tensorrt
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None).eval().cuda()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    dyn = {"x": {0: torch.export.Dim("batch", min=1, max=8)}}
    ep = torch.export.export(m, (), {"x": x}, dynamic_shapes=dyn, strict=False)
    inp = {"x": torch_tensorrt.Input(min_shape=[1, 3, 224, 224], opt_shape=[4, 3, 224, 224], max_shape=[8, 3, 224, 224],
                                     dtype=torch.float32, name="x")}
    trt = torch_tensorrt.dynamo.compile(ep, arg_inputs=[], kwarg_inputs=inp)
    scratch = Path(tempfile.mkdtemp())
    got: dict = {"retrace_true_s": [], "retrace_false_s": [], "card": torch.cuda.get_device_name(),
                 "torch": torch.__version__, "torch_tensorrt": torch_tensorrt.__version__}
    for r in range(args.rounds):
        for retrace in (True, False):
            path = scratch / f"{r}-{retrace}.pt2"
            t0 = time.perf_counter()
            if retrace:
                torch_tensorrt.save(trt, str(path), output_format="exported_program", arg_inputs=[], kwarg_inputs={"x": x},
                                    dynamic_shapes=dyn, retrace=True)
            else:
                torch_tensorrt.save(trt, str(path), output_format="exported_program", dynamic_shapes=dyn, retrace=False)
            got[f"retrace_{str(retrace).lower()}_s"].append(time.perf_counter() - t0)
            loaded = torch.export.load(str(path)).module()
            for b in (1, 8):  # both files keep the dynamic batch
                xb = torch.randn(b, 3, 224, 224, device="cuda")
                with torch.no_grad():
                    err = (loaded(x=xb) - m(xb)).abs().max().item()
                got.setdefault(f"max_err_retrace_{str(retrace).lower()}", []).append(err)
    got["median_true_s"] = statistics.median(got["retrace_true_s"])
    got["median_false_s"] = statistics.median(got["retrace_false_s"])
    Path(args.out).write_text(json.dumps(got, indent=2) + "\n")
    print(json.dumps(got, indent=2))


if __name__ == "__main__":
    main()
