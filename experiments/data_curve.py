"""The data curve: how much the heads accept against how many tokens they were trained on, per recipe.

  python experiments/data_curve.py --arms soft,soft+prefix --budgets 0.5M,1M,2M --out runs/data_curve

For every (recipe, token budget) it trains Medusa-1 heads for one epoch on the first ``budget``
tokens of the recipe's data (``data.max_tokens``, ``train.epochs=1``), then measures them on
held-out ShareGPT prompts the way calibration does (``calibrate.rank_counts``): each head's top-1
against the backbone's greedy continuation, and the simulated tokens/step of calibrate's own grown
tree at 8, 16 and 64 nodes (tokens/step does not depend on the hardware). Recipes (``ARMS``):

  soft          teacher-forced ShareGPT replies, each head learning the backbone's distribution of
                its token (KL); no generation (configs/smollm2_medusa1.py:soft);
  soft+prefix   the same, the heads reading the prefix-attention layer (:soft,prefix);
  distilled     today's recipe: the backbone's own greedy replies, cross-entropy; its data must be
                made first, with as many prompts as the largest budget needs (~215 tokens each
                with its prompt: ``python -m medusa_jax.distill --config configs/smollm2_medusa1.py
                --config.distill.num_prompts=4700`` for 1M, ~1 h on a 2-core AMD EPYC, ~2.5 h on an
                Intel Xeon), and this script given the same ``--override=--config.distill.num_prompts=4700``
                (the dataset's name carries it);
  distilled+prefix  the same with the prefix layer;
  mix+prefix    both, in turn: at budget B, the soft+prefix point at B/2 (its heads and prefix
                layer, run first if missing) trained one more epoch on the first B/2 tokens of the
                self-distilled replies (``heads_dir``). Soft labels are cheap to make; the
                self-distilled text is what the heads are judged on. The second stage keeps the
                first's draft vocabulary (counted on ShareGPT's replies) and starts its learning-rate
                schedule afresh.

Equal compute is the fair axis, so each row also gives the wall time of making its data: the
backbone's hidden-state pass over the budget for the teacher-forced recipes (``hidden_cache``'s
per-shard records; budgets share one cache, each costing its own prefix), the distillation's
generation for the self-distilled ones (each reply's record in ``replies.jsonl`` carries its share of
its batch's wall time; ~128 tok/s on a 2-core Intel Xeon, ~270-360 on an AMD EPYC), and the training
time. A budget larger than its dataset trains on all of it: the row's tokens then say how many.

Each point records the commit and the CPU that measured it.

Resumes: finished points are kept in ``OUT/results.json``; a killed training resumes from its
checkpoint in ``OUT/ARM/BUDGET``; the hidden-state cache keeps its finished shards. Writes
``OUT/table.md`` and ``OUT/data_curve.png``; ``--docs DIR`` copies both there.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import shutil
import time

import jax
import numpy as np

from medusa_jax import calibrate, distill, hardware, hidden_cache, prompts, runtime, train_data, trainer
from medusa_jax import decode


def _sibling(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ablate = _sibling("ablate")

CONFIG = "configs/smollm2_medusa1.py"
ARMS = {"soft": ":soft", "soft+prefix": ":soft,prefix", "distilled": "", "distilled+prefix": ":prefix",
        "mix+prefix": ":prefix"}
# Two-stage arms: (the arm whose point at half the budget they start from, the fraction of the budget it takes).
STAGES = {"mix+prefix": ("soft+prefix", 0.5)}
NODES = (8, 16, 64)
# The checkout's commit when the curve started: a point's row names the code that ran it, not one
# committed while it trained.
COMMIT_AT_START = None


def parse_budget(s: str) -> int:
  s = s.strip().upper()
  mult = {"K": 1e3, "M": 1e6}.get(s[-1:], 1)
  return int(round(float(s[:-1] if s[-1:] in "KM" else s) * mult))


def budget_name(n: int) -> str:
  return f"{n / 1e6:g}M"


def generations_for(config, loaded, path: str, num_prompts: int, max_new_tokens: int):
  """Held-out ShareGPT prompts and the backbone's greedy continuations, made once (they do not
  depend on the heads) and kept in ``path``."""
  if os.path.exists(path):
    with open(path) as f:
      d = json.load(f)
    return d["prompts"], d["generations"]
  ps = [list(p.tokens) for p in itertools.islice(prompts.sharegpt_prompts(
      loaded.tokenizer, split="heldout", heldout_fraction=float(config.data.heldout_fraction),
      max_prompt_len=int(config.distill.max_prompt_len)), num_prompts)]
  decoder = decode.Decoder(loaded.cfg, decode.Sampling(temperature=0.0, max_new_tokens=max_new_tokens))
  gens = [[] for _ in ps]
  for idx, outs in decode.batched_generate(decoder, decoder.prepare(loaded.params), ps, 16, jax.random.PRNGKey(0)):
    for i, o in zip(idx, outs):
      gens[i] = list(map(int, o))
  with open(path + ".tmp", "w") as f:
    json.dump({"prompts": ps, "generations": gens}, f)
  os.replace(path + ".tmp", path)
  return ps, gens


def acceptance(loaded, ps, gens, nodes=NODES) -> dict:
  """Head top-1 on the held-out continuations and the simulated tokens/step of calibrate's grown
  tree at each size."""
  ranks: list = []
  counts = calibrate.rank_counts(loaded.cfg, loaded.heads, loaded.params, ps, gens, num_ranks=10, batch_size=16,
                                 ranks_out=ranks)
  table = calibrate.accuracy_table(counts)
  joint = np.concatenate(ranks)
  choices, _ = calibrate.grow(table[1:], max(nodes), joint)
  return {"head_top1": [float(x) for x in table[1:, 0]],
          "tokens_per_step": {str(n): calibrate.simulate_tokens_per_step(ranks, choices[:n - 1]) for n in nodes}}


def data_seconds(config, loaded, arm: str, train) -> float | None:
  """Wall seconds it took to make this arm's training data on this machine: ``train``, the budget's
  prefix of the train split (``data.max_tokens`` tokens)."""
  if arm.startswith("soft"):
    name = train_data.dataset_name(config)
    d = hidden_cache.cache_dir(loaded.cfg, loaded.params["base"], config.data.data_dir, name, "train",
                               int(config.train.seq_len), config.train.cache_dtype)
    # the shards' own records: no second pass over the data
    return hidden_cache.build_seconds(d, int(config.data.max_tokens))
  # Self-distilled: the generation of the replies in the budget, as each reply's record gives it
  # (its share of its batch's wall time); None for replies written before records carried it.
  return distill.generation_seconds(distill.default_workdir(config), (train[i]["id"] for i in range(len(train))))


def stage_budgets(arm: str, budget: int) -> tuple[str | None, int, int]:
  """(the arm a two-stage arm starts from or None, that stage's budget, this stage's budget)."""
  if arm not in STAGES:
    return None, 0, budget
  first, frac = STAGES[arm]
  b0 = int(round(budget * frac))
  return first, b0, budget - b0


def run_point(arm: str, budget: int, out: str, overrides=(), first_point: dict | None = None) -> dict:
  first, b0, mine = stage_budgets(arm, budget)
  extra = [f"--config.heads_dir={os.path.join(out, first, budget_name(b0), 'export')}"] if first else []
  config = ablate.load_config(CONFIG + ARMS[arm], [f"--config.data.max_tokens={mine}", "--config.train.epochs=1",
                                                 *extra, *overrides])
  workdir = os.path.join(out, arm, budget_name(budget))
  t0 = time.perf_counter()
  res = trainer.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - t0
  if res.get("stopped"):
    raise SystemExit(f"stopped by {res['stopped']}: run the same command again to resume")
  loaded = runtime.load(config, heads=os.path.join(workdir, "export"))
  train, _ = train_data.sources(config, loaded.tokenizer)  # the budget's prefix, read once for both below
  row = {"arm": arm, "budget": budget, "steps": int(config.train.steps), "train_and_cache_s": wall,
         "tokens": int(hidden_cache.offsets_of(train, int(config.train.seq_len))[-1]),
         "commit": COMMIT_AT_START or hardware.commit(), "cpu": hardware.cpu_model(),
         "data_s": data_seconds(config, loaded, arm, train),
         "eval": {k: v for k, v in (res.get("eval") or {}).items() if k.endswith("/top1")}}
  return with_first_stage(row, first_point), config, loaded


def with_first_stage(row: dict, first_point: dict | None) -> dict:
  """A two-stage arm's row with its first stage's steps and costs added (unknown stays unknown)."""
  if first_point is None:
    return row
  row = dict(row)
  for k in ("steps", "train_and_cache_s", "data_s", "tokens"):
    a, b = row.get(k), first_point.get(k)
    row[k] = None if a is None or b is None else a + b
  return row


def tokens_label(p: dict) -> str:
  """The budget's name, and the tokens trained on where the data held fewer (under 98 %)."""
  name, got = budget_name(p["budget"]), p.get("tokens")
  return name if got is None or got >= 0.98 * p["budget"] else f"{name} ({got / 1e6:.2f}M)"


def write_outputs(results, out: str, docs: str | None) -> None:
  pts = sorted(results.points.values(), key=lambda r: (r["arm"], r["budget"]))
  # The teacher-forced arms share one cache: a budget's data cost is the same for both.
  soft_s = {(p["budget"], p.get("cpu")): p["data_s"] for p in pts
            if p["arm"].startswith("soft") and p["data_s"] is not None}
  for p in pts:
    if p["arm"].startswith("soft") and p["data_s"] is None:
      p["data_s"] = soft_s.get((p["budget"], p.get("cpu")))
  meta = results.data["meta"]
  header = (["recipe", "tokens", "steps", "data wall s", "head top-1 (1/2/3/4)"] + [f"tok/step @{n}" for n in NODES]
            + ["commit", "cpu"])
  # A point keeps the commit and CPU that measured it (a resumed curve spans several sessions and
  # machines: tokens/step does not depend on the machine, the data and training times do).
  rows = [[p["arm"], tokens_label(p), p["steps"], None if p["data_s"] is None else round(p["data_s"]),
           " / ".join(f"{x:.3f}" for x in p["head_top1"])] + [round(p["tokens_per_step"][str(n)], 3) for n in NODES]
          + [p.get("commit") or "?", p.get("cpu") or "?"] for p in pts]
  ablate.write_table(out, f"Data curve (each row's commit and CPU in its row; the last run: {meta['hardware']})",
                     header, rows)

  def draw(ax):
    for arm in sorted({p["arm"] for p in pts}):
      mine = [p for p in pts if p["arm"] == arm]
      for n, style in zip(NODES, (":", "--", "-")):
        ax.plot([p["budget"] / 1e6 for p in mine], [p["tokens_per_step"][str(n)] for p in mine], style, marker="o",
                label=f"{arm}, {n} nodes", color=f"C{sorted({q['arm'] for q in pts}).index(arm)}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training tokens (millions, one epoch)")
    ax.set_ylabel("simulated tokens/step (held-out)")
    ax.legend(fontsize=6)
  ablate.plot(os.path.join(out, "data_curve.png"), draw)
  if docs:
    os.makedirs(docs, exist_ok=True)
    for f in ("table.md", "data_curve.png", "results.json"):
      shutil.copy(os.path.join(out, f), os.path.join(docs, f))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=__doc__.split("\n\n", 1)[1])
  ap.add_argument("--arms", default="soft,soft+prefix", help=f"comma-separated recipes among {sorted(ARMS)}")
  ap.add_argument("--budgets", default="0.5M,1M,2M", help="token budgets, e.g. 0.5M,1M,2M,4M,8M")
  ap.add_argument("--out", default="runs/data_curve")
  ap.add_argument("--docs", default=None, help="also copy the table, plot and results here (e.g. docs/data_curve)")
  ap.add_argument("--num_prompts", type=int, default=32, help="held-out ShareGPT prompts measured")
  ap.add_argument("--max_new_tokens", type=int, default=128)
  ap.add_argument("--override", action="append", default=[], help="extra --config.KEY=VALUE for every run")
  args = ap.parse_args(argv)
  global COMMIT_AT_START
  COMMIT_AT_START = hardware.commit()
  arms = [a for a in args.arms.split(",") if a]
  unknown = [a for a in arms if a not in ARMS]
  if unknown:
    ap.error(f"unknown arm(s) {unknown}; known: {sorted(ARMS)}")
  budgets = sorted(parse_budget(b) for b in args.budgets.split(","))
  results = ablate.Results(args.out, {"hardware": hardware.describe(), "commit": COMMIT_AT_START,
                                      "cpu": hardware.cpu_model(),
                                      "num_prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens})
  print(f"data curve on {hardware.describe()}: arms {arms}, budgets {[budget_name(b) for b in budgets]}")
  gens = None

  def point(arm, budget, need_export=False):
    nonlocal gens
    key = f"{arm}@{budget_name(budget)}"
    export = os.path.join(args.out, arm, budget_name(budget), "export")
    if results.has(key) and (not need_export or os.path.isdir(export)):
      return results.points[key]
    first, b0, _ = stage_budgets(arm, budget)
    # A second stage starts from its first stage's heads: a point measured elsewhere (no export
    # here) is trained again, and its row becomes this machine's (the costs added to the second
    # stage's are then the same machine's).
    first_point = point(first, b0, need_export=True) if first else None
    print(f"== {key}")
    row, config, loaded = run_point(arm, budget, args.out, args.override, first_point)
    if gens is None:
      gens = generations_for(config, loaded, os.path.join(args.out, "generations.json"), args.num_prompts,
                             args.max_new_tokens)
    row.update(acceptance(loaded, *gens))
    print(json.dumps(row))
    results.put(key, row)
    write_outputs(results, args.out, args.docs)
    return row

  for budget in budgets:
    for arm in arms:
      point(arm, budget)
  write_outputs(results, args.out, args.docs)


if __name__ == "__main__":
  main()
