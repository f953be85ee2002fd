#!/usr/bin/env bash
# GPU training benchmark: SD1.5 U-Net (random weights), LoRA and full fine-tune, 512 px, bf16 (docs/benchmarks.md,
# "GPU (bench/gpu.sh)"). The GPU machine runs it with its own python3; nothing is installed from the network.
# Needs there: torch with CUDA (the device image: torch 2.11 + CUDA 13.0) and diffusers, which that image lacks:
#   here, once: bench/gpu.sh --prepare   (pip downloads the pinned diffusers and a trimmed bitsandbytes into .whl/)
#   then the device call carries .whl; this script installs .whl/*.whl into /tmp/site when the folder is there.
# Optional: bitsandbytes (without it the AdamW8bit rows say "skipped"), xformers (not in the image and no wheel
# fits: its rows say "not installed"). Each missing piece is printed and its rows skipped; nothing fails for it.
# Usage: bench/gpu.sh [bench/bench_gpu.py options]      e.g. bench/gpu.sh --configs lora-b8-sdpa-adamw --steps 20
#        bench/gpu.sh --prepare [DIR]                    here, with network (DIR default .whl)
#        PYTHON=.venv/bin/python bench/gpu.sh --smoke    here, on the CPU: the same code, tiny model, seconds
# Results: $OUT (else bench/results/): gpu_bench.json, gpu_bench.md, gpu_bench.log. Runs in about 2-4 minutes on
# one H100; GPU_BENCH_TIMEOUT (default 450 s) stops it whatever happens, keeping the rows written so far.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "--prepare" ]; then
  exec "$PY" bench/bench_gpu.py --prepare_wheels "${2:-.whl}"
fi

OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_bench.log"
{
  echo "== bench/gpu.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), $(getconf _NPROCESSORS_ONLN) CPUs"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
      --format=csv || true
  else
    echo "nvidia-smi: not available (no NVIDIA driver here)"
  fi
  WHL=${WHL_DIR:-.whl}
  if ls "$WHL"/*.whl >/dev/null 2>&1; then
    echo "== installing $(ls "$WHL"/*.whl | xargs -n1 basename | tr '\n' ' ')into /tmp/site (no network)"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHL"/*.whl; then
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
      echo "wheel install failed: going on with the machine's own packages"
    fi
  else
    echo "== no $WHL/ folder: using the machine's own packages (diffusers is needed: bench/gpu.sh --prepare here)"
  fi
  "$PY" - <<'EOF' || echo "python/torch: not usable with $PY"
import sys, torch
print("python", sys.version.split()[0], sys.executable)
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version(),
      "| GPU:", gpu)
EOF
  export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
  timeout -k 10 "${GPU_BENCH_TIMEOUT:-450}" "$PY" bench/bench_gpu.py "$@"
  rc=$?
  [ $rc -eq 124 ] && echo "== stopped by GPU_BENCH_TIMEOUT=${GPU_BENCH_TIMEOUT:-450}s:" \
    "$OUT_DIR/gpu_bench.md holds the rows done"
  exit $rc
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
