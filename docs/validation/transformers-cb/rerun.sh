#!/usr/bin/env bash
# Reproduce the transformers-cb validation reports on this CPU (SmolLM2-135M fp32, 1 torch thread).
# Each run is refused (exit 2) when the machine was contended; this script waits for a quiet
# moment (1-minute load below QUIET) and retries until DEADLINE (epoch seconds, default +1 h).
#   docs/validation/transformers-cb/rerun.sh [OUT_DIR]
# PROFILE: the latency profile [smollm2-135m-cpu-fp32-1thread.json here]; GRID: if set and PROFILE
# does not exist yet, calibrate it first on that grid (1 thread, embed/layer/lm_head).
# MAX_OTHER: if set, passed as --max-other-cores (e.g. 0.1: refuse runs where other processes kept
# more than 0.1 cores busy on average). The 4 December reruns at 0.1 showed that this machine's own
# run-to-run drift (4-23 % per-request MAPE between identical runs) remains: docs/validation/README.md.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
D=${1:-$REPO/docs/validation/transformers-cb}
PY=${PYTHON:-$REPO/.venv/bin/python}
QUIET=${QUIET:-1.3}
DEADLINE=${DEADLINE:-$(( $(date +%s) + 3600 ))}
P=${PROFILE:-$REPO/docs/validation/transformers-cb/smollm2-135m-cpu-fp32-1thread.json}
FIT=$D/$(basename "${P%.json}")-cb-overhead.json
mkdir -p "$D"
GATE=(); [ -n "${MAX_OTHER:-}" ] && GATE=(--max-other-cores "$MAX_OTHER")
COMMON=("${GATE[@]}" --force --engine transformers-cb --threads 1 --time-scale 0.5 --max-batch 8 --max-batch-tokens 512 --page-size 32 --num-blocks 512)
wait_quiet() {
  while :; do
    [ "$(date +%s)" -ge "$DEADLINE" ] && { echo "deadline reached"; exit 1; }
    l=$(cut -d' ' -f1 /proc/loadavg)
    awk "BEGIN{exit !($l < $QUIET)}" && return 0
    sleep 20
  done
}
attempt() {  # NAME CMD...
  local name=$1; shift
  while :; do
    wait_quiet
    echo "$(date -u +%T) $name: start (load $(cut -d' ' -f1 /proc/loadavg))"
    "$@" > "/tmp/cb-$name.log" 2>&1 && { echo "$(date -u +%T) $name: ok"; return 0; }
    echo "$(date -u +%T) $name: $(grep -E 'simspec: error' "/tmp/cb-$name.log" | tail -1)"
    sleep 30
  done
}
cd "$REPO"
if [ -n "${GRID:-}" ] && [ ! -f "$P" ]; then
  attempt profile "$PY" -m simspec.cli calibrate latency --model smollm2-135m --dtype fp32 --device cpu --threads 1 \
      --grid "$GRID" --stages embed,layer,lm_head --max-batched-tokens 512 --out "$P" --no-progress
fi
# 1. calibration trace: fit the engine's per-step overhead into a copy of the profile
attempt calib "$PY" -m simspec.cli validate traces/data/validation_calib.csv "${COMMON[@]}" --profile "$P" \
    --out "$D/calib-none-fifo" --fit-overhead "$FIT"
# 2. held-out trace with the fitted profile (the result), 3. and with the raw profile (for contrast)
attempt heldout "$PY" -m simspec.cli validate traces/data/validation_small.csv "${COMMON[@]}" --profile "$FIT" \
    --out "$D/none-fifo"
attempt heldout-raw "$PY" -m simspec.cli validate traces/data/validation_small.csv "${COMMON[@]}" --profile "$P" \
    --out "$D/none-fifo-raw-profile"
