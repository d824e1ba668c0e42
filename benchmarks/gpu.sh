#!/usr/bin/env bash
# Every benchmark on one CUDA GPU, in under 12 minutes, so a borrowed GPU's time goes to measuring.
#
#   bash benchmarks/gpu.sh [CIFAR-10 ARCHIVE]     (random uint8 data of CIFAR-10's shape without one)
#
# Results land in benchmarks/results/gpu/ (JSON) and on stdout (tables).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-random}
OUT=${OUT_DIR:-benchmarks/results/gpu}
mkdir -p "$OUT"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
# 1. throughput: convae (fp32, bf16, and compiled) against the lecture's loop; ~3 min
timeout 240 python benchmarks/train_throughput.py --device cuda --data "$DATA" --batch-size 2000 \
    --warmup 5 --steps 20 --rounds 2 --compile --json "$OUT/train_throughput.json"
# 2. the FLOP limit and convae's fraction of it; ~1 min
timeout 120 python benchmarks/flops.py --device cuda --data "$DATA" --warmup 5 --steps 20 --json "$OUT/flops.json"
# 3. end to end on the real archive (convae only: the lecture's loop is measured in 1.); ~2 min
if [ "$DATA" != random ]; then
    timeout 150 python benchmarks/end_to_end.py --data "$DATA" --device cuda --precision bf16 --skip-reference \
        --json "$OUT/end_to_end.json"
fi
# 4. sources of 0.2 and 1 GB: batches read from the cache file (host placement, pinned, prefetched)
#    against the set on the GPU; ~2 min
timeout 180 python benchmarks/large_source.py --device cuda --gb 0.2 1 --steps 50 --warmup 5 --dir "${TMPDIR:-/tmp}" \
    --json "$OUT/large_source.json"
