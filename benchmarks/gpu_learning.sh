#!/usr/bin/env bash
# The learning-quality protocol of the `patches` preset on one CUDA GPU, in under 10 minutes:
# the sweep (pretrained fine-tuned / frozen / scratch, logistic and kNN beside random weights)
# at 25 / 100 / 400 / all labels per class and 3 seeds, which takes hours on a small CPU.
#
#   bash benchmarks/gpu_learning.sh CIFAR10_ARCHIVE [RESULTS_DIR]
#
# 1. a tiny sweep (seconds) so a broken CUDA path stops the script before the long runs;
# 2. `convae sweep --preset patches`: pretrains on the GPU, then every method, budget and seed;
# 3. the fine-tuning learning rate, x0.3 and x3, for fine-tuned and scratch alike (25 and 100 per
#    class, on 2.'s autoencoder): is the fine-tuning gain an artefact of one learning rate?
# 4. the same sweep with 1,600 filters (Coates et al.'s widest dictionary).
# Each run folder lands in $RUNS; each sweep.json (or, for a run stopped by its time limit, the
# cells it finished: metrics.jsonl) is copied to RESULTS_DIR as learning_NAME.json; the log goes to stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bash benchmarks/gpu_learning.sh CIFAR10_ARCHIVE [RESULTS_DIR]}
RESULTS=${2:-benchmarks/results/gpu}
RUNS=${RUNS:-runs/gpu-learning}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu SWEEP_ARGS="--pretrain-epochs 1 --steps 2 ..." tries the script on a CPU
read -r -a EXTRA <<< "${SWEEP_ARGS:-}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$RESULTS" "$RUNS"
$PY -c "import sys, torch; print('torch', torch.__version__)
if '$DEVICE' == 'cuda' and not torch.cuda.is_available(): sys.exit('no CUDA GPU here (DEVICE=cpu tries the script on the CPU)')" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true

sweep() {  # NAME SECONDS ARGS...: one sweep under a time limit; its results copied whatever happened
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name (limit ${limit}s): convae sweep $*"
    timeout "$limit" $PY -m convae sweep --data "$DATA" --device "$DEVICE" --out "$RUNS/$name" "$@" "${EXTRA[@]}"
    echo "== $name: exit $? after $((SECONDS - start)) s"
    cp "$RUNS/$name/sweep.json" "$RESULTS/learning_$name.json" 2>/dev/null ||
        cp "$RUNS/$name/metrics.jsonl" "$RESULTS/learning_$name.metrics.jsonl" 2>/dev/null || true
}

echo "== smoke"
timeout 150 $PY -m convae sweep --preset patches --data "$DATA" --device "$DEVICE" --out "$RUNS/smoke" \
    --channels 16 --pretrain-epochs 1 --labels-per-class 5 --seeds 1 --steps 3 "${EXTRA[@]}" || { echo "smoke failed"; exit 1; }

sweep patches 210 --preset patches --precision fp32
AE="$RUNS/patches/checkpoints/autoencoder.pt"
for lr in 3e-4 3e-3; do
    sweep "patches_lr$lr" 45 --preset patches --precision fp32 --checkpoint "$AE" --finetune-lr "$lr" \
        --labels-per-class 25 100 --methods finetune scratch
done
sweep patches1600 230 --preset patches --precision fp32 --channels 1600
