"""Where `import torch_tensorrt` spends its time in a worker, and which step initialises CUDA (GPU machine).

    python benchmarks/trt_import_probe.py [--out probe.json]

A fork server may import only what leaves CUDA uninitialised (workers.py). This imports, in a fresh process, what
the server preloads for a Torch-TensorRT build, then TensorRT's library wheel, its Python bindings, the
torch_tensorrt runtime library alone (tensorrt_common.load_runtime, what serving an AOT engine loads) and finally
the torch_tensorrt package, and prints after each step the seconds it took, the modules it added and whether the
CUDA driver is initialised now.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from aitune_build.workers import _cuda_initialised, preload_for

    steps: list[dict] = []

    def step(name: str, fn) -> None:
        n, t0 = len(sys.modules), time.perf_counter()
        error = None
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"
        steps.append({"step": name, "s": round(time.perf_counter() - t0, 3), "modules": len(sys.modules) - n,
                      "cuda_initialised": _cuda_initialised(), "error": error})
        print(json.dumps(steps[-1]), flush=True)

    preload = [m for m in preload_for({"torch_tensorrt_aot"}) if not m.startswith("aitune_build")]
    step("server preload (" + ", ".join(preload) + ")", lambda: [importlib.import_module(m) for m in preload])
    step("tensorrt_rtx_libs / tensorrt_libs", lambda: _first("tensorrt_rtx_libs", "tensorrt_libs"))
    step("tensorrt bindings (tensorrt_rtx / tensorrt)", lambda: _first("tensorrt_rtx", "tensorrt"))

    def runtime() -> None:
        from aitune_build.backends.tensorrt_common import load_runtime

        print("load_runtime:", load_runtime(), flush=True)

    step("torch_tensorrt runtime library alone", runtime)
    step("import torch_tensorrt", lambda: importlib.import_module("torch_tensorrt"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"steps": steps, "python": sys.version.split()[0]}, f, indent=1)


def _first(*names: str) -> None:
    for name in names:
        try:
            importlib.import_module(name)
            print("imported", name, flush=True)
            return
        except ImportError:
            continue
    raise ImportError(" / ".join(names))


if __name__ == "__main__":
    main()
