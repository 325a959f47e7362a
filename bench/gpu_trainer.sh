#!/usr/bin/env bash
# Trainer throughput and loss-graph timings on a GPU machine: the same figures as on CPU
# (bench/bench_trainer.py float32 then mixed precision; bench/bench_loss.py on the GPU,
# against the numpy baseline on the host CPU). Needs the GPU build of TensorFlow:
#   pip install 'tensorflow[and-cuda]==2.21.*' && pip install -e .
# Usage: bench/gpu_trainer.sh [EXAMPLES] [BATCH_SIZE]   (PYTHON=... to pick the interpreter)
# About 5 minutes on one GPU; each step has its own timeout so one hang cannot eat the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
EXAMPLES="${1:-1024}"
BATCH="${2:-32}"
export TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
"$PYTHON" -c "import tensorflow as tf; g = tf.config.list_physical_devices('GPU'); print('TensorFlow', tf.__version__, 'GPUs:', g); assert g, 'TensorFlow sees no GPU: install tensorflow[and-cuda]'"
# The loss graph first: sets/s of the Trainer's batch shapes, ratios to the host's numpy baseline.
timeout 240 "$PYTHON" bench/bench_loss.py --device GPU --repeats 5
timeout 300 "$PYTHON" bench/bench_trainer.py --examples "$EXAMPLES" --batch-size "$BATCH"
timeout 300 "$PYTHON" bench/bench_trainer.py --examples "$EXAMPLES" --batch-size "$BATCH" --mixed-precision
