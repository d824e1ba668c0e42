#!/usr/bin/env bash
# Consistency training's protocol (the `few` preset) on one CUDA GPU, in about 10 minutes:
#
#   bash benchmarks/gpu_consistency.sh CIFAR10_ARCHIVE [RESULTS_DIR]
#
# 1. a tiny run (seconds), so a broken CUDA path stops the script before the long runs;
# 2. `convae pretrain --preset few`: the blocks network's masked-image pretraining, $PRETRAIN_EPOCHS epochs;
# 3. `convae finetune --preset few --checkpoint 2. --labels-per-class 25`: consistency training from the
#    pretrained encoder with 25 labels per class, timed (target: >= 90 % within 15 minutes on one GPU);
# 4. `convae sweep --preset few --checkpoint 2. --curves`: scratch, pretrained fine-tuned, and consistency
#    training from random init (FixMatch, FlexMatch) and from the pretrained encoder (FixMatch, FlexMatch,
#    FreeMatch), 25 and 100 labels per class, 3 seeds, $STEPS steps a cell; stopped by its time limit it is
#    continued with `convae sweep --out DIR --resume` on the next GPU.
# Each run folder lands in $RUNS; results.json / sweep.json (or, for a sweep stopped by its time limit, the
# cells it finished: metrics.jsonl) are copied to RESULTS_DIR; the log goes to stdout.
# DEVICE=cpu MODEL="--height 16 ..." EXTRA="--batch-size 4 ..." tries the whole script on a CPU at toy size (MODEL:
# the network's flags, for the commands that build one; the others take it from the checkpoint).
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bash benchmarks/gpu_consistency.sh CIFAR10_ARCHIVE [RESULTS_DIR]}
RESULTS=${2:-benchmarks/results/gpu}
RUNS=${RUNS:-runs/gpu-consistency}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
read -r -a EXTRA <<< "${EXTRA:-}"
read -r -a MODEL <<< "${MODEL:-}"
read -r -a FT_EXTRA <<< "${FT_EXTRA:-}"  # consistency-training flags: for finetune and sweep, not pretrain
read -r -a SWEEP_EXTRA <<< "${SWEEP_EXTRA:-}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$RESULTS" "$RUNS"
$PY -c "import sys, torch; print('torch', torch.__version__)
if '$DEVICE' == 'cuda' and not torch.cuda.is_available(): sys.exit('no CUDA GPU here (DEVICE=cpu tries the script on the CPU)')" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true

PREFIX=consistency
PRETRAIN_EXTRA=("${MODEL[@]}")
# shellcheck source=benchmarks/_gpu_step.sh
source benchmarks/_gpu_step.sh

echo "== smoke"
timeout 120 $PY -m convae run --preset few --data "$DATA" --device "$DEVICE" --out "$RUNS/smoke" \
    --channels 16 32 --pretrain-epochs 1 --finetune-epochs 1 --labels-per-class 5 "${EXTRA[@]}" "${MODEL[@]}" \
    "${FT_EXTRA[@]}" ||
    { echo "smoke failed"; exit 1; }

step pretrain 150 pretrain --preset few --pretrain-epochs "${PRETRAIN_EPOCHS:-20}"
AE="$RUNS/pretrain/checkpoints/autoencoder.pt"
[ -f "$AE" ] || { echo "no autoencoder was written: the runs below need one"; exit 1; }
step few_25 150 finetune --preset few --checkpoint "$AE" --labels-per-class 25
step sweep 240 sweep --preset few --checkpoint "$AE" --seeds 3 --labels-per-class 25 100 --curves \
    --steps "${STEPS:-1500}" --methods scratch finetune joint_fixmatch joint_flexmatch finetune_fixmatch \
    finetune_flexmatch finetune_freematch "${SWEEP_EXTRA[@]}"
echo "== done in $SECONDS s (a sweep stopped by its limit continues with: convae sweep --out $RUNS/sweep --resume)"
