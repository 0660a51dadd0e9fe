#!/usr/bin/env bash
# The calibration-forward benchmark on the GPU machine: full shapes, bfloat16, results in $OUT.
#
# That machine has torch but no network (and maybe no transformers or llmcompressor), so the
# packages come as wheels carried in benchmarks/wheels/ (bash benchmarks/fetch_wheels.sh here;
# carry the folder, it is git-ignored) and are installed --no-deps into a folder on PYTHONPATH.
#
#   bash benchmarks/gpu_run.sh                          # all shapes at 512 and 2048 tokens, on cuda
#   bash benchmarks/gpu_run.sh --shapes qwen3-30b-a3b   # extra arguments go to calibration_forward.py
#   DEVICE=cpu bash benchmarks/gpu_run.sh --scale 16 --tokens 64 --repeats 2   # test the script on a CPU
#   RUNS=3 bash benchmarks/gpu_run.sh --repeats 10      # three fresh processes, and the median of their ratios
#
# Writes $OUT/calibration_forward_<device>.json and .log (with RUNS: _run<i>.json and .log each, and
# _summary.json and .log), and $OUT/environment.txt.
#
# GPTQ W4A16 end to end (benchmarks/gptq_shared.py): LLM Compressor alone against autocal with
# SharedHessianGPTQModifier, each in a fresh process, one layer shape per command (each fits in 10 minutes):
#   BENCH=gptq SHAPE=qwen3-30b-a3b bash benchmarks/gpu_run.sh
#   BENCH=gptq SHAPE=deepseek-v3 bash benchmarks/gpu_run.sh
#   BENCH=gptq SHAPE=tiny DEVICE=cpu bash benchmarks/gpu_run.sh    # test the script on a CPU
# Writes $OUT/gptq_shared_<device>_<shape>.json and .log.
#
# GPTQ on Linears with Hessians of their own, in batches of several sizes (benchmarks/gptq_batches.py):
#   BENCH=batches bash benchmarks/gpu_run.sh --sizes 15 19 32
#
# LLM Compressor's oneshot end to end (benchmarks/oneshot.py; static FP8 unless --recipe awq), arguments passed on:
#   BENCH=oneshot bash benchmarks/gpu_run.sh --methods autocal autocal-shared-observers incumbent \
#     --layers 2 --experts 128 --hidden 2048 --width 768 --samples 32 --tokens 512 --rounds 3
# Writes $OUT/oneshot_<device>.json and .log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/autocal-bench}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/autocal-site}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"

[ -d benchmarks/wheels ] || { echo "gpu_run.sh: benchmarks/wheels/ is missing: run benchmarks/fetch_wheels.sh and carry it" >&2; exit 2; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  --find-links benchmarks/wheels -r benchmarks/requirements-gpu.txt
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

{
  "$PY" - <<'PY'
import platform, torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
PY
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || true
  lscpu 2>/dev/null | grep -E "^(Model name|CPU\(s\)|Thread|Socket)" || true  # prepare runs on the host's CPU
} | tee "$OUT/environment.txt"

if [ "$DEVICE" = cuda ]; then
  args=(--device cuda --dtype bfloat16 --scale 1)
else
  args=(--device "$DEVICE" --dtype float32)
fi
set -o pipefail
if [ "${BENCH:-calibration_forward}" = gptq ]; then
  dtype=bfloat16
  if [ "$DEVICE" != cuda ]; then dtype=float32; export CUDA_VISIBLE_DEVICES=""; fi
  name="gptq_shared_${DEVICE}_${SHAPE:?BENCH=gptq needs SHAPE=qwen3-30b-a3b, deepseek-v3 or tiny}"
  "$PY" benchmarks/gptq_shared.py --shape "$SHAPE" --dtype "$dtype" --methods incumbent shared --rounds 1 \
    --json "$OUT/$name.json" "$@" 2>&1 | grep --line-buffered -v "No accelerator available" | tee "$OUT/$name.log"
  exit 0
fi
if [ "${BENCH:-}" = batches ]; then  # GPTQ batch sizes of Linears with Hessians of their own (gptq_batches.py)
  name="gptq_batches_${DEVICE}"
  "$PY" benchmarks/gptq_batches.py --device "$DEVICE" --json "$OUT/$name.json" "$@" 2>&1 \
    | grep --line-buffered -v "No accelerator available" | tee "$OUT/$name.log"
  exit 0
fi
if [ "${BENCH:-}" = oneshot ]; then
  dtype=bfloat16
  if [ "$DEVICE" != cuda ]; then dtype=float32; export CUDA_VISIBLE_DEVICES=""; fi
  name="oneshot_${DEVICE}"
  "$PY" benchmarks/oneshot.py --dtype "$dtype" --json "$OUT/$name.json" "$@" 2>&1 \
    | grep --line-buffered -v "No accelerator available" | tee "$OUT/$name.log"
  exit 0
fi
# RUNS=n: n runs, each a fresh process (the host's speed varies between processes), and their summary.
RUNS=${RUNS:-1}
for run in $(seq "$RUNS"); do
  name="calibration_forward_$DEVICE"; [ "$RUNS" = 1 ] || name+="_run$run"
  "$PY" benchmarks/calibration_forward.py "${args[@]}" --json "$OUT/$name.json" "$@" 2>&1 \
    | grep --line-buffered -v "No accelerator available" | tee "$OUT/$name.log"
done
if [ "$RUNS" != 1 ]; then
  "$PY" benchmarks/runs_summary.py "$OUT"/calibration_forward_"$DEVICE"_run*.json \
    --json "$OUT/calibration_forward_${DEVICE}_summary.json" | tee "$OUT/calibration_forward_${DEVICE}_summary.log"
fi
