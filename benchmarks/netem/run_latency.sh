#!/usr/bin/env bash
# Paper Fig. 5: latency of single / voltage / prism (P = 2) over an emulated edge link.
# Run as root from the repository root:
#     sudo benchmarks/netem/run_latency.sh [--bandwidths 50,100,200,500,1000] [--delay-ms 0]
#                                          [--models vit-b16,bert-base] [--repeat 6] [--tag fig5]
# The Python used is $PYTHON, else python3 (or python) on PATH. sudo resets PATH and the
# environment, so to use the interpreter of an activated virtual environment:
#     sudo env PYTHON="$(command -v python)" benchmarks/netem/run_latency.sh ...
# Creates two network namespaces (pk_ns0, pk_ns1) joined by a veth pair (10.213.0.1 <-> 10.213.0.2),
# shapes both ends with tc (tbf, optional netem delay), runs one rank in each, and removes
# everything on exit. No traffic leaves these namespaces. Results: benchmarks/results/latency_<tag>.{csv,json,md,png}
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ $EUID -ne 0 ]]; then echo "run as root (needs ip netns and tc)" >&2; exit 1; fi
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif command -v python3 >/dev/null 2>&1; then PY=python3
elif command -v python >/dev/null 2>&1; then PY=python
else echo "no python3 or python on PATH; set PYTHON=/path/to/python" >&2; exit 1; fi
"$PY" -c "import prism_kernels" 2>/dev/null || {
  echo "$PY cannot import prism_kernels; set PYTHON to the interpreter it is installed in" >&2; exit 1; }
. benchmarks/netem/netns.sh
trap netns_down EXIT INT TERM
netns_up
ip netns exec "$NS0" ping -c 1 -W 2 "$A1" >/dev/null 2>&1 || echo "warning: ping $A1 failed (no ping binary?)" >&2
TAG=fig5
ARGS=("$@")
for ((i = 0; i < ${#ARGS[@]}; i++)); do [[ "${ARGS[$i]}" == "--tag" ]] && TAG="${ARGS[$((i + 1))]}"; done
# how much two concurrent ranks can gain on this CPU at all (recorded with the results)
nice -n 5 "$PY" benchmarks/netem/cpu_scaling.py --reps 3 --out "benchmarks/results/latency_${TAG}_cpu.json" || true
"$PY" benchmarks/netem/bench.py --ns0 "$NS0" --ns1 "$NS1" --dev0 "$DEV0" --dev1 "$DEV1" --addr0 "$A0" "$@"
"$PY" benchmarks/netem/plot.py --tag "$TAG"
