#!/usr/bin/env bash
# The accelerator check (experiments/accelerator_check.py): Medusa vs vanilla decoding in bf16 with the
# release's 64-node tree (and a calibrated one), batch 1 and 8, and one sharded train step; one table.
# On a GPU machine, install a CUDA jaxlib first: pip install -U "jax[cuda12]==<the pinned jax version>".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" experiments/accelerator_check.py "$@"
