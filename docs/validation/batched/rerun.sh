#!/usr/bin/env bash
# Reproduce the batched speculative validation reports (issue 16 item 4) on this CPU: SmolLM2-135M
# fp32, 1 torch thread, batch 4, bundled traces at their own rate. Every run is gated (refused, exit 2,
# nothing written, when the machine was contended); this script waits for a quiet moment (1-minute
# load below QUIET) and retries until DEADLINE (epoch seconds, default +1 h).
#   docs/validation/batched/rerun.sh [OUT_DIR] [RUN ...]      (RUN: names below; default all)
# PROFILE: the latency + acceptance profile [smollm2-135m-cpu-fp32-1thread-b8-spec.json here; build it
# with make_profile.py]. The per-step overhead is fitted per method on validation_calib (FCFS) and the
# fitted profile validated on the held-out validation_small under FCFS and LAPS-SD.
# MAX_OTHER: if set, passed as --max-other-cores (e.g. 0.1: refuse runs where other processes kept
# more than 0.1 cores busy on average). The 4 December reruns at 0.1 showed that this machine's own
# run-to-run drift (4-23 % per-request MAPE between identical runs) remains: docs/validation/README.md.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
D=${1:-$REPO/docs/validation/batched}
shift || true
PY=${PYTHON:-$REPO/.venv/bin/python}
QUIET=${QUIET:-1.0}
DEADLINE=${DEADLINE:-$(( $(date +%s) + 3600 ))}
P=${PROFILE:-$REPO/docs/validation/batched/smollm2-135m-cpu-fp32-1thread-b8-spec.json}
AD=$REPO/simspec/data/adapters/smollm2-135m
DRAFT=(--method draft:k=4,draft_layers=5)
KANG=(--method kangaroo:exit=2,gamma=6,eta=0.6 --adapter "$AD")
HISP=(--method hispec:draft_exit=4,inter_exit=8,nd=2,ni=4 --adapter "$AD")
GATE=(); [ -n "${MAX_OTHER:-}" ] && GATE=(--max-other-cores "$MAX_OTHER")
# SPEEDREF=1: time the speed probes around each run (--speed-reference; batched-speedref/ was made so)
[ -n "${SPEEDREF:-}" ] && GATE+=(--speed-reference)
COMMON=("${GATE[@]}" --force --threads 1 --max-batch 4 --no-progress)
FCFS=(--policy fcfs --batching vllm)
LAPS=(--policy laps-sd --batching preemptive)
CAL=traces/data/validation_calib.csv
VAL=traces/data/validation_small.csv
export HF_HUB_OFFLINE=1
wait_quiet() {
  while :; do
    [ "$(date +%s)" -ge "$DEADLINE" ] && { echo "deadline reached"; exit 1; }
    l=$(cut -d' ' -f1 /proc/loadavg)
    awk "BEGIN{exit !($l < $QUIET)}" && return 0
    sleep 15
  done
}
attempt() {  # NAME CMD...
  local name=$1; shift
  while :; do
    wait_quiet
    echo "$(date -u +%T) $name: start (load $(cut -d' ' -f1 /proc/loadavg))"
    "$@" > "/tmp/batched-$name.log" 2>&1 && { echo "$(date -u +%T) $name: ok"; return 0; }
    echo "$(date -u +%T) $name: $(grep -E 'simspec: error' "/tmp/batched-$name.log" | tail -1)"
    grep -q "machine too busy" "/tmp/batched-$name.log" || return 1
    sleep 30
  done
}
run() {  # NAME: one report
  local V=("$PY" -m simspec.cli validate)
  case $1 in
    calib-draft-fcfs) attempt "$1" "${V[@]}" $CAL "${DRAFT[@]}" "${FCFS[@]}" "${COMMON[@]}" --profile "$P" \
                        --out "$D/$1" --fit-overhead "$D/fit-draft.json" ;;
    calib-kangaroo-fcfs) attempt "$1" "${V[@]}" $CAL "${KANG[@]}" "${FCFS[@]}" "${COMMON[@]}" --profile "$P" \
                        --out "$D/$1" --fit-overhead "$D/fit-kangaroo.json" ;;
    draft-fcfs) attempt "$1" "${V[@]}" $VAL "${DRAFT[@]}" "${FCFS[@]}" "${COMMON[@]}" --profile "$D/fit-draft.json" --out "$D/$1" ;;
    draft-laps-sd) attempt "$1" "${V[@]}" $VAL "${DRAFT[@]}" "${LAPS[@]}" "${COMMON[@]}" --profile "$D/fit-draft.json" --out "$D/$1" ;;
    kangaroo-fcfs) attempt "$1" "${V[@]}" $VAL "${KANG[@]}" "${FCFS[@]}" "${COMMON[@]}" --profile "$D/fit-kangaroo.json" --out "$D/$1" ;;
    kangaroo-laps-sd) attempt "$1" "${V[@]}" $VAL "${KANG[@]}" "${LAPS[@]}" "${COMMON[@]}" --profile "$D/fit-kangaroo.json" --out "$D/$1" ;;
    forced-draft-laps-sd) attempt "$1" "${V[@]}" $VAL "${DRAFT[@]}" "${LAPS[@]}" "${COMMON[@]}" --forced-acceptance \
                        --profile "$D/fit-draft.json" --out "$D/$1" ;;
    calib-hispec-fcfs) attempt "$1" "${V[@]}" $CAL "${HISP[@]}" "${FCFS[@]}" "${COMMON[@]}" --profile "$P" \
                        --out "$D/$1" --fit-overhead "$D/fit-hispec.json" ;;
    hispec-fcfs) attempt "$1" "${V[@]}" $VAL "${HISP[@]}" "${FCFS[@]}" "${COMMON[@]}" --profile "$D/fit-hispec.json" --out "$D/$1" ;;
    forced-hispec-fcfs) attempt "$1" "${V[@]}" $VAL "${HISP[@]}" "${FCFS[@]}" "${COMMON[@]}" --forced-acceptance \
                        --profile "$D/fit-hispec.json" --out "$D/$1" ;;
    forced-kangaroo-fcfs) attempt "$1" "${V[@]}" $VAL "${KANG[@]}" "${FCFS[@]}" "${COMMON[@]}" --forced-acceptance \
                        --profile "$D/fit-kangaroo.json" --out "$D/$1" ;;
    *) echo "unknown run $1"; return 1 ;;
  esac
}
cd "$REPO"
RUNS=("$@")
[ ${#RUNS[@]} -eq 0 ] && RUNS=(calib-draft-fcfs calib-kangaroo-fcfs draft-fcfs kangaroo-fcfs forced-draft-laps-sd
                              forced-kangaroo-fcfs draft-laps-sd kangaroo-laps-sd calib-hispec-fcfs
                              forced-hispec-fcfs hispec-fcfs)
for r in "${RUNS[@]}"; do run "$r" || echo "$r: failed (see /tmp/batched-$r.log)"; done
