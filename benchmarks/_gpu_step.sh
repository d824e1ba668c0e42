# What the GPU scripts share: one convae command under a time limit, its results copied out. Sourced with
# DATA, DEVICE, RUNS, RESULTS, PY, EXTRA (every command), FT_EXTRA (all but pretrain), PRETRAIN_EXTRA (pretrain
# only) and PREFIX (the results' file names) set.

step() {  # NAME SECONDS COMMAND ARGS...: one convae command under a time limit
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name (limit ${limit}s): convae $*"
    local ft=("${FT_EXTRA[@]}")
    [ "$1" = pretrain ] && ft=("${PRETRAIN_EXTRA[@]}")
    timeout "$limit" $PY -m convae "$@" --data "$DATA" --device "$DEVICE" --out "$RUNS/$name" "${EXTRA[@]}" "${ft[@]}"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    for f in results.json sweep.json; do
        cp "$RUNS/$name/$f" "$RESULTS/${PREFIX}_$name.json" 2>/dev/null || true
    done
    [ -f "$RUNS/$name/sweep.json" ] || [ -f "$RUNS/$name/results.json" ] ||
        cp "$RUNS/$name/metrics.jsonl" "$RESULTS/${PREFIX}_$name.metrics.jsonl" 2>/dev/null || true
    return $rc
}
