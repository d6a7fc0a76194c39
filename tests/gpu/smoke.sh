#!/usr/bin/env bash
# GPU smoke checks, for a machine with an NVIDIA GPU and vLLM's CUDA build (never run by CI).
#
#   tests/gpu/smoke.sh              # on the GPU machine: under 8 minutes
#   tests/gpu/smoke.sh --rehearse   # anywhere (or SMOKE_REHEARSE=1): all but the CUDA parts
#
# Starts a one-node Ray head (node gpu-smoke, on 127.0.0.2; with --rehearse it declares one
# logical GPU, `--num-gpus 1`), then tests/gpu/smoke.py runs the checks and prints one line per
# check, `PASS|FAIL|SKIP <check>: <figures>`:
#   probe-vs-nvidia-smi         `rackserve probe` against `nvidia-smi` per GPU (total exactly,
#                               free within SMOKE_FREE_TOLERANCE_MIB, default 512)
#   plan-co-locates             two real-shape models with random weights (Qwen2.5-0.5B's and
#                               Llama-3.2-1B's, built locally once into SMOKE_CACHE) estimated and
#                               planned onto one GPU of the probed cluster
#   deploy-as-planned           `rackserve deploy`: both engines healthy where the plan says
#   standin-matches-plan        (--rehearse) each stand-in's Ray GPU ids, node, environment and
#                               gpu_memory_utilization against the plan
#   co-located-answer           one completion from each model through the one endpoint
#   estimate-vs-vllm            estimated weights and KV cache against vLLM's logged figures
#   memory-measured-vs-planned  each engine's processes in `nvidia-smi` against its planned budget
#   run-time                    the whole run within 8 minutes
# With --rehearse the deploy runs the stand-in engine on a cluster file declaring an H200, and
# what needs CUDA prints `SKIP <check>: needs a GPU (...)`. Where Ray is not installed, only the
# first check runs, through the probe's own NVML reader. Exit 0 when no check failed.
# Files go to $OUT (default: a new temporary folder). Stops only the Ray processes it started
# (its `ray start` and that process's session), never `ray stop`. No model hub is used.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
REHEARSE=${SMOKE_REHEARSE:-0}
for arg in "$@"; do
  case "$arg" in
    --rehearse) REHEARSE=1 ;;
    *) echo "usage: $0 [--rehearse]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
CACHE=${SMOKE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rackserve/gpu-smoke}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
# Token authentication off, as in tools/local_ray.py: Ray 2.60 switches it on for `ray start`
# when ~/.ray/auth_token exists, while drivers given an address do not send the token.
export RAY_AUTH_MODE=disabled
unset RAY_ADDRESS
ARGS=(--out "$OUT" --cache "$CACHE")
RAY_ARGS=()
if [[ $REHEARSE == 1 ]]; then
  ARGS+=(--rehearse)
  RAY_ARGS+=(--num-gpus=1)
else
  command -v nvidia-smi >/dev/null || {
    echo "nvidia-smi not found: not a GPU machine (rehearse with $0 --rehearse)" >&2; exit 2; }
fi

if ! "$PY" -c "import ray" 2>/dev/null; then
  [[ $REHEARSE == 1 ]] && { echo "the rehearsal needs Ray (pip install -e '.[serve]')" >&2; exit 2; }
  echo "== Ray is not installed here: reading NVML with the probe's own reader"
  exec "$PY" -m tests.gpu.smoke --no-ray "${ARGS[@]}"
fi

free_port() {
  "$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.2',0)); print(s.getsockname()[1])"
}
# At least 8 logical CPUs: the Serve proxy, the ingress and both engine replicas each hold one,
# which a small machine (the rehearsal's) would not have.
CPUS=$(nproc); (( CPUS < 8 )) && CPUS=8
RAY_TMP=$(mktemp -d /tmp/rs-gpu-XXXX)
PORT=$(free_port); DASHBOARD=$(free_port); HTTP=$(free_port); CLIENT=$(free_port); AGENT=$(free_port)
echo "== Ray head on 127.0.0.2:$PORT (node gpu-smoke${RAY_ARGS[*]:+, ${RAY_ARGS[*]}}); files in $OUT"
setsid "$PY" -m ray.scripts.scripts start --head --block --node-ip-address=127.0.0.2 \
  --port="$PORT" --ray-client-server-port="$CLIENT" --dashboard-agent-listen-port="$AGENT" \
  --temp-dir="$RAY_TMP" --include-dashboard=true --dashboard-host=127.0.0.2 \
  --dashboard-port="$DASHBOARD" --labels=rackserve/node=gpu-smoke --num-cpus="$CPUS" \
  --object-store-memory=$((512 * 1024 * 1024)) "${RAY_ARGS[@]}" > "$OUT/ray.log" 2>&1 &
RAY_PID=$!
stop_ray() {
  kill -TERM "$RAY_PID" 2>/dev/null || true
  for _ in $(seq 30); do pgrep -s "$RAY_PID" >/dev/null || break; sleep 0.5; done
  pkill -KILL -s "$RAY_PID" 2>/dev/null || true
  rm -rf "$RAY_TMP"
}
trap stop_ray EXIT
trap 'exit 130' INT TERM
for _ in $(seq 120); do
  grep -q "Ray runtime started" "$OUT/ray.log" && break
  kill -0 "$RAY_PID" 2>/dev/null || { cat "$OUT/ray.log" >&2; exit 1; }
  sleep 0.5
done
grep -q "Ray runtime started" "$OUT/ray.log" || { cat "$OUT/ray.log" >&2; exit 1; }

status=0
"$PY" -m tests.gpu.smoke "${ARGS[@]}" --address "127.0.0.2:$PORT" \
  --dashboard "http://127.0.0.2:$DASHBOARD" --ray-logs "$RAY_TMP/session_latest/logs" \
  --http-port "$HTTP" || status=$?
exit "$status"
