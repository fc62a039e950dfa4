r"""Decode-speed benchmark: vanilla vs Medusa on the same prompts, in the same run.

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

Under several processes (``medusa_jax.launch``, a pod slice: the same command on every host) the
model is sharded over ``config.mesh.decode_shape`` across all their devices and every host decodes
the same prompts with the others; process 0 alone prints and writes ``--out``.
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from medusa_jax import cli
from medusa_jax import entry
from medusa_jax import convert
from medusa_jax import decode, hardware, medusa, model, runtime, sharding
from medusa_jax import prompts as prompts_lib

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


def shared_prefix(a: list[int], b: list[int]) -> int:
  """How many tokens two outputs share before they first differ."""
  return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def backbone_drift(config, loaded: runtime.Loaded, token_lists, tuned_outputs: list[list[int]]) -> dict:
  """Greedy decoding with the original backbone (``config.model``) on the same prompts, against the
  tuned backbone's (Medusa-2): tokens shared before the first divergence, and how many outputs are
  identical. Quality kept means these stay high."""
  _, original, _ = convert.load_model(config.model, **runtime.model_overrides(config))
  dec = decode.Decoder(loaded.cfg, decode.sampling_from(config))
  dp = dec.prepare({"base": jax.tree.map(jnp.asarray, original)})
  outs = [dec.generate(dp, [t])[0][0] for t in token_lists]
  shared = [shared_prefix(a, b) for a, b in zip(outs, tuned_outputs)]
  return {"shared_prefix_tokens": shared, "mean_shared_prefix_tokens": float(np.mean(shared)),
          "mean_tokens": float(np.mean([len(o) for o in tuned_outputs])),
          "identical_fraction": float(np.mean([a == b for a, b in zip(outs, tuned_outputs)]))}


def compare_outputs(cfg, params, token_lists, ref_rows, rows) -> tuple[float, list[dict]]:
  """(fraction of prompts whose output equals the reference's, where and how the others differ:
  the first differing position and the reference's top-2 logit gap there)."""
  divergences = []
  for i, (rv, rm) in enumerate(zip(ref_rows, rows)):
    if rv["tokens"] != rm["tokens"]:
      pos = shared_prefix(rv["tokens"], rm["tokens"])
      divergences.append({"question_id": rv["question_id"], "position": pos,
                          "vanilla_top2_gap": top2_gap(cfg, params, token_lists[i], rv["tokens"], pos)})
  return 1 - len(divergences) / max(len(ref_rows), 1), divergences


def summarize(rows: list[dict]) -> dict:
  """One decoder's figures over its per-prompt rows (Medusa paper §7.1's definitions)."""
  tokens = sum(len(r["tokens"]) for r in rows)
  dec_tokens = sum(max(len(r["tokens"]) - 1, 0) for r in rows)
  steps = sum(r["steps"] for r in rows)  # per sequence: a batch's steps count for each of its rows
  dec_s = sum(r["decode_seconds"] for r in rows)
  return {"tok_per_s": dec_tokens / dec_s, "tokens": tokens, "steps": steps, "decode_seconds": dec_s,
          "prefill_seconds": sum(r["prefill_seconds"] for r in rows),
          "acceleration_rate": dec_tokens / max(steps, 1), "step_seconds": dec_s / max(steps, 1),
          "per_prompt": [{k: r[k] for k in ("question_id", "tokens", "steps", "decode_seconds")} for r in rows]}


def measure(entries: dict, token_lists: list[list[int]], question_ids: list, *, cfg, sampling, rng,
            batch_size: int = 1, progress: str | None = "benchmark") -> dict:
  """Decodes every prompt with every entry ``{name: (decoder, DecodeParams)}``, timed.

  Every (entry, batch shape) is compiled and run once first; then the entries take turns prompt
  group by prompt group, so machine noise hits them alike. Returns ``{name: [per-prompt rows]}``.
  """
  groups = [list(range(i, min(i + batch_size, len(token_lists)))) for i in range(0, len(token_lists), batch_size)]
  # Each decoder plans its cache with its own step size (a tree writes more rows per step), so
  # each keeps its own set of shapes.
  warmed = set()
  for g in groups:
    batch = [token_lists[i] for i in g]
    for name, (d, dp) in entries.items():
      key = (name, len(g)) + decode.plan_cache(cfg, [len(t) for t in batch], sampling.max_new_tokens, d.room)
      if key not in warmed:
        warmed.add(key)
        d.generate(dp, batch, rng)
  per = {name: [] for name in entries}
  for g in tqdm(groups, desc=progress, unit="batch", disable=progress is None):
    batch = [token_lists[i] for i in g]
    for name, (d, dp) in entries.items():
      state, t_pre = _time(d.start, dp, batch, rng)
      state, t_dec = _time(d.finish, dp, state)
      outs = decode.outputs(state)
      for j, i in enumerate(g):
        per[name].append({"question_id": question_ids[i], "tokens": outs[j], "steps": int(state.steps),
                          "decode_seconds": t_dec / len(g), "prefill_seconds": t_pre / len(g)})
  return per


def run(config, prompts: list[dict], modes: list[str], loaded: runtime.Loaded, batch_size: int = 1,
        compare_original: bool = False) -> dict:
  """Times the modes on the prompts (see the module docstring); ``compare_original`` also decodes
  with the original backbone to measure how far a tuned one (Medusa-2) drifted."""
  sampling = decode.sampling_from(config)
  entries = {}
  placement, shared = runtime.decode_placement(config, loaded)
  for mode in modes:
    if mode not in ("vanilla", "medusa"):
      raise ValueError(f"Unknown mode {mode!r}: use vanilla and/or medusa.")
    spec = medusa.spec_from(config, loaded.heads) if mode == "medusa" else None
    d = medusa.make_decoder(loaded.cfg, sampling, spec, placement=placement)
    # Prepared once; the modes share one projection backend's copy of the backbone (the CPU kernel's).
    entries[mode] = (d, d.prepare(shared))
    shared = entries[mode][1]
  token_lists = [runtime.chat_prompt(loaded.tokenizer, p["text"]) for p in prompts]
  per = measure(entries, token_lists, [p["question_id"] for p in prompts], cfg=loaded.cfg, sampling=sampling,
                rng=jax.random.PRNGKey(config.seed), batch_size=batch_size,
                progress="benchmark" if jax.process_index() == 0 else None)
  results = {"modes": {mode: summarize(rows) for mode, rows in per.items()}, "hardware": hardware.info(),
             "config": json.loads(config.to_json_best_effort()), "num_prompts": len(prompts),
             "batch_size": batch_size}
  if "medusa" in per and "vanilla" in per:
    van, med = results["modes"]["vanilla"], results["modes"]["medusa"]
    med["overhead"] = med["step_seconds"] / van["step_seconds"]
    med["speedup"] = med["tok_per_s"] / van["tok_per_s"]
    med["identical_fraction"], med["divergences"] = compare_outputs(loaded.cfg, loaded.params, token_lists,
                                                                    per["vanilla"], per["medusa"])
  if compare_original:
    tuned = per["vanilla"] if "vanilla" in per else per["medusa"]
    results["backbone_drift"] = backbone_drift(config, loaded, token_lists, [r["tokens"] for r in tuned])
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
  drift = results.get("backbone_drift")
  if drift:
    print(f"  the tuned backbone vs the original, greedy: {drift['mean_shared_prefix_tokens']:.1f} of "
          f"{drift['mean_tokens']:.1f} tokens shared before the first difference on average; "
          f"{drift['identical_fraction']:.2f} of the outputs identical")
  print(f"  hardware: {hardware.describe(results['hardware'])}")


def _includes_base(export: str) -> bool:
  with open(os.path.join(export, "export_meta.json")) as f:
    return bool(json.load(f).get("includes_base"))


_BUILTIN_PROMPTS = ("mt_bench", "sharegpt_heldout")


def check_flags(config) -> None:
  """This tool's flags, checked before the model loads (a typo should not cost the load)."""
  bad = [m for m in _MODES.value if m not in cli.MODES]
  if bad or not _MODES.value:
    raise ValueError(f"--modes {','.join(_MODES.value)}: use a comma-separated list of {', '.join(cli.MODES)}.")
  if _PROMPTS.value not in _BUILTIN_PROMPTS and not os.path.isfile(_PROMPTS.value):
    raise ValueError(f"--prompts {_PROMPTS.value}: no such file; pass an MT-Bench-style jsonl or a built-in set: "
                     f"{' or '.join(_BUILTIN_PROMPTS)}.")
  for flag in (_NUM, _BATCH):
    if flag.value < 1:
      raise ValueError(f"--{flag.name} must be at least 1, not {flag.value}.")
  if "medusa" in _MODES.value:
    cli.check_medusa(config, vanilla="--modes vanilla")


def main(argv):
  del argv
  runtime.quiet_jax_logs()
  config = cli.config()
  check_flags(config)
  sharding.maybe_initialize_distributed(config)  # before anything touches the devices
  # A prompts file is read before the model loads: a malformed one costs a second, not the load.
  prompts = None if _PROMPTS.value == "sharegpt_heldout" else runtime.read_jsonl_prompts(_PROMPTS.value, _NUM.value)
  loaded = runtime.load(config, heads=cli.HEADS.value, checkpoint=cli.CHECKPOINT.value)
  if prompts is None:  # rendered with the tokenizer, so after the load
    prompts = [{"question_id": p.id, "text": p.text}
               for p in prompts_lib.heldout_eval_prompts(config, loaded.tokenizer, _NUM.value)]
  # An export that holds a trained backbone (Medusa-2): also measure how far it moved from the original.
  tuned = cli.CHECKPOINT.value and "base" in loaded.params and _includes_base(cli.CHECKPOINT.value)
  results = run(config, prompts, _MODES.value, loaded, _BATCH.value, compare_original=bool(tuned))
  if jax.process_index() != 0:  # every host holds the same results: one prints and writes them
    return
  print_table(results)
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1)
    print(f"  wrote {_OUT.value}")


def run_cli():
  """The console script (`medusa-benchmark`): `main` with one-line errors."""
  entry.run(main)


if __name__ == "__main__":
  run_cli()
