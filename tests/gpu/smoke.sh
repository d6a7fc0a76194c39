#!/usr/bin/env bash
# GPU smoke check, for a machine with NVIDIA GPUs (never run by CI).
#
# Probes the GPUs with `rackserve probe` on a one-node Ray cluster started here (or, where Ray
# is not installed, with the same NVML reader the probe's Ray task runs), compares each GPU's
# total and free memory with `nvidia-smi --query-gpu=memory.total,memory.free --format=csv`,
# and prints a short table. Exits 0 when every GPU matches (total exactly; free within
# SMOKE_FREE_TOLERANCE_MIB, default 512, since free memory moves between the two reads).
# Stops only the Ray processes it started. Finishes in well under 3 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
TOLERANCE=${SMOKE_FREE_TOLERANCE_MIB:-512}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: not a GPU machine" >&2; exit 2; }
nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader,nounits \
  > "$OUT/nvidia-smi.csv"

if "$PY" -c "import ray" 2>/dev/null; then
  echo "== rackserve probe on a one-node Ray cluster"
  RAY_TMP=$(mktemp -d /tmp/rs-gpu-XXXX)
  PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.2',0)); print(s.getsockname()[1])")
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 RAY_USAGE_STATS_ENABLED=0
  setsid "$PY" -m ray.scripts.scripts start --head --block --node-ip-address=127.0.0.2 \
    --port="$PORT" --temp-dir="$RAY_TMP" --include-dashboard=false \
    --labels=rackserve/node=gpu-smoke > "$OUT/ray.log" 2>&1 &
  RAY_PID=$!
  trap 'kill -TERM $RAY_PID 2>/dev/null; sleep 3; pkill -KILL -s $RAY_PID 2>/dev/null; rm -rf "$RAY_TMP"' EXIT
  for _ in $(seq 60); do grep -q "Ray runtime started" "$OUT/ray.log" && break; sleep 1; done
  "$PY" -m deployer probe --address "127.0.0.2:$PORT" --json "$OUT/cluster.json"
else
  echo "== Ray is not installed here: reading NVML with the probe's own reader"
  "$PY" - "$OUT/cluster.json" <<'PY'
import sys
from deployer.cluster import Cluster, dump_cluster
from deployer.nvml_reader import read_node
open(sys.argv[1], "w").write(dump_cluster(Cluster(nodes=[read_node("gpu-smoke")])))
PY
fi

"$PY" - "$OUT/cluster.json" "$OUT/nvidia-smi.csv" "$TOLERANCE" <<'PY'
import csv, sys
from deployer.cluster import parse_cluster
cluster = parse_cluster(open(sys.argv[1]).read())
smi = {int(r[0]): r for r in csv.reader(open(sys.argv[2]), skipinitialspace=True)}
tolerance = int(sys.argv[3])
(node,) = cluster.nodes
print(f"driver {node.driver_version}; {len(node.gpus)} GPU(s) probed, {len(smi)} in nvidia-smi")
print(f"{'GPU':>3}  {'name':<28} {'total probe':>11} {'total smi':>9} {'free probe':>10} {'free smi':>8}  ok")
bad = len(node.gpus) != len(smi)
for gpu in node.gpus:
    _, name, total, free = smi[gpu.index]
    ok = gpu.memory_total_mib == int(total) and abs(gpu.memory_free_mib - int(free)) <= tolerance
    bad |= not ok
    print(f"{gpu.index:>3}  {gpu.name[:28]:<28} {gpu.memory_total_mib:>11} {total:>9} "
          f"{gpu.memory_free_mib:>10} {free:>8}  {'yes' if ok else 'NO'}")
sys.exit(1 if bad else 0)
PY
