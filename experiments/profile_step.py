"""Where one decode step's time goes on this machine: in-situ ablations of the real jitted step.

  .venv/bin/python experiments/profile_step.py --config configs/smollm2_medusa1.py \
      --checkpoint runs/smollm2_medusa1/export --trees "chain:3,[[0],[0,0],[1],[0,0,0],[2],[0,1],[1,0]]"

Each row times the step the decoders run (vanilla, and a Medusa step per tree) with one kind of
work replaced by a near-free stand-in of the same shape, so its cost is the drop in step time:
the weight projections (the CPU kernel or XLA's dot), attention over the cache, the cache writes,
the norms / RoPE / SiLU, the heads' draft, and (Medusa) acceptance, commit and emission. What is
left after all of them is the cost of everything else in the program (XLA's op boundaries, copies,
the rest of the loop state). Every ablated step's program must differ from the whole step's, so a
stand-in that does not reach the traced step stops the run instead of timing noise as a cost.
Components are measured one at a time: removing one can change what XLA fuses around it, so they
need not add up exactly. Steps alternate within each round so that machine noise hits all alike;
medians of ``--runs`` rounds. Prints one table (ms) and writes JSON with ``--out``. With
``--xla_attention`` it also times each whole step with XLA's attention in place of the CPU backend's
(``cpu_attention.cc``), in the same rounds; ``--max_new_tokens`` sizes the cache it reads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp

from medusa_jax import backends, decode, hardware, medusa, model, runtime
from medusa_jax import tree as tree_lib
from medusa_jax.backends.cpu import kernel


def _cheap(x, w):
  """A stand-in for x @ w (w plain [in, ...]) of the right shape that reads no weight."""
  out = x.shape[:-1] + w.shape[1:]
  return jnp.broadcast_to(x[..., :1], x.shape[:-1] + (math.prod(w.shape[1:]),)).reshape(out) * 1e-3


@contextlib.contextmanager
def ablate(name: str):
  """Replaces one kind of work inside ``model`` / ``medusa`` while the step is traced."""
  saved = []

  def patch(obj, attr, fn):
    saved.append((obj, attr, getattr(obj, attr)))
    setattr(obj, attr, fn)

  if name == "projections":  # the seam (the CPU kernel or XLA's dot), and the tied LM head's argmax
    patch(backends, "project", lambda x, ws, *a, **kw: tuple(_cheap(x, w) for w in ws))
    real_einsum = jnp.einsum

    def einsum(eq, a, b, **kw):
      if eq == "vd,bld->vbl":  # model.greedy_tokens, vocabulary-major
        return jnp.broadcast_to(b[..., 0][None], (a.shape[0],) + b.shape[:2]) * 1e-3
      return real_einsum(eq, a, b, **kw)

    patch(model.jnp, "einsum", einsum)
  elif name == "attention":
    patch(model, "_attention", lambda cfg, q, k, v, mask, prepared=None: q)
  elif name == "cache writes":
    patch(model, "write_cache_rows", lambda cache, new, index: cache)
  elif name == "norms, RoPE, SiLU":
    patch(model, "rms_norm", lambda x, w, eps: x)
    patch(model, "apply_rope", lambda x, positions, inv_freq: x)
    patch(model.jax.nn, "silu", lambda x: x)
  elif name == "heads draft":
    patch(medusa, "draft", lambda spec, cfg, dp, state: jnp.broadcast_to(
        state.last_B[:, None], (state.last_B.shape[0], spec.tree.num_nodes)))
  elif name == "accept, commit, emit":
    def accept(spec, cfg, dp, tokens, hidden):
      # The nodes' argmax through the LM head stays: it is a projection, counted in its own row.
      top = model.greedy_tokens(cfg, dp.params["base"], hidden, dp.prepared)
      zero = jnp.zeros_like(tokens[:, 0])
      return medusa.Accepted(zero, zero, zero, top[:, 0])

    patch(medusa, "accept_greedy", accept)
    patch(medusa, "commit", lambda spec, cache, acc, live: model.advance(cache, live.astype(jnp.int32)))
  elif name == XLA_ATTENTION:  # not an ablation: the whole step with XLA's attention instead of a backend's
    patch(backends, "attend", lambda *a, **kw: None)
  elif name != "none":
    raise ValueError(name)
  try:
    yield
  finally:
    for obj, attr, fn in reversed(saved):
      setattr(obj, attr, fn)


XLA_ATTENTION = "step, XLA's attention"
ABLATIONS = ("none", "projections", "attention", "cache writes", "norms, RoPE, SiLU", "heads draft",
             "accept, commit, emit")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", default="configs/smollm2_medusa1.py")
  ap.add_argument("--checkpoint", default=None, help="a training export (heads); random heads without one")
  ap.add_argument("--trees", default="chain:3,[[0],[0,0],[1],[0,0,0],[2],[0,1],[1,0]]",
                  help="comma-separated Medusa trees (chain:N, dense:k,d, a JSON file or a JSON list)")
  ap.add_argument("--prompt_tokens", type=int, default=96, help="prompt length: the cache the attention reads")
  ap.add_argument("--max_new_tokens", type=int, default=128)
  ap.add_argument("--runs", type=int, default=15)
  ap.add_argument("--xla_attention", action="store_true",
                  help="also time each whole step with XLA's attention in place of the CPU backend's "
                       "(as MEDUSA_JAX_CPU_ATTENTION=0 does), in the same rounds: an A/B of that kernel")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)

  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
  fv(["prog", f"--config={args.config}"])
  config = holder.value
  loaded = runtime.load(config, heads=None if args.checkpoint else "random", checkpoint=args.checkpoint)
  cfg, hcfg = loaded.cfg, loaded.heads
  trees = []
  for spec in _split_trees(args.trees):
    trees.append(tree_lib.resolve(json.loads(spec) if spec.startswith("[") else spec, num_heads=hcfg.num_heads))
  sampling = decode.Sampling(max_new_tokens=args.max_new_tokens)
  prompt = [int(t) % cfg.vocab_size for t in range(7, 7 + args.prompt_tokens)]
  modes = [("vanilla", None)] + [(f"medusa {t.num_nodes} nodes", medusa.MedusaSpec(heads=hcfg, tree=t)) for t in trees]

  shared = loaded.params
  programs, hlo = {}, {}
  for ab in ABLATIONS + ((XLA_ATTENTION,) if args.xla_attention else ()):
    for label, spec in modes:
      if spec is None and ab in ("heads draft", "accept, commit, emit"):
        continue
      dec = medusa.make_decoder(cfg, sampling, spec)
      dp = shared = dec.prepare(shared)
      state = dec.start(dp, [prompt])
      with ablate(ab):
        step = jax.jit(dec.step, donate_argnums=(1,))
        hlo[ab, label] = step.lower(dp, state).as_text()
        state = jax.block_until_ready(step(dp, state))  # traced and compiled under the ablation
      programs[ab, label] = [step, dp, state]
  # A stand-in that never reached the traced step would time noise as a cost: refuse it.
  unchanged = [k for k in hlo if k[0] != "none" and hlo[k] == hlo["none", k[1]]]
  if unchanged:
    raise SystemExit(f"these ablations left the step's program unchanged (a stand-in did not reach it): {unchanged}")
  times = {k: [] for k in programs}
  for _ in range(args.runs):
    for k, prog in programs.items():
      step, dp, state = prog
      t = time.perf_counter()
      prog[2] = jax.block_until_ready(step(dp, state))
      times[k].append(time.perf_counter() - t)
  ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}

  labels = [label for label, _ in modes]
  print(f"{'component (ms)':<24}" + "".join(f"{l:>18}" for l in labels))
  full = {l: ms["none", l] for l in labels}
  print(f"{'whole step':<24}" + "".join(f"{full[l]:>18.2f}" for l in labels))
  rest = dict(full)
  for ab in ABLATIONS[1:]:
    row = []
    for l in labels:
      if (ab, l) in ms:
        cost = full[l] - ms[ab, l]
        rest[l] -= cost
        row.append(f"{cost:>18.2f}")
      else:
        row.append(f"{'-':>18}")
    print(f"{ab:<24}" + "".join(row))
  print(f"{'everything else':<24}" + "".join(f"{rest[l]:>18.2f}" for l in labels))
  if args.xla_attention:
    print(f"{XLA_ATTENTION:<24}" + "".join(f"{ms[XLA_ATTENTION, l]:>18.2f}" for l in labels))
    print(f"{'  each / vanilla':<24}" + "".join(f"{ms[XLA_ATTENTION, l] / ms[XLA_ATTENTION, 'vanilla']:>17.2f}x" for l in labels))
  print(f"{'whole step / vanilla':<24}" + "".join(f"{full[l] / full['vanilla']:>17.2f}x" for l in labels))
  print(f"kernel: {'on, <= %d rows' % kernel.max_rows() if shared.prepared is not None else 'off'}; "
        f"prompt {args.prompt_tokens} tokens, cache {model.cache_capacity(programs['none', 'vanilla'][2].cache)} rows; "
        f"{hardware.describe()}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"ms": {f"{a}|{l}": v for (a, l), v in ms.items()}, "hardware": hardware.info(),
                 "trees": [t.choices for t in trees]}, f, indent=1)


def _split_trees(text: str) -> list[str]:
  """Splits on commas outside brackets and after a name's own arguments (dense:2,2 stays whole)."""
  out, depth, cur = [], 0, ""
  for ch in text:
    depth += ch == "["
    depth -= ch == "]"
    if ch == "," and depth == 0 and not cur.startswith("dense:"):
      out.append(cur)
      cur = ""
    elif ch == "," and depth == 0 and cur.startswith("dense:") and cur.count(",") >= 1:
      out.append(cur)
      cur = ""
    else:
      cur += ch
  if cur:
    out.append(cur)
  return out


if __name__ == "__main__":
  main()
