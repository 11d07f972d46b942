#!/usr/bin/env bash
# The default suite RUNS times in a row while a second copy of it runs beside it, the whole time, on the
# same machine (issue #18: no test may depend on load or on timing margins). The second copy is a git
# worktree of HEAD in a temporary folder, run in a loop with the same interpreter. Each run of either copy
# is one row of the table; the beside copy's run still going when the last main run ends is stopped and
# leaves no row. The beside copy tests HEAD, not uncommitted edits. Services are required as in CI
# (MNIST_BENCH_REQUIRE_SERVICES=1 unless set): without PostgreSQL every run fails instead of skipping.
# Exits 1 if any completed run of either copy failed, 2 if it cannot start.
# Usage: make soak [SOAK_RUNS=5] [SOAK_OUT=results/soak.csv] (or tests/soak.sh with the same variables);
# PYTEST_ARGS=tests/test_layout.py tries it on a subset
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, not resolved: a venv's python is a link
RUNS=${SOAK_RUNS:-5}
OUT=${SOAK_OUT:-results/soak.csv}
export MNIST_BENCH_REQUIRE_SERVICES=${MNIST_BENCH_REQUIRE_SERVICES:-1}
CPU=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
COMMIT=$(git rev-parse --short HEAD)
read -r -a ARGS <<< "${PYTEST_ARGS:-}"  # a subset, to try the script itself (default: the whole suite)

one() {  # one COPY RUN DIR TABLE LOGS: one run of the default suite in DIR, appended to TABLE as a row;
    # the log of a failed run is kept as LOGS/failed-COPY-RUN.log
    local copy=$1 run=$2 dir=$3 table=$4 logs=$5 start t0 rc summary
    start=$(date -u +%FT%TZ)
    t0=$SECONDS
    (cd "$dir" && exec "$PY" -m pytest -q -p no:cacheprovider "${ARGS[@]}") > "$logs/$copy-$run.log" 2>&1
    rc=$?
    summary=$(tail -1 "$logs/$copy-$run.log" | tr -d ',=' | sed 's/^ *//; s/ *$//')
    echo "$copy,$run,$start,$((SECONDS - t0)),$rc,$summary,$CPU,$COMMIT" >> "$table"
    [ "$rc" -eq 0 ] || stopped "$copy" "$rc" || cp "$logs/$copy-$run.log" "$logs/failed-$copy-$run.log"
    return "$rc"
}

stopped() {  # stopped COPY RC: a beside run cut short by the final stop (if it wrote a row at all)
    [ "$1" = beside ] && { [ "$2" -eq 143 ] || [ "$2" -eq 137 ] || [ "$2" -eq 130 ]; }
}

if [ "${1:-}" = "--beside" ]; then  # the second copy: runs until it is stopped
    i=1
    while :; do
        one beside "$i" "$2" "$3" "$4"
        i=$((i + 1))
    done
fi

logs=$(mktemp -d)
table="$logs/soak.csv"
mkdir -p "$(dirname "$OUT")" && touch "$OUT" && [ -w "$OUT" ] || { echo "soak: cannot write $OUT" >&2; exit 2; }
git worktree add --quiet --detach "$logs/copy" HEAD || { echo "soak: cannot make a worktree of HEAD" >&2; exit 2; }
echo "copy,run,started,seconds,rc,summary,cpu,commit" > "$table"
setsid "$0" --beside "$logs/copy" "$table" "$logs" &
beside=$!
stop() {
    kill -TERM -- -"$beside" 2>/dev/null
    wait "$beside" 2>/dev/null
    git worktree remove --force "$logs/copy" 2>/dev/null
}
trap 'stop; rm -rf "$logs"; exit 130' INT TERM

for i in $(seq 1 "$RUNS"); do
    one main "$i" . "$table" "$logs"
done
stop
# A beside run cut short by the stop is "stopped", not a failure.
awk -F, -v OFS=, 'NR > 1 && $1 == "beside" && ($5 == 143 || $5 == 137 || $5 == 130) {$5 = "stopped"} 1' \
    "$table" > "$OUT"
for f in "$logs"/failed-*.log; do  # keep the log of every failed run beside the table
    [ -e "$f" ] && cp "$f" "${OUT%.csv}-${f#"$logs"/failed-}"
done
rm -rf "$logs"
bad=$(awk -F, 'NR > 1 && $5 != 0 && $5 != "stopped"' "$OUT" | wc -l)
echo "soak: $RUNS runs of the suite beside a second copy; failed runs: $bad (table: $OUT)"
[ "$bad" -eq 0 ] || exit 1
