#!/usr/bin/env bash
# The strong-classifier protocol of the `blocks` preset on one CUDA GPU, in about 10 minutes:
#
#   bash benchmarks/gpu_classifier.sh CIFAR10_ARCHIVE [RESULTS_DIR]
#
# 1. a tiny run and sweep (seconds), so a broken CUDA path stops the script before the long runs;
# 2. `convae run --preset blocks --init scratch` on every label, timed (target: >= 94 % in <= 60 s);
# 3. `convae pretrain --preset blocks`: masked-image modelling on every training image;
# 4. `convae sweep --preset blocks --checkpoint 3.`: pretrained fine-tuned, scratch (the same
#    recipe), and the logistic probe on pretrained and on random weights, at 25 / 100 / 400 / all
#    labels per class, 3 seeds; then the same with LP-FT (--lp-ft) at 25 and 100 per class;
# 5. the joint (semi-supervised) methods, Gamma-model and plain from random init and plain from 3.'s
#    encoder and decoder, at 25 / 100 / 400 labels per class, 3 seeds, $JOINT_STEPS steps a cell
#    (720: the scratch cells' at 25 and 100);
# 6. the blocks network against the FLOP limit (benchmarks/flops.py --preset blocks), then
#    benchmarks/gpu.sh (throughput and the FLOP limit) in whatever time is left of $BUDGET seconds.
# Each run folder lands in $RUNS; results.json / sweep.json (or, for a sweep stopped by its time
# limit, the cells it finished: metrics.jsonl) are copied to RESULTS_DIR; the log goes to stdout.
# DEVICE=cpu EXTRA="--height 16 ..." FT_EXTRA="--finetune-epochs 1" tries the whole script on a CPU at toy size.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bash benchmarks/gpu_classifier.sh CIFAR10_ARCHIVE [RESULTS_DIR]}
RESULTS=${2:-benchmarks/results/gpu}
RUNS=${RUNS:-runs/gpu-classifier}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}
read -r -a EXTRA <<< "${EXTRA:-}"
read -r -a FT_EXTRA <<< "${FT_EXTRA:-}"  # fine-tuning flags: for run and sweep, not pretrain
read -r -a SWEEP_EXTRA <<< "${SWEEP_EXTRA:-}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$RESULTS" "$RUNS"
$PY -c "import sys, torch; print('torch', torch.__version__)
if '$DEVICE' == 'cuda' and not torch.cuda.is_available(): sys.exit('no CUDA GPU here (DEVICE=cpu tries the script on the CPU)')" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true

PREFIX=classifier
PRETRAIN_EXTRA=()
# shellcheck source=benchmarks/_gpu_step.sh
source benchmarks/_gpu_step.sh

echo "== smoke"
timeout 120 $PY -m convae run --preset blocks --data "$DATA" --device "$DEVICE" --out "$RUNS/smoke" \
    --channels 16 32 --pretrain-epochs 1 --finetune-epochs 1 --labels-per-class 5 --epoch-images 0 "${EXTRA[@]}" \
    "${FT_EXTRA[@]}" ||
    { echo "smoke failed"; exit 1; }

step scratch_all 150 run --preset blocks --init scratch
step pretrain 150 pretrain --preset blocks --pretrain-epochs "${PRETRAIN_EPOCHS:-20}"
AE="$RUNS/pretrain/checkpoints/autoencoder.pt"
[ -f "$AE" ] || { echo "no autoencoder was written: the sweep needs one"; exit 1; }
step sweep 300 sweep --preset blocks --checkpoint "$AE" --seeds 3 --labels-per-class 25 100 400 all \
    --methods finetune scratch logistic_probe logistic_random "${SWEEP_EXTRA[@]}"
step sweep_lpft 60 sweep --preset blocks --checkpoint "$AE" --seeds 3 --labels-per-class 25 100 --lp-ft \
    --methods finetune scratch "${SWEEP_EXTRA[@]}"
step sweep_joint 150 sweep --preset blocks --checkpoint "$AE" --seeds 3 --labels-per-class 25 100 400 \
    --steps "${JOINT_STEPS:-720}" --methods joint_gamma joint_plain joint_finetune "${SWEEP_EXTRA[@]}"

if [ "$DEVICE" = cuda ]; then  # the blocks network's step against the GPU's matrix-product limit
    timeout 90 $PY benchmarks/flops.py --preset blocks --device cuda --warmup 5 --steps 20 \
        --json "$RESULTS/flops_blocks.json" || echo "== flops.py --preset blocks stopped (exit $?)"
fi
LEFT=$((BUDGET - SECONDS))
if [ "$DEVICE" = cuda ] && [ "$LEFT" -gt 60 ]; then
    echo "== gpu.sh with ${LEFT}s left"
    OUT_DIR="$RESULTS" timeout "$LEFT" bash benchmarks/gpu.sh "$DATA" || echo "== gpu.sh stopped (exit $?)"
fi
echo "== done in $SECONDS s"
