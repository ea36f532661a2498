#!/usr/bin/env bash
# Issue 11's GPU measurements in one call on the lent GPU machine, inside a time budget.
#
# That machine reaches no package registry: first, here, `bash benchmarks/device_wheels.sh`
# (fills .whl/), then, through the device tool, from the repository root:
#
#   run(command="bash benchmarks/gpu_benchmarks.sh", carry=[".whl"], timeout_s=600)
#
# It installs the wheels into /tmp/site, checks that bn_repro imports and sees the GPU, then runs,
# each stage cut off at its own limit and at what is left of GPU_BENCH_BUDGET_S (default 480 s; with
# GPU_BENCH_SMOKE=1 only the budget limits a stage):
#   1. bench_model.py float32 at 224x224, batch 32: ours, ours in the jit and pmap loops (host-fed),
#      PyTorch eager and torch.compile'd (channels_last)  -> bn_inception_gpu.md/.json
#   2. the same in bfloat16 (no loop rows)                 -> bn_inception_bfloat16_gpu.md/.json
#   3. bench_input_pipeline.py on the machine's CPUs, the target = stage 1's fastest ours rate
#                                                          -> input_pipeline_gpu_host.md/.json
# and packs what was written into $OUT/gpu_results.tar.gz, its log beside it ($OUT/gpu_benchmarks.log):
# `tar xzf gpu_results.tar.gz -C results/bench` then commits them. GPU_BENCH_SMOKE=1 runs every stage
# at a tiny size (CPU or GPU), for checking this script (tests/test_gpu_benchmarks_script.py);
# PYTHON (default python3) and GPU_BENCH_WHEELS (default .whl) name the interpreter and the wheels.
set -uo pipefail
out=$(realpath -m "${OUT:-${1:?give the output folder (the device tool sets OUT)}}")
cd "$(dirname "$0")/.."
budget=${GPU_BENCH_BUDGET_S:-480}
results=$out/gpu_results
mkdir -p "$results"
exec > >(tee -a "$out/gpu_benchmarks.log") 2>&1
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
wheels=${GPU_BENCH_WHEELS:-.whl}

if compgen -G "$wheels/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
    || { echo "installing $wheels/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
"$python" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda[0-9]+-plugin|flax|optax|orbax-checkpoint|numpy|torch|triton|grain|tensorflow-datasets) '
"$python" -c "import bn_repro, jax; print('JAX devices:', jax.devices())" || { echo "bn_repro does not import"; exit 1; }

size=() input=() smoke=0 float32=() bfloat16=()
if [[ ${GPU_BENCH_SMOKE:-0} == 1 ]]; then
  # Cheap enough for CI: no torch.compile, and no PyTorch in bfloat16 (a CPU without AVX-512 runs
  # torch's bfloat16 matmuls in a scalar fallback); tests/test_scripts.py covers those rows.
  smoke=1 float32=(--no-torch_compile) bfloat16=(--no-torch)
  size=(--image_size 32 --batch_size 8 --set=--config.model.width=0.0625 --matmul_size 256
        --no-nn_conv_row --warmup 1 --repeats 1 --steps 1)
  input=(--num_images 64 --num_eval_images 64 --width 64 --height 48 --image_size 32 --batch_size 8 --batches 2
         --warmup 1 --repeats 1 --workers 0,1)
else
  size=(--warmup 3 --repeats 5 --steps 10)
  input=(--workers 0,2,4,8,16)
fi

start=$SECONDS
failed=0
stage() {  # stage NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 left
  shift 2
  left=$((budget - (SECONDS - start)))
  ((left < limit || smoke)) && limit=$left  # a smoke run on a slow CPU: only the budget limits
  if ((limit < 20)); then
    echo "== $name: skipped, $left s of the budget left"
    failed=1
    return
  fi
  echo "== $name (at most $limit s): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  ((rc == 0)) || failed=1
}

stage bn_inception_float32 240 "$python" benchmarks/bench_model.py --precision float32 --loops jit,pmap \
  --torch_layouts channels_last "${size[@]}" "${float32[@]}" --output "$results/bn_inception_gpu.md"
stage bn_inception_bfloat16 150 "$python" benchmarks/bench_model.py --precision bfloat16 \
  --torch_layouts channels_last "${size[@]}" "${bfloat16[@]}" --output "$results/bn_inception_bfloat16_gpu.md"
target=$("$python" -c "
import json, sys
rows = json.load(open(sys.argv[1]))['rows']
print(round(max(r['images_per_s'] for r in rows if r['implementation'].startswith('ours') and 'images_per_s' in r)))
" "$results/bn_inception_gpu.json" 2>/dev/null) || target=2000
echo "input pipeline target: $target images/s"
stage input_pipeline 150 "$python" benchmarks/bench_input_pipeline.py --target_images_per_sec "$target" \
  --data_dir /tmp/synthetic_imagenet "${input[@]}" --output "$results/input_pipeline_gpu_host.md"

tar czf "$out/gpu_results.tar.gz" -C "$results" .
rm -rf "$results"
echo "== written: $(tar tzf "$out/gpu_results.tar.gz" | tr '\n' ' ')"
exit $failed
