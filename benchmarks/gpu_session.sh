#!/usr/bin/env bash
# One GPU session's work, in phases that each fit one 10-minute command of the device tool (see
# ../shared/gpu/README.md for installing torch-tensorrt-rtx first). Results and logs go to $OUT (default ./gpu-out).
#
#   bash benchmarks/gpu_session.sh tests      # GPU 0: TRT + worker + build-server GPU tests | GPU 1: serve + tuning GPU
#                                             # tests; then the two-GPU test if there are two
#   bash benchmarks/gpu_session.sh serve      # GPU 0: tuning benchmark, encoder     | GPU 1: benchmarks/gpu_serve.py
#   bash benchmarks/gpu_session.sh retest     # GPU 0: the failed GPU tests again    | GPU 1: tuning benchmark
#   bash benchmarks/gpu_session.sh multi      # both GPUs: benchmarks/gpu_multi.py, then the two-GPU test
#   bash benchmarks/gpu_session.sh warm       # GPU 0: benchmarks/gpu_warm.py       | GPU 1: benchmarks/gpu_serve.py
#   bash benchmarks/gpu_session.sh overlap    # compile beside check, on vs off: GPU 0 six targets | GPU 1 eight TRT
#   bash benchmarks/gpu_session.sh trt        # GPU 0: TRT + worker GPU tests, JIT first-call profile | GPU 1: gpu_warm.py
#   bash benchmarks/gpu_session.sh server     # persistent build server: gpu_warm.py --server, then gpu_multi.py --server
#   bash benchmarks/gpu_session.sh rounds     # 2 vs 1 GPU, alternated: gpu_multi.py --server, order a,b,b,a,a,b
#   bash benchmarks/gpu_session.sh rounds-cold  # the same without a build server (one per build), order a,b,b,a
#
# Where two things share a phase they run on different GPUs at the same time (the host has 16-32 cores); the
# benchmarks interleave their own baselines, so a busy neighbour hits both sides of each ratio.
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
stamp() { date -u +%H:%M:%S; }

case "${1:-}" in
tests)
  (CUDA_VISIBLE_DEVICES=0 timeout 420 $py -m pytest -q -rA -m gpu -p no:cacheprovider tests/test_tensorrt.py \
      tests/test_workers.py tests/test_daemon.py >"$OUT/gpu-tests-0.log" 2>&1
   echo "pytest exit $? at $(stamp)" >>"$OUT/gpu-tests-0.log") &
  (CUDA_VISIBLE_DEVICES=1 timeout 420 $py -m pytest -q -rA -m gpu -p no:cacheprovider tests/test_serve_gpu.py \
      tests/test_tuning_gpu.py >"$OUT/gpu-tests-1.log" 2>&1
   echo "pytest exit $? at $(stamp)" >>"$OUT/gpu-tests-1.log") &
  wait
  if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    timeout 110 $py -m pytest -q -rA -m gpu -p no:cacheprovider tests/test_gpus.py >"$OUT/gpu-tests-2gpu.log" 2>&1
    echo "pytest exit $? at $(stamp)" >>"$OUT/gpu-tests-2gpu.log"
  fi
  ;;
rounds)  # 2 vs 1 GPU with a persistent build server, alternated so that a host slowing down hits both sides
  timeout 320 $py benchmarks/gpu_multi.py --server --order a,b,b,a,a,b --budget-s 300 --out "$OUT/gpu-multi-rounds.json" \
      >"$OUT/gpu-multi-rounds.log" 2>&1
  echo "gpu_multi exit $? at $(stamp)" >>"$OUT/gpu-multi-rounds.log"
  ;;
rounds-cold)  # the same without a build server: each build starts its own fork server
  timeout 280 $py benchmarks/gpu_multi.py --order a,b,b,a --budget-s 250 --out "$OUT/gpu-multi-rounds-cold.json" \
      >"$OUT/gpu-multi-rounds-cold.log" 2>&1
  echo "gpu_multi exit $? at $(stamp)" >>"$OUT/gpu-multi-rounds-cold.log"
  ;;
serve)  # the first build + 9 --retune selections = the 10 fresh selections of issue 14's consistency goal
  (CUDA_VISIBLE_DEVICES=0 timeout 480 $py benchmarks/tuning.py --device cuda --model encoder \
      --repeats 9 --ref-seconds 5 --budget-s 370 --out "$OUT/tuning-gpu-encoder.json" >"$OUT/tuning-gpu-encoder.log" 2>&1
   echo "tuning exit $? at $(stamp)" >>"$OUT/tuning-gpu-encoder.log") &
  (CUDA_VISIBLE_DEVICES=1 timeout 480 $py benchmarks/gpu_serve.py --phase all --repeats 3 --compiled-repeats 2 \
      --blocks 20 --out "$OUT/gpu-serve.json" >"$OUT/gpu-serve.log" 2>&1
   echo "gpu_serve exit $? at $(stamp)" >>"$OUT/gpu-serve.log") &
  wait
  ;;
retest)  # the GPU tests that failed in a `tests` phase, and the tuning benchmark beside them
  (CUDA_VISIBLE_DEVICES=0 timeout 400 $py -m pytest -q -rA -m gpu -p no:cacheprovider tests/test_serve_gpu.py \
      tests/test_workers.py "tests/test_tensorrt.py::test_gpu_backends_end_to_end" >"$OUT/gpu-retests.log" 2>&1
   echo "pytest exit $? at $(stamp)" >>"$OUT/gpu-retests.log") &
  (CUDA_VISIBLE_DEVICES=1 timeout 400 $py benchmarks/tuning.py --device cuda --model cnn --model encoder \
      --repeats 10 --ref-seconds 5 --budget-s 250 --out "$OUT/tuning-gpu.json" >"$OUT/tuning-gpu.log" 2>&1
   echo "tuning exit $? at $(stamp)" >>"$OUT/tuning-gpu.log") &
  wait
  ;;
multi)
  timeout 420 $py benchmarks/gpu_multi.py --budget-s 330 --out "$OUT/gpu-multi.json" >"$OUT/gpu-multi.log" 2>&1
  echo "gpu_multi exit $? at $(stamp)" >>"$OUT/gpu-multi.log"
  timeout 110 $py -m pytest -q -rA -m gpu -p no:cacheprovider tests/test_gpus.py >"$OUT/gpu-tests-2gpu.log" 2>&1
  echo "pytest exit $? at $(stamp)" >>"$OUT/gpu-tests-2gpu.log"
  ;;
warm)
  (CUDA_VISIBLE_DEVICES=0 timeout 480 $py benchmarks/gpu_warm.py --out "$OUT/gpu-warm.json" >"$OUT/gpu-warm.log" 2>&1
   echo "gpu_warm exit $? at $(stamp)" >>"$OUT/gpu-warm.log") &
  (CUDA_VISIBLE_DEVICES=1 timeout 480 $py benchmarks/gpu_serve.py --phase all --repeats 3 --compiled-repeats 2 \
      --blocks 20 --out "$OUT/gpu-serve.json" >"$OUT/gpu-serve.log" 2>&1
   echo "gpu_serve exit $? at $(stamp)" >>"$OUT/gpu-serve.log") &
  wait
  ;;
trt)  # GPU 0: the TRT + worker GPU tests, then the JIT first call's profile | GPU 1: benchmarks/gpu_warm.py
  (CUDA_VISIBLE_DEVICES=0 timeout 330 $py -m pytest -q -rA -m gpu -p no:cacheprovider tests/test_tensorrt.py \
      tests/test_workers.py >"$OUT/gpu-tests-0.log" 2>&1
   echo "pytest exit $? at $(stamp)" >>"$OUT/gpu-tests-0.log"
   CUDA_VISIBLE_DEVICES=0 timeout 200 $py benchmarks/gpu_warm.py --jit-profile --project /tmp/aitune-jit-profile \
      --out "$OUT/gpu-jit-profile.json" >"$OUT/gpu-jit-profile.log" 2>&1) &
  (CUDA_VISIBLE_DEVICES=1 timeout 540 $py benchmarks/gpu_warm.py --out "$OUT/gpu-warm.json" >"$OUT/gpu-warm.log" 2>&1
   echo "gpu_warm exit $? at $(stamp)" >>"$OUT/gpu-warm.log") &
  wait
  ;;
server)  # a persistent build server: GPU 0 six targets cold (warm server) + `-f`, then 2 vs 1 GPU if there are two
  CUDA_VISIBLE_DEVICES=0 timeout 250 $py benchmarks/gpu_warm.py --server --skip-jit --rounds 1 \
      --out "$OUT/gpu-warm-server.json" >"$OUT/gpu-warm-server.log" 2>&1
  echo "gpu_warm exit $? at $(stamp)" >>"$OUT/gpu-warm-server.log"
  if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    timeout 250 $py benchmarks/gpu_multi.py --server --order a,b,a --budget-s 200 --out "$OUT/gpu-multi-server.json" \
        >"$OUT/gpu-multi-server.log" 2>&1
    echo "gpu_multi exit $? at $(stamp)" >>"$OUT/gpu-multi-server.log"
  fi
  ;;
overlap)  # alternated on/off (AITUNE_GPU_OVERLAP), each side on its own GPU so that neither run disturbs the other
  (CUDA_VISIBLE_DEVICES=0 timeout 480 $py benchmarks/gpu_warm.py --overlap-ab 3 --project /tmp/aitune-warm-ab \
      --out "$OUT/gpu-warm-overlap-ab.json" >"$OUT/gpu-warm-overlap-ab.log" 2>&1
   echo "gpu_warm exit $? at $(stamp)" >>"$OUT/gpu-warm-overlap-ab.log") &
  (CUDA_VISIBLE_DEVICES=1 timeout 480 $py benchmarks/gpu_multi.py --gpus-a 0 --order a,a-off,a,a-off --budget-s 440 \
      --out "$OUT/gpu-multi-overlap.json" >"$OUT/gpu-multi-overlap.log" 2>&1
   echo "gpu_multi exit $? at $(stamp)" >>"$OUT/gpu-multi-overlap.log") &
  wait
  ;;
*)
  echo "usage: bash benchmarks/gpu_session.sh tests|serve|retest|multi|warm|overlap|trt|server|rounds|rounds-cold" >&2
  exit 2
  ;;
esac
$py - "$OUT" <<'EOF' || true
import json, subprocess, sys
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip().splitlines()
except OSError:
    smi = []
import torch
try:
    import torch_tensorrt
    trt = torch_tensorrt.__version__
except Exception as e:
    trt = f"not importable: {e}"
json.dump({"gpus": smi, "torch": torch.__version__, "torch_tensorrt": trt, "python": sys.version.split()[0]},
          open(f"{sys.argv[1]}/machine.json", "w"), indent=1)
EOF
ls -la "$OUT"
tail -n 3 "$OUT"/*.log
