#!/usr/bin/env bash
# Unequal devices: one rank's CPU limited to a fraction of a core (cgroup v1 cpu controller),
# equal partitions vs --speeds vs --calibrate, Prism and Voltage, against one fast device.
# Run as root from the repository root:
#     sudo benchmarks/netem/run_unequal.sh [--quota 0.5] [--mbit 200] [--models vit-b16,bert-base] [--repeat 6] [--tag unequal]
#     sudo benchmarks/netem/run_unequal.sh --smoke      # tiny model, prism equal vs calibrate (plumbing only)
# The Python used is $PYTHON, else python3 (sudo resets PATH: sudo env PYTHON="$(command -v python)" ...).
# The two ranks run in two network namespaces joined by a veth pair shaped to --mbit (tc tbf,
# both directions; netns.sh), as in run_latency.sh; --mbit 0 runs them on loopback instead.
# Creates the cgroup /sys/fs/cgroup/cpu/pk_unequal with cpu.cfs_period_us = 10000 and
# cpu.cfs_quota_us = quota x 10000 (a 10 ms period, so that even a few-ms calibration window
# spans several periods and sees the limit, not a burst at full speed), and removes it on exit.
# Results: benchmarks/results/unequal_<tag>.{json,md}
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ $EUID -ne 0 ]]; then echo "run as root (writes a cgroup)" >&2; exit 1; fi
CPU_CG=/sys/fs/cgroup/cpu
if [[ ! -f "$CPU_CG/cpu.cfs_quota_us" ]]; then
  echo "no cgroup v1 cpu controller at $CPU_CG (cpu.cfs_quota_us missing)" >&2; exit 1; fi
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif command -v python3 >/dev/null 2>&1; then PY=python3
else echo "no python3 on PATH; set PYTHON=/path/to/python" >&2; exit 1; fi
command -v taskset >/dev/null || { echo "taskset (util-linux) is needed" >&2; exit 1; }
QUOTA=0.5
MBIT=200
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quota) QUOTA="$2"; shift 2 ;;
    --mbit) MBIT="$2"; shift 2 ;;
    # smoke: the plumbing only (cgroup, both partition kinds, the results file); the C++
    # kernels are skipped so that no process waits for their first load
    --smoke) ARGS+=(--models tiny --modes prism --partitions equal,calibrate --repeat 2 --warmup 1 --tag smoke)
             export PRISM_SKIP_CPP=1; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
PERIOD=10000
QUOTA_US=$("$PY" -c "import sys; q = float(sys.argv[1]); assert 0 < q <= 1, 'quota must be in (0, 1]'; print(max(1000, round(q * $PERIOD)))" "$QUOTA")
CG="$CPU_CG/pk_unequal"
. benchmarks/netem/netns.sh
cleanup() {
  netns_down
  if [[ -d "$CG" ]]; then
    # move anything left back to the root group, then remove ours
    while read -r pid; do echo "$pid" > "$CPU_CG/cgroup.procs" 2>/dev/null || true; done < "$CG/cgroup.procs"
    rmdir "$CG" 2>/dev/null || true
  fi
}
trap cleanup EXIT INT TERM
cleanup
mkdir "$CG"
echo "$PERIOD" > "$CG/cpu.cfs_period_us"
echo "$QUOTA_US" > "$CG/cpu.cfs_quota_us"
echo "rank 1 limited to $QUOTA_US us every $PERIOD us ($CG)"
NET=()
if [[ "$MBIT" != "0" ]]; then
  netns_up
  NET=(--ns0 "$NS0" --ns1 "$NS1" --dev0 "$DEV0" --dev1 "$DEV1" --addr0 "$A0" --mbit "$MBIT")
fi
"$PY" benchmarks/netem/unequal.py --cgroup "$CG" --quota "$QUOTA" "${NET[@]}" "${ARGS[@]}"
