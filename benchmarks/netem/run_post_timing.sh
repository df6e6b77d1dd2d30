#!/usr/bin/env bash
# Two ranks of `prism run` in the shaped namespaces (netns.sh), with post_timing.py timing
# every gloo irecv / isend. Run as root from the repository root:
#     sudo env PYTHON="$(command -v python)" benchmarks/netem/run_post_timing.sh [--mbit 200] -- PRISM_RUN_ARGS...
# e.g. -- --family vit --size base --mode prism -m 10 --input local --repeat 5 --warmup 2
set -euo pipefail
cd "$(dirname "$0")/../.."
MBIT=200
if [[ "${1:-}" == "--mbit" ]]; then MBIT=$2; shift 2; fi
[[ "${1:-}" == "--" ]] && shift
PY=${PYTHON:-python3}
. benchmarks/netem/netns.sh
trap netns_down EXIT INT TERM
netns_up
for pair in "$NS0 $DEV0" "$NS1 $DEV1"; do
  read -r ns dev <<< "$pair"
  ip netns exec "$ns" tc qdisc add dev "$dev" root tbf rate "${MBIT}mbit" burst 32000 latency 400ms
done
for r in 0 1; do
  if [[ $r == 0 ]]; then ns=$NS0; dev=$DEV0; else ns=$NS1; dev=$DEV1; fi
  ip netns exec "$ns" env RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=$A0 MASTER_PORT=29713 \
    GLOO_SOCKET_IFNAME="$dev" OMP_NUM_THREADS=1 PYTHONPATH="$PWD" taskset -c $r \
    "$PY" benchmarks/netem/post_timing.py --threads 1 --json "$@" 2>&1 | grep "POST_TIMING\|median_s" &
done
wait
