#!/bin/bash
# count_bias=matched / matched_half against the default, paired on the same items: one
# `prism eval` call per task and P, each into its own folder of OUT (as stored in
# benchmarks/results/accuracy_matched/; two calls at a time, one thread each). As run, when
# every task's default was the log-count bias; the MiniLM tasks' default is matched rows now,
# and their stored default cells are named count_bias=log (migrate_default_keys.py text-matched).
#   bash benchmarks/accuracy/run_matched.sh [OUT]
set -euo pipefail
OUT=${1:-benchmarks/results/accuracy_matched}
PRISM=${PRISM:-prism}
V="--variant default --variant count_bias=matched --variant count_bias=matched_half"
run() {
  local tag=$1; shift
  $PRISM eval "$@" --averaging attention_input --threads 1 --seed 0 $V --no-progress --out "$OUT/$tag"
}
jobs_list=(
  "fashion112_p2 --task dinov2-fashion --partitions 2 --cr 9.9"
  "digits112_p2 --task dinov2-digits --partitions 2 --cr 9.9"
  "fashion112_p3 --task dinov2-fashion --partitions 3 --cr 6.55"
  "digits112_p3 --task dinov2-digits --partitions 3 --cr 6.55"
  "minilm_p2 --task minilm-austen --partitions 2 --cr 8 --n-train 600 --limit 600"
  "minilm_p3 --task minilm-austen --partitions 3 --cr 8 --n-train 600 --limit 600"
  "fashion224_p2 --task dinov2-fashion --image-size 224 --n-train 500 --partitions 2 --cr 9.9"
  "fashion224_p3 --task dinov2-fashion --image-size 224 --n-train 500 --partitions 3 --cr 6.55"
  "smollm2_p2 --task smollm2-austen --partitions 2 --cr 10 --limit 48"
  "minilm_cr16 --task minilm-austen --partitions 2 3 --cr 16 --n-train 600 --limit 600"
  "digits224_p2 --task dinov2-digits --image-size 224 --n-train 500 --partitions 2 --cr 9.9"
  "digits224_p3 --task dinov2-digits --image-size 224 --n-train 500 --partitions 3 --cr 6.55"
  "spam_p2 --task minilm-spam --partitions 2 --cr 8 64"
  "spam_p3 --task minilm-spam --partitions 3 --cr 8"
)
i=0
for j in "${jobs_list[@]}"; do
  # shellcheck disable=SC2086
  run $j &
  i=$((i + 1))
  if (( i % 2 == 0 )); then wait; fi
done
wait
# one weight per token for all heads (matched_shared), added to four of the folders above
for j in "minilm_p2 --task minilm-austen --partitions 2 --cr 8 --n-train 600 --limit 600" \
         "minilm_p3 --task minilm-austen --partitions 3 --cr 8 --n-train 600 --limit 600" \
         "fashion112_p2 --task dinov2-fashion --partitions 2 --cr 9.9" \
         "digits112_p2 --task dinov2-digits --partitions 2 --cr 9.9"; do
  set -- $j
  tag=$1; shift
  $PRISM eval "$@" --averaging attention_input --threads 1 --seed 0 --variant count_bias=matched_shared \
    --no-progress --out "$OUT/$tag" &
  if [[ $tag == minilm_p3 || $tag == digits112_p2 ]]; then wait; fi
done
