#!/bin/bash
# Runs the generation benchmark in chunks of at most ~5 minutes (bench_generation.py
# --budget-s), waiting while /tmp/prism_quiet exists (another measurement needs a quiet
# machine) and while /tmp/genbench_pause exists. Resumable: re-running skips the records
# already in the output file. Usage: [PYTHON=...] bash benchmarks/generation/run_all.sh
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results/generation_records.json}
run() {   # run ARGS...: repeat chunks until the job is complete
  while true; do
    while test -e /tmp/prism_quiet || test -e /tmp/genbench_pause; do sleep 20; done
    PYTHONPATH=. ${PYTHON:-python} benchmarks/generation/bench_generation.py --out "$OUT" --budget-s 270 "$@" \
      2>&1 | grep -v "Loading weights\|Warning\|forward_call"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 3 ] || break
  done
  echo "job done (rc $rc): $*"
}
# 1. the main cell, P = 2, CR 10, every mode, 512 then 1024 tokens
run --tokens 512 --partitions 2 --cr 10 --modes stock prism exact voltage --prompts 0 24 --check-generate
run --tokens 1024 --partitions 2 --cr 10 --modes stock prism exact --prompts 0 12 --check-generate
# 2. CR = 1: every mode must reproduce stock greedy decoding
run --tokens 512 --partitions 3 --cr 1 --modes prism exact --prompts 0 4
# 3. the other settings, 512 tokens, as far as time allowed
run --tokens 512 --partitions 3 --cr 10 --modes prism exact --prompts 0 12
run --tokens 512 --partitions 2 3 --cr 4 32 --modes prism --prompts 0 12
run --tokens 512 --partitions 2 3 --cr 4 32 --modes exact --prompts 0 12
# 4. 1024 tokens: P = 3, and CR 4 and 32
run --tokens 1024 --partitions 3 --cr 10 --modes prism exact --prompts 0 12
run --tokens 1024 --partitions 2 3 --cr 4 32 --modes prism --prompts 0 12
run --tokens 1024 --partitions 2 3 --cr 4 32 --modes exact --prompts 0 12
