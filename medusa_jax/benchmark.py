"""Decode-speed benchmark: vanilla vs Medusa on the same prompts, in the same run.

  python -m medusa_jax.benchmark --config configs/smollm2.py --prompts mt_bench --num_prompts 10 \
      --max_new_tokens 128 --modes vanilla,medusa --heads random --tree mc_sim_7b_63 --out runs/results.json

Every (mode, prompt-length bucket) is compiled and run once before timing. Prompts are run one at a
time (batch 1, as in the paper) and the modes alternate prompt by prompt, so machine noise hits both
alike. Definitions (Medusa paper §7.1): the first token comes from the prefill, so a prompt's decode
tokens are ``tokens - 1``; ``tok_per_s`` = decode tokens / decode seconds; ``acceleration_rate`` =
decode tokens / decoding steps; ``overhead`` = Medusa step time / vanilla step time; ``speedup`` =
Medusa tok/s / vanilla tok/s. Greedy outputs are compared with vanilla's; for each prompt that
differs, the first differing position and vanilla's top-2 logit gap there are reported (fp32 sums in
another order may flip a near-tie, and nothing else may).
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import cli
from medusa_jax import entry
from medusa_jax import config as config_lib
from medusa_jax import decode, hardware, medusa, model, runtime

_PROMPTS = flags.DEFINE_string("prompts", "mt_bench", "MT-Bench-style jsonl ('mt_bench' = the 80 bundled "
                               "MT-Bench questions; first turns are used), or 'sharegpt_heldout': held-out "
                               "ShareGPT first turns that neither training nor calibration reads.")
_NUM = flags.DEFINE_integer("num_prompts", 10, "How many prompts from the start of the file.")
_MODES = flags.DEFINE_list("modes", ["vanilla"], "Comma-separated: vanilla, medusa.")
_OUT = flags.DEFINE_string("out", None, "Write the results JSON here.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Prompts decoded together (1 = the paper's setting).")


def _time(fn, *args):
  t = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t


def top2_gap(cfg, params, prompt, generated, position) -> float:
  """Vanilla's gap between its two best logits at ``position`` of ``generated``."""
  seq = np.asarray(prompt + generated[:position], np.int32)[None]
  L = seq.shape[1]
  logits, _, _ = model.forward(cfg, params["base"], seq, np.arange(L)[None], model.causal_mask(jnp.array([L]), L))
  top = np.sort(np.asarray(logits[0, -1]))[-2:]
  return float(top[1] - top[0])


def run(config, prompts: list[dict], modes: list[str], loaded: runtime.Loaded, batch_size: int = 1) -> dict:
  sampling = config_lib.sampling(config)
  decoders, dparams = {}, {}
  for mode in modes:
    if mode not in ("vanilla", "medusa"):
      raise ValueError(f"Unknown mode {mode!r}: use vanilla and/or medusa.")
    spec = config_lib.medusa_spec(config, loaded.heads) if mode == "medusa" else None
    decoders[mode] = medusa.make_decoder(loaded.cfg, sampling, spec)
    # Prepared once; the modes share one packed copy of the backbone for the CPU kernel.
    dparams[mode] = decoders[mode].prepare(next(iter(dparams.values()), loaded.params))
  token_lists = [runtime.chat_prompt(loaded.tokenizer, p["text"]) for p in prompts]
  groups = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
  rng = jax.random.PRNGKey(config.seed)

  # Compile and warm up every shape the timed runs will use: each decoder plans its cache with its
  # own step size (a Medusa tree writes more rows per step), so each keeps its own set of shapes.
  warmed = set()
  for g in groups:
    batch = [token_lists[i] for i in g]
    for mode, d in decoders.items():
      key = (mode, len(g)) + decode.plan_cache(loaded.cfg, [len(t) for t in batch], sampling.max_new_tokens, d.room)
      if key not in warmed:
        warmed.add(key)
        d.generate(dparams[mode], batch, rng)

  per = {m: [] for m in modes}
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  for g in tqdm(groups, desc="benchmark", unit="batch"):
    batch = [token_lists[i] for i in g]
    for mode, d in decoders.items():
      state, t_pre = _time(d.start, dparams[mode], batch, rng)
      state, t_dec = _time(d.finish, dparams[mode], state)
      outs = decode.outputs(state)
      for j, i in enumerate(g):
        per[mode].append({"question_id": prompts[i]["question_id"], "tokens": outs[j],
                          "steps": int(state.steps), "decode_seconds": t_dec / len(g),
                          "prefill_seconds": t_pre / len(g)})

  results = {"modes": {}, "hardware": hardware.info(), "config": json.loads(config.to_json_best_effort()),
             "num_prompts": len(prompts), "batch_size": batch_size}
  for mode, rows in per.items():
    tokens = sum(len(r["tokens"]) for r in rows)
    dec_tokens = sum(max(len(r["tokens"]) - 1, 0) for r in rows)
    steps = sum(r["steps"] for r in rows)  # per sequence: a batch's steps count for each of its rows
    dec_s = sum(r["decode_seconds"] for r in rows)
    results["modes"][mode] = {
        "tok_per_s": dec_tokens / dec_s, "tokens": tokens, "steps": steps,
        "decode_seconds": dec_s, "prefill_seconds": sum(r["prefill_seconds"] for r in rows),
        "acceleration_rate": dec_tokens / max(steps, 1), "step_seconds": dec_s / max(steps, 1),
        "per_prompt": [{k: r[k] for k in ("question_id", "tokens", "steps", "decode_seconds")} for r in rows],
    }
  if "medusa" in per and "vanilla" in per:
    van, med = results["modes"]["vanilla"], results["modes"]["medusa"]
    med["overhead"] = med["step_seconds"] / van["step_seconds"]
    med["speedup"] = med["tok_per_s"] / van["tok_per_s"]
    divergences = []
    for i, (rv, rm) in enumerate(zip(per["vanilla"], per["medusa"])):
      a, b = rv["tokens"], rm["tokens"]
      if a != b:
        pos = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        gap = top2_gap(loaded.cfg, loaded.params, token_lists[i], a, pos)
        divergences.append({"question_id": rv["question_id"], "position": pos, "vanilla_top2_gap": gap})
    med["identical_fraction"] = 1 - len(divergences) / len(per["vanilla"])
    med["divergences"] = divergences
  return results


def print_table(results: dict) -> None:
  cols = ["mode", "tok/s", "tokens", "steps", "tok/step", "step ms", "prefill s", "overhead", "speedup", "identical"]
  print("  ".join(f"{c:>10}" for c in cols))
  for mode, r in results["modes"].items():
    row = [mode, f"{r['tok_per_s']:.1f}", r["tokens"], r["steps"], f"{r['acceleration_rate']:.2f}",
           f"{1e3 * r['step_seconds']:.1f}", f"{r['prefill_seconds']:.2f}",
           f"{r['overhead']:.2f}" if "overhead" in r else "-", f"{r['speedup']:.2f}x" if "speedup" in r else "-",
           f"{r['identical_fraction']:.2f}" if "identical_fraction" in r else "-"]
    print("  ".join(f"{str(c):>10}" for c in row))
  for d in results["modes"].get("medusa", {}).get("divergences", []):
    print(f"  question {d['question_id']}: first differs at token {d['position']}, "
          f"vanilla top-2 logit gap there {d['vanilla_top2_gap']:.2e}")
  print(f"  hardware: {hardware.describe(results['hardware'])}")


def main(argv):
  del argv
  runtime.quiet_jax_logs()
  config = cli.config()
  loaded = runtime.load(config, heads=cli.HEADS.value, checkpoint=cli.CHECKPOINT.value)
  if _PROMPTS.value == "sharegpt_heldout":
    from medusa_jax import distill  # pylint: disable=g-import-not-at-top
    prompts = [{"question_id": p.id, "text": p.text}
               for p in distill.heldout_eval_prompts(config, loaded.tokenizer, _NUM.value)]
  else:
    prompts = runtime.read_jsonl_prompts(_PROMPTS.value, _NUM.value)
  results = run(config, prompts, _MODES.value, loaded, _BATCH.value)
  print_table(results)
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1)
    print(f"  wrote {_OUT.value}")


if __name__ == "__main__":
  entry.run(main)
