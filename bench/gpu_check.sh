#!/usr/bin/env bash
# One device-machine call: build the CUDA extension, run the GPU tests, time the GPU rows of the
# metrics benchmark (incl. the 113 M-pixel MVTec-sized case). Writes logs and results under $OUT.
set -u
OUT=${OUT:-/tmp/fastproto_gpu}; mkdir -p "$OUT"
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
export MAX_JOBS=16 FASTPROTO_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
start=$(date +%s)
timeout 200 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "build rc=$? in $(( $(date +%s) - start )) s"
grep -E "error|Error" "$OUT/build.log" | head -20
python3 -m fastproto.cli info
timeout 90 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda_ops.py tests/test_anomaly_map.py -m gpu \
  > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"; tail -15 "$OUT/gpu_tests.log"
timeout ${BENCH_TIMEOUT:-150} python3 bench/metrics.py --images 150 --device cuda --gpu-only --no-heavy --repeats 5 --budget 3 \
  --out "$OUT/RESULTS_gpu.md" --json "$OUT/gpu.json" > "$OUT/bench.log" 2>&1; echo "bench rc=$?"; tail -45 "$OUT/bench.log"
