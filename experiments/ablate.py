"""Decode-speed ablations: the Medusa paper's tables and figures at this model's scale, one command each.

  python experiments/ablate.py --study stack --config configs/smollm2_medusa1.py \
      --checkpoint runs/smollm2_medusa1/export --tree runs/smollm2_medusa1/tree.json \
      --medusa2 runs/smollm2_medusa2/export:runs/smollm2_medusa2/tree.json \
      --sequential runs/smollm2_hydra/export:runs/smollm2_hydra/tree.json
  python experiments/ablate.py --study tree-size --config configs/smollm2_medusa1.py \
      --checkpoint runs/smollm2_medusa1/export --tree runs/smollm2_medusa1/tree.json
  python experiments/ablate.py --study typical  --config configs/smollm2_medusa1.py --checkpoint ... --tree ...
  python experiments/ablate.py --study heads    --config configs/smollm2_medusa1.py --checkpoint ...
  python experiments/ablate.py --study batch    --config configs/smollm2_medusa1.py --checkpoint ... --tree ...

Studies (each writes ``OUT/NAME/{results.json, table.md, NAME.png}``):
  stack      the paper's Table 3 as rows that each add one thing: vanilla, heads without a tree (a
             top-1 chain), the release's 64-node tree, the calibrated tree, Medusa-2, sequential heads;
  tree-size  the paper's Fig. 4, measured: tokens/step, step cost and speedup against tree size for
             the calibrated trees (grown by calibrate) and the dense k x d family, with the fit
             tokens/step = 1 + a ln(nodes) and this hardware's optimum;
  typical    the paper's Fig. 5: typical acceptance's epsilon (delta = sqrt(epsilon)) at T = 0.7 against
             tokens/step and three judge-free quality proxies (the backbone's mean log-likelihood of
             the output, distinct-2, and the total variation between its token frequencies and plain
             sampling's), with exact tree sampling and plain sampling as references;
  heads      top-1..top-5 accuracy of each head on held-out replies (the release's medusa_acc.csv);
  batch      speedup against batch size for one tree.

Timings are ratios within one run, the decoders taking turns prompt by prompt. A study resumes after
a kill: points already in results.json are skipped. Every run prints the hardware, the commit and
the settings. The defaults finish on a 2-core CPU in about 15 minutes each; ``--gpu`` takes the
paper's sizes (more prompts and tokens, trees up to 64 nodes, batch up to 32).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import benchmark, calibrate, decode, hardware, medusa
from medusa_jax import model as model_lib
from medusa_jax import prompts as prompts_lib
from medusa_jax import runtime
from medusa_jax import tree as tree_lib

STUDIES = ("stack", "tree-size", "typical", "heads", "batch")
# The paper's Table 3 (Vicuna-7B, A100, speedup over HF): the row each of ours corresponds to.
PAPER_STACK = {"vanilla": 1.0, "heads, no tree (top-1 chain)": 1.5, "release's 64-node tree": 1.9,
               "calibrated tree": 2.2, "Medusa-2": 2.83}


# ----------------------------------------------------------------------------------------------
# Set-up shared by the studies
# ----------------------------------------------------------------------------------------------

def load_config(spec: str, overrides=()):
  """The config of ``spec`` ('file.py:variants') with ``--config.KEY=VALUE`` overrides applied (a value
  is read as a Python literal, else kept as a string; an unknown key is an error)."""
  import ast  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=False)
  fv(["prog", f"--config={spec}"])
  c = holder.value
  for o in overrides:
    key, _, value = o.removeprefix("--config.").partition("=")
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"unknown config key {key!r} in override {o!r}")
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value
  return c


class Results:
  """``results.json`` of one study: measured points by key, written after each point (resume)."""

  def __init__(self, out_dir: str, meta: dict):
    self.dir = out_dir
    os.makedirs(out_dir, exist_ok=True)
    self.path = os.path.join(out_dir, "results.json")
    self.data = {"meta": meta, "points": {}}
    if os.path.exists(self.path):
      with open(self.path) as f:
        old = json.load(f)
      self.data["points"] = old.get("points", {})

  def has(self, key: str) -> bool:
    return key in self.data["points"]

  def put(self, key: str, value: dict) -> None:
    self.data["points"][key] = value
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=1)
    os.replace(tmp, self.path)

  @property
  def points(self) -> dict:
    return self.data["points"]


def prompts_of(args, loaded) -> tuple[list[list[int]], list]:
  """Token ids and ids of the study's prompts: MT-Bench first turns or held-out ShareGPT."""
  if args.prompts == "sharegpt_heldout":
    ps = prompts_lib.heldout_eval_prompts(args.config_obj, loaded.tokenizer, args.num_prompts)
    return [list(p.tokens) for p in ps], [p.id for p in ps]
  ps = runtime.read_jsonl_prompts(args.prompts, args.num_prompts)
  return [runtime.chat_prompt(loaded.tokenizer, p["text"]) for p in ps], [p["question_id"] for p in ps]


def measure_points(points: dict, loaded_of: dict, args, results: Results, sampling, *, batch_size=1,
                   extra=None) -> None:
  """Times each point ``{key: (loaded key, MedusaSpec or None)}`` not yet in ``results`` against
  vanilla decoding of the same backbone in the same loop, and stores its tokens/step, overhead and
  speedup (and ``extra``), one point at a time (a killed study resumes after the last one).

  ``identical`` is the fraction of prompts whose output equals vanilla's, for a Medusa point decoded
  greedily; None where nothing is compared: the vanilla point (it is the reference) and sampling
  (outputs differ by design).
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  todo = [k for k in points if not results.has(k)]
  for key in tqdm(todo, desc="points", unit="point"):
    which, spec = points[key]
    loaded = loaded_of[which]
    token_lists, ids = prompts_of(args, loaded)
    vanilla = decode.Decoder(loaded.cfg, sampling)
    entries = {"vanilla": (vanilla, vanilla.prepare(loaded.params))}
    if spec is not None:
      d = medusa.make_decoder(loaded.cfg, sampling, spec)
      entries["point"] = (d, d.prepare(entries["vanilla"][1]))
    per = benchmark.measure(entries, token_lists, ids, cfg=loaded.cfg, sampling=sampling,
                            rng=jax.random.PRNGKey(args.seed), batch_size=batch_size, progress=None)
    van = benchmark.summarize(per["vanilla"])
    row = {"vanilla_tok_per_s": van["tok_per_s"], "vanilla_step_ms": 1e3 * van["step_seconds"]}
    if spec is None:
      row.update(tokens_per_step=1.0, overhead=1.0, speedup=1.0, identical=None, nodes=1)
    else:
      pt = benchmark.summarize(per["point"])
      same, _ = benchmark.compare_outputs(loaded.cfg, loaded.params, token_lists, per["vanilla"], per["point"]) \
          if sampling.temperature <= 0 else (None, None)
      row.update(tokens_per_step=pt["acceleration_rate"], overhead=pt["step_seconds"] / van["step_seconds"],
                 speedup=pt["tok_per_s"] / van["tok_per_s"], identical=same, nodes=spec.tree.num_nodes,
                 step_ms=1e3 * pt["step_seconds"], tok_per_s=pt["tok_per_s"])
    results.put(key, {**row, **(extra or {})})


def spec_for(loaded, tree_spec, **kw) -> medusa.MedusaSpec:
  tree = tree_lib.resolve(tree_spec, num_heads=loaded.heads.num_heads)
  return medusa.MedusaSpec(heads=loaded.heads, tree=tree, **kw)


def write_table(out_dir: str, title: str, header: list[str], rows: list[list]) -> str:
  fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else ("-" if v is None else str(v))
  lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(text)
  print(text)
  return text


def plot(path: str, draw) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
  draw(ax)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The studies
# ----------------------------------------------------------------------------------------------

def study_stack(args, loaded_of, results, sampling, out_dir):
  base = loaded_of["main"]
  depth = base.heads.num_heads
  points = {"vanilla": ("main", None),
            "heads, no tree (top-1 chain)": ("main", spec_for(base, f"chain:{min(depth, 4)}")),
            "release's 64-node tree": ("main", spec_for(base, "mc_sim_7b_63"))}
  if args.tree:
    points["calibrated tree"] = ("main", spec_for(base, args.tree))
  for name, key in (("Medusa-2", "medusa2"), ("sequential heads", "sequential")):
    if key in loaded_of:
      points[name] = (key, spec_for(loaded_of[key], args.extra_trees[key]))
  measure_points(points, loaded_of, args, results, sampling)
  rows = [[k, results.points[k]["nodes"], results.points[k]["tokens_per_step"], results.points[k]["overhead"],
           results.points[k]["speedup"], results.points[k]["identical"], PAPER_STACK.get(k)] for k in points]
  write_table(out_dir, "stack: each row adds one thing (the paper's Table 3)",
              ["decoding", "nodes", "tokens/step", "overhead", "speedup", "identical", "paper speedup (Vicuna-7B, A100)"],
              rows)

  def draw(ax):
    names = list(points)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [results.points[k]["speedup"] for k in names], 0.4, label="measured here")
    ax.bar(x + 0.2, [PAPER_STACK.get(k, 0) for k in names], 0.4, label="paper (Vicuna-7B, A100)", color="0.7")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xticks(x, [n.replace(" (", "\n(").replace("tree", "tree") for n in names], fontsize=6, rotation=20)
    ax.set_ylabel("speedup over vanilla")
    ax.legend(fontsize=7)
  plot(os.path.join(out_dir, "stack.png"), draw)


def study_tree_size(args, loaded_of, results, sampling, out_dir):
  base = loaded_of["main"]
  sizes = [int(s) for s in args.sizes.split(",")]
  grown = []
  if args.tree:
    with open(args.tree) as f:
      grown = json.load(f).get("grown_choices", [])
  points = {"1 (vanilla)": ("main", None)}
  for n in sizes:
    if 2 <= n <= len(grown) + 1:
      points[f"calibrated {n}"] = ("main", spec_for(base, grown[:n - 1]))
  for k, d in ((1, 1), (1, 2), (2, 1), (1, 3), (2, 2), (3, 2), (2, 3), (4, 2), (3, 3), (4, 3)):
    if d <= base.heads.num_heads and 1 + sum(k ** j for j in range(1, d + 1)) <= max(sizes):
      points[f"dense {k}x{d}"] = ("main", spec_for(base, f"dense:{k},{d}"))
  measure_points(points, loaded_of, args, results, sampling)
  rows = [[k, results.points[k]["nodes"], results.points[k]["tokens_per_step"], results.points[k].get("step_ms"),
           results.points[k]["speedup"]] for k in points]
  cal = sorted((results.points[k]["nodes"], results.points[k]) for k in points if k.startswith(("calibrated", "1 ")))
  n = np.array([c[0] for c in cal], float)
  acc = np.array([c[1]["tokens_per_step"] for c in cal])
  a = float(np.sum(np.log(n) * (acc - 1)) / max(np.sum(np.log(n) ** 2), 1e-9))  # least squares, through (1, 1)
  best = max(points, key=lambda k: results.points[k]["speedup"])
  write_table(out_dir, f"tree-size: measured (fit tokens/step = 1 + {a:.3f} ln(nodes); best here: {best})",
              ["tree", "nodes", "tokens/step", "step ms", "speedup"], rows)

  def draw(ax):
    for family, marker in (("calibrated", "o-"), ("dense", "s")):
      ks = sorted((k for k in points if k.startswith(family) or (family == "calibrated" and k.startswith("1 "))),
                  key=lambda k: results.points[k]["nodes"])
      ax.plot([results.points[k]["nodes"] for k in ks], [results.points[k]["tokens_per_step"] for k in ks], marker,
              label=f"{family}: tokens/step")
      ax.plot([results.points[k]["nodes"] for k in ks], [results.points[k]["speedup"] for k in ks], marker,
              alpha=0.5, label=f"{family}: speedup")
    xs = np.linspace(1, max(n.max(), 2), 50)
    ax.plot(xs, 1 + a * np.log(xs), "k--", lw=0.8, label=f"1 + {a:.2f} ln(nodes)")
    ax.plot([results.points[best]["nodes"]], [results.points[best]["speedup"]], "r*", ms=12, label=f"optimum: {best}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree nodes")
    ax.legend(fontsize=6)
  plot(os.path.join(out_dir, "tree-size.png"), draw)


def _quality(cfg, params, token_lists, outs) -> dict:
  """Judge-free quality proxies of outputs: the backbone's mean log-likelihood per token, distinct-2."""
  lls = []
  for prompt, out in zip(token_lists, outs):
    if len(out) < 2:
      continue
    seq = np.asarray(prompt + out, np.int32)[None]
    L = seq.shape[1]
    logits, _, _ = model_lib.forward(cfg, params["base"], seq, np.arange(L)[None],
                                     model_lib.causal_mask(jnp.array([L]), L))
    logp = jax.nn.log_softmax(logits[0, len(prompt) - 1:L - 1].astype(jnp.float32), -1)
    lls.append(float(jnp.mean(jnp.take_along_axis(logp, jnp.asarray(out)[:, None], -1))))
  bigrams = [tuple(o[i:i + 2]) for o in outs for i in range(len(o) - 1)]
  return {"loglik": float(np.mean(lls)), "distinct2": len(set(bigrams)) / max(len(bigrams), 1)}


def study_typical(args, loaded_of, results, sampling, out_dir):
  import dataclasses  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  base = loaded_of["main"]
  samp = dataclasses.replace(sampling, temperature=0.7)
  token_lists, ids = prompts_of(args, base)
  tree = args.tree or f"chain:{min(base.heads.num_heads, 4)}"
  points = {"plain sampling": None, "exact tree sampling": spec_for(base, tree, acceptance="sample")}
  for eps in [float(e) for e in args.epsilons.split(",")]:
    points[f"typical eps={eps:g}"] = spec_for(base, tree, acceptance="typical", typical_epsilon=eps,
                                             typical_delta=math.sqrt(eps))
  vanilla = decode.Decoder(base.cfg, samp)
  vp = vanilla.prepare(base.params)
  for key in tqdm([k for k in points if not results.has(k)], desc="points", unit="point"):
    spec = points[key]
    entries = {"vanilla": (vanilla, vp)}
    if spec is not None:
      d = medusa.make_decoder(base.cfg, samp, spec)
      entries["point"] = (d, d.prepare(vp))
    per = benchmark.measure(entries, token_lists, ids, cfg=base.cfg, sampling=samp, rng=jax.random.PRNGKey(args.seed),
                            progress=None)
    rows = per.get("point", per["vanilla"])
    outs = [r["tokens"] for r in rows]
    van = benchmark.summarize(per["vanilla"])
    pt = benchmark.summarize(rows)
    row = {"tokens_per_step": pt["acceleration_rate"], "speedup": pt["tok_per_s"] / van["tok_per_s"],
           **_quality(base.cfg, base.params, token_lists, outs),
           "counts": np.bincount(np.concatenate([np.asarray(o) for o in outs]), minlength=base.cfg.vocab_size).tolist()}
    results.put(key, row)
  plain = np.asarray(results.points["plain sampling"]["counts"], float)
  p0 = plain / plain.sum()
  table = []
  for key in points:
    r = results.points[key]
    c = np.asarray(r["counts"], float)
    tv = 0.5 * float(np.abs(c / c.sum() - p0).sum())
    table.append([key, r["tokens_per_step"], r["speedup"], r["loglik"], r["distinct2"], tv])
  write_table(out_dir, f"typical acceptance at T=0.7, delta=sqrt(eps), tree {tree} (the paper's Fig. 5)",
              ["decoding", "tokens/step", "speedup", "mean log-likelihood", "distinct-2", "TV to plain sampling"], table)

  def draw(ax):
    typ = [t for t in table if t[0].startswith("typical")]
    ax.plot([t[1] for t in typ], [t[3] for t in typ], "o-", label="typical (eps sweep)")
    for t, m in zip([t for t in table if not t[0].startswith("typical")], ("s", "^")):
      ax.plot([t[1]], [t[3]], m, ms=9, label=t[0])
    ax.set_xlabel("tokens/step")
    ax.set_ylabel("backbone log-likelihood / token")
    ax.legend(fontsize=7)
  plot(os.path.join(out_dir, "typical.png"), draw)


def study_heads(args, loaded_of, results, sampling, out_dir):
  base = loaded_of["main"]
  key = "accuracy"
  if not results.has(key):
    token_lists, _ = prompts_of(args, base)
    dec = decode.Decoder(base.cfg, decode.Sampling(max_new_tokens=sampling.max_new_tokens))
    dp = dec.prepare(base.params)
    gens = []
    for idx, outs in decode.batched_generate(dec, dp, token_lists, min(8, len(token_lists)), jax.random.PRNGKey(0)):
      for i, o in zip(idx, outs):
        gens.append((i, o))
    gens = [o for _, o in sorted(gens)]
    counts = calibrate.rank_counts(base.cfg, base.heads, base.params, token_lists, gens, num_ranks=5)
    results.put(key, {"topk": np.cumsum(calibrate.accuracy_table(counts)[1:], axis=1).tolist()})
  topk = np.asarray(results.points[key]["topk"])
  write_table(out_dir, "heads: top-k accuracy on held-out replies (the release's medusa_acc.csv)",
              ["head"] + [f"top-{k}" for k in range(1, 6)], [[m + 1, *row.tolist()] for m, row in enumerate(topk)])

  def draw(ax):
    for m, row in enumerate(topk):
      ax.plot(range(1, 6), row, "o-", label=f"head {m + 1}")
    ax.set_xlabel("k")
    ax.set_ylabel("top-k accuracy")
    ax.legend(fontsize=7)
  plot(os.path.join(out_dir, "heads.png"), draw)


def study_batch(args, loaded_of, results, sampling, out_dir):
  base = loaded_of["main"]
  spec = spec_for(base, args.tree or f"chain:{min(base.heads.num_heads, 4)}")
  for b in [int(x) for x in args.batches.split(",")]:
    measure_points({f"batch {b}": ("main", spec)}, loaded_of, args, results, sampling, batch_size=b,
                   extra={"batch": b})
  # benchmark.summarize's tok/s already counts every sequence of a batch (its tokens over wall time).
  rows = [[r["batch"], r["tokens_per_step"], r["overhead"], r["speedup"], r["vanilla_tok_per_s"]]
          for r in sorted(results.points.values(), key=lambda r: r["batch"])]
  write_table(out_dir, f"batch: tree of {spec.tree.num_nodes} nodes", ["batch", "tokens/step", "overhead", "speedup",
                                                                      "vanilla tok/s (all sequences)"], rows)

  def draw(ax):
    ax.plot([r[0] for r in rows], [r[3] for r in rows], "o-")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("Medusa speedup over vanilla")
  plot(os.path.join(out_dir, "batch.png"), draw)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--study", required=True, choices=STUDIES)
  ap.add_argument("--config", default="configs/smollm2_medusa1.py")
  ap.add_argument("--checkpoint", default=None, help="the heads' export (random heads without one)")
  ap.add_argument("--tree", default=None, help="the calibrated tree (calibrate --out)")
  ap.add_argument("--medusa2", default=None, help="EXPORT:TREE of a Medusa-2 run (stack)")
  ap.add_argument("--sequential", default=None, help="EXPORT:TREE of a sequential-heads run (stack)")
  ap.add_argument("--prompts", default="mt_bench", help="mt_bench, sharegpt_heldout or a jsonl file")
  ap.add_argument("--num_prompts", type=int, default=None)
  ap.add_argument("--max_new_tokens", type=int, default=None)
  ap.add_argument("--sizes", default=None, help="tree sizes (tree-size)")
  ap.add_argument("--epsilons", default="0.01,0.03,0.09,0.15,0.25", help="typical acceptance's eps (typical)")
  ap.add_argument("--batches", default=None, help="batch sizes (batch)")
  ap.add_argument("--gpu", action="store_true", help="the paper's sizes: more prompts and tokens, bigger trees")
  ap.add_argument("--out", default="runs/ablations")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--override", action="append", default=[], help="--config.key=value, repeatable")
  args = ap.parse_args(argv)
  big = args.gpu
  args.num_prompts = args.num_prompts or (80 if big else {"heads": 16, "typical": 6}.get(args.study, 8))
  args.max_new_tokens = args.max_new_tokens or (256 if big else 64)
  args.sizes = args.sizes or ("1,2,4,8,16,32,64" if big else "1,2,3,4,6,8,12,16")
  args.batches = args.batches or ("1,2,4,8,16,32" if big else "1,2,4,8")

  config = load_config(args.config, args.override)
  config.decode.max_new_tokens = args.max_new_tokens
  args.config_obj = config
  loaded_of = {"main": runtime.load(config, heads=None if args.checkpoint else "random", checkpoint=args.checkpoint)}
  args.extra_trees = {}
  for key in ("medusa2", "sequential"):
    value = getattr(args, key)
    if value:
      export, tree = value.split(":")
      loaded_of[key] = runtime.load(config, checkpoint=export)
      args.extra_trees[key] = tree
  sampling = decode.Sampling(temperature=0.0, max_new_tokens=args.max_new_tokens)
  out_dir = os.path.join(args.out, args.study)
  meta = {"hardware": hardware.info(), "argv": sys.argv, "settings": {k: v for k, v in vars(args).items()
                                                                       if k != "config_obj"}}
  print(f"study {args.study}: {hardware.describe(meta['hardware'])}; {args.num_prompts} prompts "
        f"({args.prompts}) x {args.max_new_tokens} tokens; out {out_dir}")
  results = Results(out_dir, meta)
  t0 = time.perf_counter()
  {"stack": study_stack, "tree-size": study_tree_size, "typical": study_typical, "heads": study_heads,
   "batch": study_batch}[args.study](args, loaded_of, results, sampling, out_dir)
  print(f"wrote {out_dir}/results.json, table.md, {args.study}.png in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
