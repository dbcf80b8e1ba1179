#!/usr/bin/env bash
# The prepared GPU run (issue 16): on a fresh single-GPU machine (H200) with PyTorch and
# transformers already installed and NO network, in under 8 minutes of wall time:
#
#   1. checks the GPU (nvidia-smi, torch.cuda) and the transformers continuous-batching API;
#   2. calibrates Llama-2-7B and Llama-3-8B (bf16, random weights built from the bundled configs
#      simspec/data/models/llama-2-7b.json, llama-3-8b.json) on the h200-8min grid (batch to 256,
#      tokens per step to 8192, context to the model's window), eager mode, CUDA events;
#   3. runs a batched validation on the GPU: transformers' continuous-batching engine serves a
#      24-request calibration trace on the random-weight Llama-2-7B (its per-step overhead is fitted
#      into a copy of the step-2 profile), then a held-out 48-request trace that simspec simulates
#      with that copy (simspec validate --engine transformers-cb);
#   4. if time is left, calibrates Llama-3-8B again with CUDA graphs (--cuda-graphs), so both engine
#      modes are measured.
#
# Everything goes to one folder: $OUT if set, else runs/gpu-<date>/ (profiles/, validation/,
# logs/, env.txt, timings.txt, SUMMARY.txt). Each step runs under `timeout`; a step that fails or
# runs out of time is logged and the next one still runs. Exit status: 0 if both profiles were
# written, else 1.
#
# Dependencies: torch + transformers from the machine (transformers brings numpy, pyyaml, tqdm).
# pandas, click and simpy are used from the machine if importable, else installed offline from
# wheels in .whl/ at the checkout root (git-ignored; made by benchmarks/gpu/fetch_wheels.sh, see
# benchmarks/gpu/README.md). pyarrow, scipy and matplotlib are optional. simspec
# itself is NOT pip-installed: the script builds a symlink shim of the package in the output
# folder and runs `python -m simspec.cli` with PYTHONPATH pointing there.
#
# Usage:
#   benchmarks/gpu/calibrate_and_validate.sh              # the real run (needs CUDA)
#   benchmarks/gpu/calibrate_and_validate.sh --dry-run    # CPU, tiny random config, tiny grid (~1-2 min)
# Options:
#   --budget-s N     total wall-time budget in seconds [450; 8 min = 480 with margin]
#   --python PATH    the Python that has torch + transformers [python3]
#   --skip-graphs    never run the CUDA-graphs calibration
set -uo pipefail

DRY_RUN=0
BUDGET_S=450
PY=${PYTHON:-python3}
SKIP_GRAPHS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --budget-s) BUDGET_S="$2"; shift ;;
    --python) PY="$2"; shift ;;
    --skip-graphs) SKIP_GRAPHS=1 ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "calibrate_and_validate.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

REPO=$(cd "$(dirname "$0")/../.." && pwd)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-$REPO/runs/gpu-$STAMP}
mkdir -p "$OUT/profiles" "$OUT/validation" "$OUT/logs"
T0=$(date +%s)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
log() { echo "[$(printf '%4s' "$(elapsed)")s] $*" | tee -a "$OUT/timings.txt"; }

# step NAME LIMIT_S CMD...: run CMD under timeout (capped to the budget left), log status and time.
step() {
  local name=$1 limit=$2; shift 2
  local rest; rest=$(left)
  if [ "$rest" -lt 20 ]; then log "SKIP $name (only ${rest}s of budget left)"; echo "$name: skipped (budget)" >> "$OUT/SUMMARY.txt"; return 3; fi
  [ "$limit" -gt "$rest" ] && limit=$rest
  local t=$(date +%s)
  log "START $name (limit ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t ))
  if [ $rc -eq 0 ]; then log "OK    $name (${took}s)"; echo "$name: ok (${took}s)" >> "$OUT/SUMMARY.txt"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then log "TIMEOUT $name after ${took}s"; echo "$name: TIMEOUT (${took}s)" >> "$OUT/SUMMARY.txt"
  else log "FAIL  $name rc=$rc (${took}s): $(tail -n 1 "$OUT/logs/$name.log")"; echo "$name: FAILED rc=$rc (${took}s)" >> "$OUT/SUMMARY.txt"; fi
  return $rc
}

: > "$OUT/SUMMARY.txt"
log "simspec prepared GPU run; out=$OUT dry_run=$DRY_RUN budget=${BUDGET_S}s"

# ---------------------------------------------------------------- 0. dependencies, simspec shim
if ! "$PY" -c "import numpy, pandas, click, simpy, yaml, tqdm" 2>/dev/null; then
  if [ -d "$REPO/.whl" ]; then
    log "installing missing pure-python dependencies offline from $REPO/.whl"
    "$PY" -m pip install --no-index --find-links "$REPO/.whl" pandas click simpy \
      > "$OUT/logs/pip.log" 2>&1 || { log "pip install from .whl failed (see logs/pip.log)"; }
  fi
  "$PY" -c "import numpy, pandas, click, simpy, yaml, tqdm" 2>"$OUT/logs/deps.log" || {
    log "FATAL: missing dependencies (see logs/deps.log); put wheels in .whl/ (benchmarks/gpu/README.md)"; exit 1; }
fi
# simspec's import names map to several top-level folders (pyproject package-dir): build the
# package as a symlink tree so no pip install (and no network) is needed.
SHIM="$OUT/.pkg"
rm -rf "$SHIM"; mkdir -p "$SHIM/simspec"
for f in "$REPO"/simspec/*; do ln -s "$f" "$SHIM/simspec/$(basename "$f")"; done
for sub in simulator policies calibrate traces; do ln -s "$REPO/$sub" "$SHIM/simspec/$sub"; done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
SIMSPEC=("$PY" -m simspec.cli)

# ---------------------------------------------------------------- 1. environment and GPU checks
{
  echo "date_utc: $(date -u +%FT%TZ)"; echo "host: $(hostname)"; echo "repo_commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "git_dirty: $(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) file(s)"
  echo "nproc: $(nproc)"; echo "loadavg: $(cat /proc/loadavg 2>/dev/null)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,utilization.gpu,driver_version,clocks.max.sm --format=csv 2>&1
  command -v nvidia-smi >/dev/null && nvidia-smi -q -d CLOCK,POWER 2>/dev/null | grep -E "Graphics|SM|Power Draw|Power Limit" | head -8
} > "$OUT/env.txt" 2>&1
step check 90 "$PY" - "$DRY_RUN" <<'PYEOF'
import json, sys, platform
dry = sys.argv[1] == "1"
import torch, transformers
info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                total_memory_gib=round(p.total_memory / 2**30, 1), free_memory_gib=round(torch.cuda.mem_get_info()[0] / 2**30, 1),
                l2_cache_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1), sms=p.multi_processor_count)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3): a @ a
    s.record(); [a @ a for _ in range(20)]; e.record(); torch.cuda.synchronize()
    info["bf16_matmul_tflops"] = round(20 * 2 * 4096**3 / (s.elapsed_time(e) / 1e3) / 1e12, 1)
elif not dry:
    print(json.dumps(info)); sys.exit("no CUDA device: run with --dry-run on a CPU machine")
from transformers.generation.continuous_batching import ContinuousBatchingManager  # noqa: F401
import transformers.generation.configuration_utils as cu
info["continuous_batching_config_class"] = hasattr(cu, "ContinuousBatchingConfig")
import simspec
info["simspec_from"] = simspec.__file__
from simspec.calibrate.models import config_from_json
for name in ("llama-2-7b", "llama-3-8b"):
    cfg, _ = config_from_json(name)
    info[f"{name}_config"] = f"{type(cfg).__name__} L={cfg.num_hidden_layers} h={cfg.hidden_size} kvh={cfg.num_key_value_heads} window={cfg.max_position_embeddings}"
print(json.dumps(info, indent=1))
PYEOF
cat "$OUT/logs/check.log" >> "$OUT/env.txt"
if ! grep -q '"transformers"' "$OUT/logs/check.log"; then log "FATAL: environment check failed (logs/check.log)"; exit 1; fi

# ---------------------------------------------------------------- settings: real run vs dry run
if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu; DTYPE=fp32; GRID=dry-run; MBT=256; CAL_WALL=25; CAL_LIMIT=90
  cat > "$OUT/tiny-config.json" <<'EOF'
{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
 "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 512,
 "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": false,
 "_name_or_path": "tiny-random-llama (dry run)"}
EOF
  MODELS=("tiny-a:$OUT/tiny-config.json" "tiny-b:$OUT/tiny-config.json")
  VAL_MODEL="$OUT/tiny-config.json"; VAL_PROFILE="$OUT/profiles/tiny-a-cpu-fp32.json"
  N_CAL=6; N_REQ=8; RATE=8; PMIN=16; PMAX=64; OMIN=4; OMAX=12
  ENGINE_ARGS=(--threads 1 --max-batch 4 --max-batch-tokens 128 --page-size 16 --num-blocks 256 --allow-overload)
  THREADS=(--threads 1)
else
  DEVICE=cuda; DTYPE=bf16; GRID=h200-8min; MBT=8192; CAL_WALL=75; CAL_LIMIT=150
  MODELS=("llama2-7b:llama-2-7b" "llama3-8b:llama-3-8b")
  VAL_MODEL=llama-2-7b; VAL_PROFILE="$OUT/profiles/llama2-7b-h200-bf16.json"
  N_CAL=24; N_REQ=48; RATE=6; PMIN=64; PMAX=1024; OMIN=32; OMAX=192
  # 1024 pages x 64 tokens = 65k KV tokens (32 GiB for Llama-2-7B in bf16): the traces need < 35k at once.
  ENGINE_ARGS=(--max-batch 32 --max-batch-tokens 2048 --page-size 64 --num-blocks 1024)
  THREADS=()
fi
SUFFIX=$([ "$DRY_RUN" = 1 ] && echo "cpu-fp32" || echo "h200-bf16")

# ---------------------------------------------------------------- 2. latency calibration (eager)
N_OK=0
for m in "${MODELS[@]}"; do
  name=${m%%:*}; cfg=${m#*:}
  prof="$OUT/profiles/$name-$SUFFIX.json"
  step "calibrate-$name" "$CAL_LIMIT" "${SIMSPEC[@]}" calibrate latency --config "$cfg" --random-weights \
      --device "$DEVICE" --dtype "$DTYPE" --grid "$GRID" --max-batched-tokens "$MBT" --max-wall-s "$CAL_WALL" \
      "${THREADS[@]}" --name "$name-$SUFFIX" --out "$prof" --no-progress \
      --description "Random-weight $name ($cfg), $DTYPE, eager, measured by benchmarks/gpu/calibrate_and_validate.sh" \
    && N_OK=$((N_OK + 1))
done

# ---------------------------------------------------------------- 3. batched validation on the engine
# Two traces from the same distribution, different seeds: the first (calibration) fits the engine's
# per-step overhead into a copy of the profile (--fit-overhead); the second (held out) is validated
# with that copy. Both reports are kept.
gen_trace() {  # PATH N SEED
  "$PY" - "$1" "$2" "$3" "$RATE" "$PMIN" "$PMAX" "$OMIN" "$OMAX" <<'PYEOF'
import sys
import numpy as np
path, n, seed, rate, pmin, pmax, omin, omax = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), *map(int, sys.argv[5:9])
rng = np.random.default_rng(seed)
arr = np.cumsum(rng.exponential(1 / rate, n)); arr -= arr[0]
with open(path, "w") as f:
    f.write("request_id,arrival_s,prompt_tokens,output_tokens\n")
    for i in range(n):
        f.write(f"s{seed}-{i:03d},{arr[i]:.4f},{rng.integers(pmin, pmax + 1)},{rng.integers(omin, omax + 1)}\n")
PYEOF
}
gen_trace "$OUT/validation/trace-calib.csv" "$N_CAL" 17
gen_trace "$OUT/validation/trace.csv" "$N_REQ" 16
FITTED="${VAL_PROFILE%.json}-cb-overhead.json"
if [ -f "$VAL_PROFILE" ]; then
  step validate-engine-calib 120 "${SIMSPEC[@]}" validate "$OUT/validation/trace-calib.csv" --engine transformers-cb \
      --config "$VAL_MODEL" --profile "$VAL_PROFILE" --device "$DEVICE" --dtype "$DTYPE" "${ENGINE_ARGS[@]}" \
      --fit-overhead "$FITTED" --out "$OUT/validation/transformers-cb-calib" --force
  [ -f "$FITTED" ] || FITTED="$VAL_PROFILE"
  step validate-engine 120 "${SIMSPEC[@]}" validate "$OUT/validation/trace.csv" --engine transformers-cb \
      --config "$VAL_MODEL" --profile "$FITTED" --device "$DEVICE" --dtype "$DTYPE" "${ENGINE_ARGS[@]}" \
      --out "$OUT/validation/transformers-cb-none-fifo" --force
else
  log "SKIP validate-engine: no profile $VAL_PROFILE"; echo "validate-engine: skipped (no profile)" >> "$OUT/SUMMARY.txt"
fi

# ---------------------------------------------------------------- 4. CUDA graphs (if time is left)
if [ "$DRY_RUN" = 0 ] && [ "$SKIP_GRAPHS" = 0 ]; then
  if [ "$(left)" -ge 80 ]; then
    step calibrate-llama3-8b-graphs 120 "${SIMSPEC[@]}" calibrate latency --config llama-3-8b --random-weights \
        --device cuda --dtype bf16 --grid h200-8min --max-batched-tokens 8192 --max-wall-s 45 --cuda-graphs \
        --stages layer,lm_head --name llama3-8b-h200-bf16-cudagraphs --out "$OUT/profiles/llama3-8b-h200-bf16-cudagraphs.json" \
        --no-progress --description "Random-weight llama-3-8b, bf16, CUDA-graph replays, measured by benchmarks/gpu/calibrate_and_validate.sh"
  else
    log "SKIP calibrate-llama3-8b-graphs (only $(left)s left)"; echo "calibrate-llama3-8b-graphs: skipped (budget)" >> "$OUT/SUMMARY.txt"
  fi
fi

# ---------------------------------------------------------------- summary
"$PY" - "$OUT" <<'PYEOF' >> "$OUT/SUMMARY.txt" 2>&1
import glob, json, os, sys
out = sys.argv[1]
for p in sorted(glob.glob(os.path.join(out, "profiles", "*.json"))):
    d = json.load(open(p)); lc = d["meta"].get("latency_calibration", {})
    print(f"\nprofile {os.path.basename(p)}: {d['meta'].get('device')} {d['meta'].get('dtype')} mode={lc.get('mode')} "
          f"wall={lc.get('wall_time_s')}s measured={lc.get('points_measured')} skipped={lc.get('skipped', {}).get('n')} "
          f"graph_failures={lc.get('cuda_graphs_failed')}")
    for s, sd in d["latency"]["stages"].items():
        f = sd.get("fit", {})
        print(f"  {s:<8} {sd['kind']:<6} held-out MAPE {f.get('heldout_mape_pct')}% (max {f.get('heldout_max_ape_pct')}%), "
              f"n_train {f.get('n_train')}, filled {len(f.get('filled_nodes', []))}")
    cc = d["meta"].get("composition_check")
    if cc: print(f"  composition check (whole forward vs composed): MAPE {cc['mape_pct']}%, max {cc['max_ape_pct']}%")
for p in sorted(glob.glob(os.path.join(out, "validation", "*", "summary.json"))):
    d = json.load(open(p)); lat = d.get("latency", {})
    print(f"\nvalidation {os.path.basename(os.path.dirname(p))}: latency MAPE {d.get('latency_mape_pct'):.1f}%, "
          f"mean {lat.get('mean', {}).get('err_pct'):+.1f}%, p99 {lat.get('p99', {}).get('err_pct'):+.1f}%, "
          f"TTFT MAPE {d.get('ttft_mape_pct'):.1f}%, target met: {d.get('target', {}).get('met')}")
PYEOF
rm -rf "$SHIM"
log "done in $(elapsed)s; $N_OK/2 profiles; summary: $OUT/SUMMARY.txt"
cat "$OUT/SUMMARY.txt"
[ "$N_OK" -eq 2 ] && exit 0 || exit 1
