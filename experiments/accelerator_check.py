"""Accelerator check: Medusa against vanilla decoding on a GPU or TPU, plus one sharded train step.

  bash experiments/accelerator_check.sh                      # random heads (correctness + speed)
  bash experiments/accelerator_check.sh --checkpoint runs/smollm2_medusa1/export --tree runs/smollm2_medusa1/tree.json

SmolLM2 in bfloat16 on an accelerator (float32 on a CPU), the release's 64-node tree and the
calibrated one (``--tree``), batch 1 and 8; random heads check correctness (greedy Medusa must emit
vanilla's tokens) and a trained export gives real tokens/step. Then one train step of the Medusa-1
recipe jitted over every device (data-parallel rows, FSDP weights). Prints one table; sized to
finish in about 8 minutes on one GPU (``--num_prompts``, ``--max_new_tokens`` shrink it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import numpy as np

from medusa_jax import benchmark, decode, hardware, medusa, optim, runtime, sharding, trainer
from medusa_jax import tree as tree_lib


def _config(spec: str, overrides):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=False)
  fv(["prog", f"--config={spec}", *overrides])
  return holder.value


def decode_rows(config, loaded, trees, batches, num_prompts, max_new_tokens) -> list[dict]:
  sampling = decode.Sampling(max_new_tokens=max_new_tokens)
  prompts = runtime.read_jsonl_prompts("mt_bench", num_prompts)
  token_lists = [runtime.chat_prompt(loaded.tokenizer, p["text"]) for p in prompts]
  ids = [p["question_id"] for p in prompts]
  vanilla = decode.Decoder(loaded.cfg, sampling)
  vp = vanilla.prepare(loaded.params)
  rows = []
  for name, spec_text in trees:
    spec = medusa.MedusaSpec(heads=loaded.heads, tree=tree_lib.resolve(spec_text, num_heads=loaded.heads.num_heads))
    d = medusa.make_decoder(loaded.cfg, sampling, spec)
    entries = {"vanilla": (vanilla, vp), "medusa": (d, d.prepare(vp))}
    for b in batches:
      per = benchmark.measure(entries, token_lists, ids, cfg=loaded.cfg, sampling=sampling,
                              rng=jax.random.PRNGKey(0), batch_size=b, progress=None)
      van, med = benchmark.summarize(per["vanilla"]), benchmark.summarize(per["medusa"])
      same, _ = benchmark.compare_outputs(loaded.cfg, loaded.params, token_lists, per["vanilla"], per["medusa"])
      rows.append({"what": f"decode, {name} ({spec.tree.num_nodes} nodes)", "batch": b,
                   "vanilla tok/s": van["tok_per_s"] * b, "medusa tok/s": med["tok_per_s"] * b,
                   "tokens/step": med["acceleration_rate"], "overhead": med["step_seconds"] / van["step_seconds"],
                   "speedup": med["tok_per_s"] / van["tok_per_s"], "identical": same})
  return rows


def train_step_row(config, loaded) -> dict:
  """One Medusa-1 train step jitted over every device (the trainer's own partition and shardings)."""
  tc = config.train
  params = loaded.params
  split = optim.split_for_training(tc, params)
  tparams, frozen, tx = split.tparams, split.frozen, split.tx
  mesh = sharding.make_mesh(config)
  placement = sharding.TrainPlacement(config, mesh, loaded.cfg, loaded.heads, tparams, frozen)
  B = placement.batch_divisor * max(1, tc.batch_size // placement.batch_divisor)
  sc = dataclasses.replace(trainer.step_config(config, loaded.cfg, loaded.heads), rows=placement.rows)
  tparams, frozen = placement.put(tparams, frozen)
  state = optim.init_state(tx, placement, tparams)
  step = trainer.jit_train_step(sc, tx, placement, False)
  L = int(tc.seq_len)
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(3, loaded.cfg.vocab_size, (B, L)).astype(np.int32),
           "loss_mask": np.ones((B, L), np.int32), "segment_ids": np.ones((B, L), np.int32),
           "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy()}
  t0 = time.perf_counter()
  state, metrics = step(state, frozen, placement.put_batch(batch), None)
  loss = float(metrics["loss"])
  compile_and_first = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, metrics = jax.block_until_ready(step(state, frozen, placement.put_batch(batch), None))
  return {"what": f"train step, mesh {sharding.describe(mesh)}", "batch": B, "seq_len": L,
          "step s": time.perf_counter() - t0, "first step s (with compile)": compile_and_first,
          "loss finite": bool(np.isfinite(loss) and np.isfinite(float(metrics["loss"])))}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", default="configs/smollm2_medusa1.py")
  ap.add_argument("--checkpoint", default=None)
  ap.add_argument("--tree", default=None, help="the calibrated tree, beside the release's")
  ap.add_argument("--num_prompts", type=int, default=8)
  ap.add_argument("--max_new_tokens", type=int, default=128)
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--override", action="append", default=[])
  args = ap.parse_args(argv)
  accel = jax.default_backend() != "cpu"
  overrides = ([] if not accel else ["--config.dtype=bfloat16"]) + args.override
  config = _config(args.config, overrides)
  loaded = runtime.load(config, heads=None if args.checkpoint else "random", checkpoint=args.checkpoint)
  print(f"accelerator check: {hardware.describe()}; {config.dtype}; heads: {args.checkpoint or 'random'}")
  trees = [("release tree", "mc_sim_7b_63")] + ([("calibrated tree", args.tree)] if args.tree else [])
  rows = decode_rows(config, loaded, trees, [int(b) for b in args.batches.split(",")], args.num_prompts,
                     args.max_new_tokens)
  rows.append(train_step_row(config, loaded))
  keys = []
  for r in rows:
    keys += [k for k in r if k not in keys]
  fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
  print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
  for r in rows:
    print("| " + " | ".join(fmt(r.get(k)) for k in keys) + " |")
  return rows


if __name__ == "__main__":
  main()
