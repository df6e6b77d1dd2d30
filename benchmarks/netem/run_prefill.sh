#!/usr/bin/env bash
# Prefill latency of a long prompt, P = 2 over an emulated link, against one device.
# Run as root from the repository root:
#     sudo env PYTHON="$(command -v python)" benchmarks/netem/run_prefill.sh --model DIR \
#         [--tokens 1024] [--cr 10] [--mbit 200] [--launches 5] [--tag smollm2]
# DIR: a local Hugging Face decoder (e.g. the SmolLM2-135M that `prism eval` fetches into
# ~/.cache/prism-kernels/models/smollm2-135m). Results: benchmarks/results/prefill_<tag>.{json,md}
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ $EUID -ne 0 ]]; then echo "run as root (needs ip netns and tc)" >&2; exit 1; fi
PY=${PYTHON:-python3}
. benchmarks/netem/netns.sh
trap netns_down EXIT INT TERM
netns_up
"$PY" benchmarks/netem/prefill.py --ns0 "$NS0" --ns1 "$NS1" --dev0 "$DEV0" --dev1 "$DEV1" --addr0 "$A0" "$@"
