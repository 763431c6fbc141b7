#!/usr/bin/env bash
# One device-machine call for the ops: optionally build the extension and run every GPU-marked test,
# then time bench/ops.py (its arguments in BENCH_ARGS) and bench/models.py (MODELS_ARGS). Logs and the JSON
# rows go under $OUT.
#   BUILD=1 TESTS=1 TAG=bf16 BENCH_ARGS="--dtype bfloat16" bash bench/gpu_ops.sh
#   BENCH_ARGS="--dtype bfloat16 --only linear_gelu" MODELS_ARGS="--quick --models inpformer,proad" bash bench/gpu_ops.sh
#   PROFILE=inpformer bash bench/gpu_ops.sh      # top GPU kernels of one B=64 forward, fused and reference
#   HOST=1 bash bench/gpu_ops.sh                 # bench/host_overhead.py on this machine's CPU (launches stubbed)
set -u
OUT=${OUT:-/tmp/fastproto_gpu}; mkdir -p "$OUT"; TAG=${TAG:-run}
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}
if [ "${BUILD:-0}" = 1 ]; then
  start=$(date +%s)
  MAX_JOBS=16 FASTPROTO_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    timeout 200 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo "build rc=$? in $(( $(date +%s) - start )) s"; grep -E " error |Error" "$OUT/build.log" | head -10
fi
if [ "${TESTS:-0}" = 1 ]; then
  start=$(date +%s)
  timeout ${TEST_TIMEOUT:-180} python3 -m pytest -q -rs -p no:cacheprovider tests -m gpu ${TEST_ARGS:-} > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$? in $(( $(date +%s) - start )) s"; grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -25
fi
if [ -n "${BENCH_ARGS+x}" ]; then
  start=$(date +%s)
  timeout ${BENCH_TIMEOUT:-300} python3 bench/ops.py --device cuda $BENCH_ARGS --json "$OUT/ops_$TAG.json" \
    > "$OUT/ops_$TAG.log" 2>&1
  echo "bench rc=$? in $(( $(date +%s) - start )) s"; cut -c1-170 "$OUT/ops_$TAG.log" | tail -${BENCH_TAIL:-60}
fi
if [ -n "${MODELS_ARGS+x}" ]; then
  start=$(date +%s)
  timeout ${MODELS_TIMEOUT:-300} python3 bench/models.py --device cuda $MODELS_ARGS --json "$OUT/models_$TAG.json" \
    > "$OUT/models_$TAG.log" 2>&1
  echo "models rc=$? in $(( $(date +%s) - start )) s"; cut -c1-170 "$OUT/models_$TAG.log" | tail -${MODELS_TAIL:-30}
fi
if [ "${HOST:-0}" = 1 ]; then
  timeout ${HOST_TIMEOUT:-120} python3 bench/host_overhead.py --json "$OUT/host_overhead.json" > "$OUT/host_overhead.log" 2>&1
  echo "host overhead rc=$?"; cat "$OUT/host_overhead.log" | tail -10
fi
if [ -n "${PROFILE:-}" ]; then
  for mode in "" --reference; do
    timeout ${PROFILE_TIMEOUT:-120} python3 bench/profile_model.py --model "$PROFILE" --batch 64 $mode \
      > "$OUT/profile_${PROFILE}${mode}.log" 2>&1
    echo "profile $PROFILE $mode rc=$?"; cut -c1-150 "$OUT/profile_${PROFILE}${mode}.log" | tail -${PROFILE_TAIL:-22}
  done
fi
