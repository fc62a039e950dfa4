#!/usr/bin/env bash
# `make demo`: the whole Medusa-1 pipeline on the embedded default (SmolLM2-135M-Instruct + ShareGPT):
# data -> train heads -> calibrate a tree -> benchmark on MT-Bench and on held-out ShareGPT.
# The default recipe (docs/data_curve/table.md chose it) trains heads that read a prefix-attention
# layer on 0.5M tokens of ShareGPT's own replies with the backbone's soft labels: no generation.
# CONFIG=configs/smollm2_medusa1.py WORK=runs/smollm2_medusa1 runs the self-distilled recipe instead
# (its first stage generates the replies; 68 min end to end on an Intel Xeon, docs/results.md).
# Each step resumes or reuses its output when run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CONFIG=${CONFIG:-configs/smollm2_medusa1.py:soft,prefix}
WORK=${WORK:-runs/smollm2_medusa1_soft}
mkdir -p "$WORK"
SECONDS=0
elapsed() { printf '   (%dm%02ds since the start)\n' $((SECONDS / 60)) $((SECONDS % 60)); }

# The time left is estimated from this machine's distillation rate against a reference run of this
# script (experiments/demo_reference.txt: its distillation rate and how long the stages after it took).
estimate() {
  local rate
  grep -q "nothing to distil" "$WORK/distill.log" && return 0
  rate=$(grep -o '[0-9.]* tok/s; dataset' "$WORK/distill.log" | tail -1 | cut -d' ' -f1 || true)
  if [ -z "$rate" ]; then
    echo "   (distillation reused its replies: no rate to estimate the time left from)"
    return
  fi
  [ -f experiments/demo_reference.txt ] || return 0
  # shellcheck disable=SC1091
  . experiments/demo_reference.txt
  awk -v r="$rate" -v r0="$REF_DISTILL_TOK_S" -v t0="$REF_REST_S" -v cpu="$REF_CPU" 'BEGIN {
    printf "   estimated time left: ~%d min (distillation here %.0f tok/s; the reference run on %s: %.0f tok/s, the rest %d min)\n",
      t0 * r0 / r / 60 + 0.5, r, cpu, r0, t0 / 60 + 0.5 }'
}

echo "== 1/5 self-distillation (self-distilled recipes only): SmolLM2 answers ShareGPT prompts (train split only)"
$PY -m medusa_jax.distill --config "$CONFIG" 2>&1 | tee "$WORK/distill.log"
elapsed
estimate

echo "== 2/5 Medusa-1 training (frozen backbone; its hidden states of the training tokens computed first) -> $WORK"
$PY -m medusa_jax.train --config "$CONFIG" --workdir "$WORK"

elapsed
echo "== 3/5 tree calibration on held-out ShareGPT prompts, sized by this machine's step costs"
# CPU trees are small: measure the step cost at every size up to 16 nodes instead of powers of two up to 64.
$PY -m medusa_jax.calibrate --config "$CONFIG" --checkpoint "$WORK/export" --nodes 0 --max_nodes 16 \
    --sizes 1,2,3,4,5,6,8,10,12,16 --out "$WORK/tree.json"

elapsed
echo "== 4/5 benchmark: 10 MT-Bench questions x 128 tokens, vanilla vs Medusa, greedy"
$PY -m medusa_jax.benchmark --config "$CONFIG" --checkpoint "$WORK/export" --tree "$WORK/tree.json" \
    --modes vanilla,medusa --prompts mt_bench --num_prompts 10 --max_new_tokens 128 --out "$WORK/results_mt_bench.json"

elapsed
echo "== 5/5 the same on 10 held-out ShareGPT prompts that neither training nor calibration read"
$PY -m medusa_jax.benchmark --config "$CONFIG" --checkpoint "$WORK/export" --tree "$WORK/tree.json" \
    --modes vanilla,medusa --prompts sharegpt_heldout --num_prompts 10 --max_new_tokens 128 \
    --out "$WORK/results_heldout.json"
elapsed
echo "== done in $((SECONDS / 60))m$(printf %02d $((SECONDS % 60)))s: results in $WORK (results_*.json, tree.json/png, TensorBoard logs: tensorboard --logdir $WORK/tb)"
