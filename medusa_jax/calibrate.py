r"""Optimised tree: measure how often each head's rank-r guess is right, and size the tree for this hardware.

  python -m medusa_jax.calibrate --config configs/smollm2.py --checkpoint runs/m1/export --nodes auto \
      --out runs/cal/tree.json
  python -m medusa_jax.generate --config configs/smollm2.py --checkpoint runs/m1/export --mode medusa \
      --tree runs/cal/tree.json --prompt "Why is the sky blue?"

Steps (the Medusa paper's optimised tree construction, Cai et al. 2024, measured on this model):

1. Greedy vanilla decoding of held-out ShareGPT first turns (``data.is_heldout``; never the
   distillation prompts, never MT-Bench), batched.
2. One teacher-forced forward over prompt + generated text gives the final hidden state at every
   position the heads are read at while decoding: the last prompt token (the prefill) and each
   generated token. At such a position t, head k (1-based) guesses the token at t+k+1; we record
   the rank of the token greedy decoding actually produced there, counting only targets inside the
   generated text. ``accuracy[k-1, r]`` is the frequency of rank r. The backbone's own rank of the
   token at t+1 is recorded too: it must be 0 everywhere (the text is its greedy output), which
   checks the alignment.
3. ``tree.grow_tree`` adds nodes greedily by their value, so one call gives the best tree of every
   size 2..N, and its expected tokens per step (1 + sum of values). A node's value is by default
   the measured frequency of its whole path being right (``--estimate joint``); the paper's product
   of per-head accuracies (``--estimate product``) assumes heads err independently, which they do
   not: it underrates deep paths and picks trees that are too shallow. With joint measurements the
   tokens per step of each size are then simulated by walking every generation as greedy decoding
   would (``simulate_tokens_per_step``): accepted runs cluster, so a per-position average overrates
   the per-step figure the benchmark measures.
4. The cost of one decoding step is measured on this hardware for a few sizes (the vanilla step for
   1 node, the Medusa step with that tree otherwise: the tree-verification forward plus candidate
   selection, acceptance and the cache commit), batch 1, with a cache sized for the calibration
   prompts. Expected speedup = expected tokens/step x t(1) / t(N); ``--nodes auto`` picks the size
   with the best one.

The tree file (``tree.save_choices``) holds the chosen tree's paths under ``choices`` and the
measurements beside them; ``--tree FILE`` in generate/benchmark reads it.
"""

from __future__ import annotations

import itertools
import logging
import os
import statistics
import time
from typing import Callable, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import decode
from medusa_jax import hardware
from medusa_jax import heads as heads_lib
from medusa_jax import medusa
from medusa_jax import model as model_lib
from medusa_jax import prompts as prompts_lib
from medusa_jax import runtime
from medusa_jax import tree as tree_lib

_log = logging.getLogger("medusa_jax.calibrate")  # not __name__: that is __main__ under -m

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64)
ESTIMATES = ("joint", "product")
# Bytes of [B, C, M+1, V] float32 logits processed at once; V = 49152 makes this the memory peak.
_LOGITS_BUDGET = 1 << 28


# ----------------------------------------------------------------------------------------------
# Head accuracy
# ----------------------------------------------------------------------------------------------

def generation_targets(generations: Sequence[Sequence[int]], num_heads: int, length: int | None = None):
  """What each head should have predicted at each decoding position.

  Position j of a sequence is the one whose hidden state produced generated token j (j = 0 is the
  last prompt token). There the backbone (k = 0) predicts generated token j and head k token j+k.

  Returns:
    targets [B, J, M+1] int32 (0 where invalid) and valid [B, J, M+1] bool (the target lies inside
    the generated text), with J = ``length`` or the longest generation.
  """
  B = len(generations)
  J = length or max([len(g) for g in generations] + [1])
  padded = np.zeros((B, J + num_heads), np.int32)
  n = np.zeros((B,), np.int64)
  for b, g in enumerate(generations):
    g = list(g)[:J]
    padded[b, :len(g)] = g
    n[b] = len(g)
  k = np.arange(num_heads + 1)
  j = np.arange(J)
  targets = np.stack([padded[:, i:i + J] for i in k], axis=-1)
  valid = (j[None, :, None] + k[None, None, :]) < n[:, None, None]
  return np.where(valid, targets, 0).astype(np.int32), valid


def rank_histogram(ranks_BxJxK, valid_BxJxK, num_ranks: int) -> np.ndarray:
  """[K, R+1] counts of each rank 0..R-1, the last column counting ranks >= R."""
  ranks = np.minimum(np.asarray(ranks_BxJxK), num_ranks)
  valid = np.asarray(valid_BxJxK, bool)
  return np.stack([np.bincount(ranks[..., k][valid[..., k]], minlength=num_ranks + 1)
                   for k in range(ranks.shape[-1])])


def accuracy_table(counts_KxR1: np.ndarray) -> np.ndarray:
  """Frequencies of ranks 0..R-1 (rows: whatever the counts' rows are); 0 for a row with no data."""
  counts = np.asarray(counts_KxR1, np.float64)
  total = counts.sum(axis=1, keepdims=True)
  return np.where(total > 0, counts[:, :-1] / np.maximum(total, 1), 0.0)


def rank_counts(cfg, hcfg, params, prompts: Sequence[Sequence[int]], generations: Sequence[Sequence[int]],
                *, num_ranks: int, batch_size: int = 16, logits_fn: Callable | None = None,
                ranks_out: list | None = None) -> np.ndarray:
  """Teacher-forced rank counts: [M+1, R+1]; row 0 is the backbone, row k head k.

  Args:
    cfg, hcfg, params: the backbone config, heads config and ``{'base', 'medusa'}`` params.
    prompts, generations: token ids of each prompt and of what greedy decoding generated after it.
    num_ranks: R; ranks >= R are counted together in the last column.
    batch_size: sequences per forward.
    logits_fn: ``heads.logits``-compatible function (a test hook); ``heads.logits`` by default.
    ranks_out: if a list, one [n, M] array per sequence is appended to it: the heads' ranks at each
      position whose head-1 target lies inside the generated text, in order (R where a rank is >= R
      or the target lies beyond the text): the joint measurements ``tree.grow_tree`` and
      ``simulate_tokens_per_step`` use.
  """
  logits_fn = logits_fn or heads_lib.logits
  M, V = hcfg.num_heads, cfg.vocab_size
  J = max([len(g) for g in generations] + [1])
  B = max(1, min(batch_size, len(prompts)))
  # Positions per rank chunk: a power of two so that it divides the padded length.
  C = 1 << max(0, int(np.log2(max(1, _LOGITS_BUDGET // (B * (M + 1) * V * 4)))))
  C = min(C, 1 << int(np.ceil(np.log2(J))))
  J = -(-J // C) * C

  @jax.jit
  def hidden_at(params, tokens_BxL, lengths_B, gather_BxJ):
    """(the backbone's hidden states, the heads' inputs) at the gathered positions: they differ with
    the heads' prefix layer, which runs over the whole sequence first, as in training."""
    L = tokens_BxL.shape[1]
    positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), tokens_BxL.shape)
    mask = model_lib.causal_mask(lengths_B, L)
    _, hidden, _ = model_lib.forward(cfg, params["base"], tokens_BxL, positions, mask, logits=False)
    heads_in = heads_lib.heads_input(hcfg, cfg, params, hidden, positions, mask)
    gather = lambda x: jnp.take_along_axis(x, gather_BxJ[:, :, None], axis=1)
    return gather(hidden), gather(heads_in)

  # Built per call (not at module level) so that a different logits_fn is never served a stale trace.
  @jax.jit
  def ranks_of(params, hidden_BxCxD, heads_in_BxCxD, targets_BxCxK):
    base = model_lib.project_logits(cfg, params["base"], hidden_BxCxD).astype(jnp.float32)
    # Columns 0 .. M-1 of the targets are the tokens t+1 .. t+M that greedy decoding produced: the
    # path next-token and sequential heads read (teacher forcing, as in training). A sequential
    # head's rank is then conditional on the path before it being right, which is exactly when
    # decoding would verify its guess.
    heads = logits_fn(hcfg, cfg, params, heads_in_BxCxD, targets_BxCxK[..., :hcfg.num_heads])
    logits = jnp.concatenate([base[:, :, None], heads.astype(jnp.float32)], axis=2)  # [B, C, M+1, V]
    target = jnp.take_along_axis(logits, targets_BxCxK[..., None], axis=-1)
    return jnp.sum(logits > target, axis=-1, dtype=jnp.int32)

  counts = np.zeros((M + 1, num_ranks + 1), np.int64)
  for start in range(0, len(prompts), B):
    rows = list(range(start, min(start + B, len(prompts))))
    pad = B - len(rows)
    seqs = [list(prompts[i]) + list(generations[i]) for i in rows] + [list(prompts[rows[-1]])] * pad
    gens = [generations[i] for i in rows] + [[]] * pad  # padding rows have no valid target
    lengths = np.array([len(s) for s in seqs], np.int32)
    tokens, _ = decode.pad_prompts(seqs, decode.bucket(int(lengths.max())))
    plen = np.array([len(prompts[i]) for i in rows] + [len(prompts[rows[-1]])] * pad)
    gather = np.minimum(plen[:, None] - 1 + np.arange(J)[None, :], tokens.shape[1] - 1).astype(np.int32)
    hidden, heads_in = hidden_at(params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(gather))
    targets, valid = generation_targets(gens, M, J)
    heads_ranks = np.full((B, J, M), num_ranks, np.int64)
    for c in range(0, J, C):
      if not valid[:, c:c + C].any():
        continue
      ranks = np.asarray(ranks_of(params, hidden[:, c:c + C], heads_in[:, c:c + C], jnp.asarray(targets[:, c:c + C])))
      counts += rank_histogram(ranks, valid[:, c:c + C], num_ranks)
      v = valid[:, c:c + C, 1:]
      heads_ranks[:, c:c + C] = np.where(v, np.minimum(ranks[..., 1:], num_ranks), num_ranks)
    if ranks_out is not None:
      ranks_out.extend(heads_ranks[b][valid[b, :, 1]] for b in range(len(rows)))
  return counts


def top1_given_path(ranks_NxM: np.ndarray) -> list[float]:
  """Per depth k: how often head k's top-1 is right at the positions where heads 1..k-1 all were,
  i.e. given an accepted prefix (what a chain verifies; sequential heads read that prefix)."""
  ranks = np.asarray(ranks_NxM)
  out = []
  for k in range(ranks.shape[1]):
    given = np.all(ranks[:, :k] == 0, axis=1)
    out.append(float(np.mean(ranks[given, k] == 0)) if given.any() else 0.0)
  return out


def simulate_steps(ranks_per_sequence: Sequence[np.ndarray], choices: Sequence[Sequence[int]]) -> np.ndarray:
  """Decoding steps (after the prefill) greedy Medusa decoding with ``choices`` takes for each
  measured generation: int64 [number of sequences].

  ``ranks_per_sequence`` is ``rank_counts``' ``ranks_out``: a generation of n tokens has n - 1 rows,
  row j the heads' ranks at position j (ranks beyond the text are never in the tree). Decoding
  reads the heads only where a step ends: after accepting d tokens at position j the next step
  starts at j + d + 1, so the positions inside an accepted run are never drafted from. The walk
  stops where the decoder stops, once j reaches n - 1 (the last token was emitted): a last step
  whose accepted run the decoder cut at ``max_new_tokens`` or an EOS is cut here by the text's end,
  so it counts once in both.
  """
  tree = {tuple(c) for c in choices}
  out = np.zeros((len(ranks_per_sequence),), np.int64)
  for b, ranks in enumerate(ranks_per_sequence):
    ranks = np.asarray(ranks)
    n, j = len(ranks), 0
    while j < n:
      d = 0
      while d < ranks.shape[1] and tuple(ranks[j, :d + 1]) in tree:
        d += 1
      j += d + 1
      out[b] += 1
  return out


def simulate_tokens_per_step(ranks_per_sequence: Sequence[np.ndarray], choices: Sequence[Sequence[int]]) -> float:
  """Tokens per step of greedy Medusa decoding with ``choices`` over the measured generations.

  Long accepted runs cluster (repetitive stretches), so the average over *steps* is lower than the
  average over *positions* that the node values sum to; walking each generation as decoding would
  (``simulate_steps``) gives the figure the benchmark measures (teacher-forced ranks are what the
  heads see there). Tokens are counted as the benchmark counts them: those the steps emitted, not
  the prefill's first one.
  """
  steps = int(simulate_steps(ranks_per_sequence, choices).sum())
  positions = sum(len(r) for r in ranks_per_sequence)
  return positions / steps if steps else 1.0


# ----------------------------------------------------------------------------------------------
# Tree sizes and step costs
# ----------------------------------------------------------------------------------------------

def grow(accuracy_MxR: np.ndarray, max_nodes: int, ranks_NxM: np.ndarray | None = None
         ) -> tuple[list[list[int]], list[float]]:
  """The greedy tree of ``max_nodes`` nodes and the expected tokens/step of every size 1..max_nodes.

  ``expected[n-1]`` is the size-n tree's value (size 1, the root alone, is vanilla decoding: 1.0);
  its paths are ``choices[:n-1]``. With ``ranks_NxM`` node values are measured path frequencies
  (``tree.grow_tree``), else products of per-head accuracies.
  """
  if max_nodes < 2:
    return [], [1.0]
  choices, lengths = tree_lib.grow_tree(accuracy_MxR, max_nodes, ranks_NxM)
  return choices, [1.0] + [float(x) for x in lengths]


def measure_step_costs(cfg, hcfg, params, choices: Sequence[Sequence[int]], sizes: Sequence[int],
                       prompt: Sequence[int], max_new_tokens: int, *, runs: int = 10,
                       warmup: int = 2) -> dict[int, float]:
  """Median seconds of one decoding step (batch 1) with a tree of each size; size 1 is vanilla.

  The state comes from a real prefill of ``prompt`` with a cache planned for ``max_new_tokens``,
  so the attention reads as many cache rows as it would while decoding such a prompt. Every size is
  compiled and warmed up first; then the sizes take turns, one step each per round, so that a burst
  of machine noise hits all of them alike.
  """
  sampling = decode.Sampling(temperature=0.0, max_new_tokens=max_new_tokens)
  steps, states, dparams = {}, {}, {}
  shared = params
  for n in sizes:
    spec = None
    if n > 1:
      spec = medusa.MedusaSpec(heads=hcfg, tree=tree_lib.build(choices[:n - 1], num_heads=hcfg.num_heads))
    decoder = medusa.make_decoder(cfg, sampling, spec)
    # Exactly what the decoder runs: its prepared params (one backend copy of the backbone shared by all sizes,
    # each size's own head weights) and the jitted step of its loop (the state donated, as there).
    dparams[n] = shared = decoder.prepare(shared)
    states[n] = decoder.start(dparams[n], [list(prompt)])
    steps[n] = decoder.state_programs(dparams[n], states[n])[0]
    for _ in range(warmup):
      states[n] = jax.block_until_ready(steps[n](dparams[n], states[n]))
  times = {n: [] for n in sizes}
  for _ in range(runs):
    for n in sizes:
      t = time.perf_counter()
      states[n] = jax.block_until_ready(steps[n](dparams[n], states[n]))
      times[n].append(time.perf_counter() - t)
  costs = {n: statistics.median(ts) for n, ts in times.items()}
  _log.info("step ms by tree size: %s", {n: round(1e3 * c, 2) for n, c in costs.items()})
  return costs


def speedup_table(expected: Sequence[float], step_seconds: dict[int, float]) -> list[dict]:
  """Rows ``{nodes, tokens_per_step, step_ms, speedup}`` for each measured size (needs size 1)."""
  if 1 not in step_seconds:
    raise ValueError("The vanilla step (1 node) must be measured: speedups are relative to it.")
  t1 = step_seconds[1]
  return [{"nodes": n, "tokens_per_step": expected[n - 1], "step_ms": 1e3 * s,
           "speedup": expected[n - 1] * t1 / s} for n, s in sorted(step_seconds.items())]


def best_size(rows: Sequence[dict]) -> int:
  """The measured tree size (at least 2 nodes: a tree file needs a node) with the best speedup."""
  trees = [r for r in rows if r["nodes"] >= 2]
  if not trees:
    raise ValueError("No tree size of at least 2 nodes was measured.")
  return max(trees, key=lambda r: (r["speedup"], -r["nodes"]))["nodes"]


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def calibrate(config, loaded: runtime.Loaded, *, num_nodes: int | None = None, max_nodes: int = 64,
              num_prompts: int = 32, max_new_tokens: int = 128, num_ranks: int = 10, batch_size: int = 16,
              sizes: Sequence[int] = DEFAULT_SIZES, runs: int = 10, out: str | None = None, plot: bool = True,
              sharegpt_path: str | None = None, source: str | None = None, estimate: str = "joint") -> dict:
  """Calibrates the heads of ``loaded`` and returns ``{'choices', 'meta', 'table', 'accuracy'}``.

  Args:
    config: a ConfigDict (``data.heldout_fraction`` picks the prompts, ``distill.max_prompt_len``
      caps their length).
    loaded: ``runtime.load(...)``: backbone, heads and tokenizer.
    num_nodes: tree size to write (root included); None or 0 picks the measured size with the best
      expected speedup (up to ``max_nodes``).
    max_nodes: the largest size considered with ``num_nodes`` None.
    num_prompts, max_new_tokens: held-out prompts decoded, and tokens generated for each.
    num_ranks: R, ranks per head in the accuracy table (the tree uses no rank beyond it).
    batch_size: sequences decoded (and teacher-forced) together.
    sizes: tree sizes whose step cost is measured (clipped to the largest size; 1 and the chosen
      size are always measured).
    runs: timed steps per size (median).
    out: write the tree JSON here (and a PNG of the speedups beside it with ``plot``).
    sharegpt_path: a ShareGPT JSON file; the bundled ShareGPT V3 by default.
    source: what the heads are (e.g. the checkpoint path), recorded in the metadata.
    estimate: how a path's acceptance is estimated: 'joint' (the measured frequency of the whole
      path) or 'product' (the paper's product of per-head accuracies, which assumes heads err
      independently and underrates deep paths).
  """
  if estimate not in ESTIMATES:
    raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
  cfg, hcfg, tok = loaded.cfg, loaded.heads, loaded.tokenizer
  if tok is None:
    raise ValueError(f"Model {config.model!r} has no tokenizer: calibration needs its chat template.")
  top = int(num_nodes or max_nodes)
  if top < 2:
    raise ValueError(f"A tree needs at least 2 nodes (the root and one candidate), got {top}.")

  # --- held-out prompts and their greedy continuations -----------------------------------------
  prompts = list(itertools.islice(prompts_lib.sharegpt_prompts(
      tok, split="heldout", heldout_fraction=float(config.data.heldout_fraction),
      max_prompt_len=int(config.distill.max_prompt_len), path=sharegpt_path), num_prompts))
  if not prompts:
    raise ValueError("No held-out ShareGPT prompts: is config.data.heldout_fraction 0?")
  token_lists = [list(p.tokens) for p in prompts]
  decoder = decode.Decoder(cfg, decode.Sampling(temperature=0.0, max_new_tokens=max_new_tokens))
  B = min(batch_size, len(prompts))
  generations: list[list[int]] = [[] for _ in prompts]
  t0 = time.perf_counter()
  vanilla_params = decoder.prepare(loaded.params)
  for idx, outs in decode.batched_generate(decoder, vanilla_params, token_lists, B, jax.random.PRNGKey(0)):
    for i, o in zip(idx, outs):
      generations[i] = o
  gen_s = time.perf_counter() - t0
  _log.info("Generated %d tokens for %d prompts in %.1f s.", sum(map(len, generations)), len(prompts), gen_s)

  # --- accuracies and the greedy tree ----------------------------------------------------------
  measured_ranks: list = []
  counts = rank_counts(cfg, hcfg, loaded.params, token_lists, generations, num_ranks=num_ranks, batch_size=B,
                       ranks_out=measured_ranks)
  table = accuracy_table(counts)
  backbone_top1, accuracy = float(table[0, 0]), table[1:]
  if backbone_top1 < 0.99:
    # Teacher-forced argmax should reproduce greedy decoding; fp32 near-ties aside, anything less
    # means the targets are misaligned.
    _log.warning("The backbone's teacher-forced top-1 agrees with its own greedy output only %.3f of "
                 "the time.", backbone_top1)
  joint = np.concatenate(measured_ranks) if estimate == "joint" and measured_ranks else None
  choices, expected = grow(accuracy, top, joint)
  if joint is not None:
    # The node values sum to tokens per *position*; decoding averages over steps (see the function).
    expected = [1.0] + [simulate_tokens_per_step(measured_ranks, choices[:n - 1]) for n in range(2, len(expected) + 1)]

  # --- step costs on this hardware ---------------------------------------------------------------
  measured = sorted({s for s in sizes if 1 <= s <= top} | {1, top} | ({int(num_nodes)} if num_nodes else set()))
  median_prompt = sorted(token_lists, key=len)[len(token_lists) // 2]
  costs = measure_step_costs(cfg, hcfg, vanilla_params, choices, measured, median_prompt, max_new_tokens, runs=runs)
  rows = speedup_table(expected, costs)
  best = best_size(rows)
  chosen = int(num_nodes) if num_nodes else best

  cum = np.cumsum(accuracy, axis=1)
  given_path = top1_given_path(np.concatenate(measured_ranks)) if measured_ranks else []
  meta = {
      "num_nodes": chosen,
      "best_measured_nodes": best,
      "vanilla_is_faster": max(r["speedup"] for r in rows if r["nodes"] >= 2) < 1.0,
      "expected_tokens_per_step": expected,           # index n-1: tree of n nodes
      "grown_choices": choices,                        # the best tree of n nodes is the first n-1
      "step_ms": {str(r["nodes"]): r["step_ms"] for r in rows},
      "expected_speedup": {str(r["nodes"]): r["speedup"] for r in rows},
      "head_accuracy": accuracy.tolist(),              # [M, R]: frequency of rank r for head k+1
      "head_topk_accuracy": cum[:, :5].tolist(),       # cumulative top-1..5
      "head_top1_given_path": given_path,              # head k's top-1 where heads 1..k-1 were all right
      "backbone_top1": backbone_top1,
      "positions_per_head": counts[1:].sum(axis=1).tolist(),
      "estimate": "joint" if joint is not None else "product",
      "calibration": {"prompts": len(prompts), "split": "sharegpt heldout",
                      "heldout_fraction": float(config.data.heldout_fraction), "max_new_tokens": max_new_tokens,
                      "num_ranks": num_ranks, "generated_tokens": sum(map(len, generations)),
                      "model": config.model, "heads": source, "dtype": config.dtype},
      "hardware": hardware.info(),
  }
  result = {"choices": choices[:chosen - 1], "meta": meta, "table": rows, "accuracy": accuracy}
  if out:
    tree_lib.save_choices(out, result["choices"], meta)
    if plot:
      result["plot"] = _plot(os.path.splitext(out)[0] + ".png", rows, expected, chosen)
  return result


def _plot(path: str, rows: Sequence[dict], expected: Sequence[float], chosen: int) -> str | None:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    _log.warning("matplotlib is not installed: no plot.")
    return None
  fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
  ax.plot(range(1, len(expected) + 1), expected, color="0.6", label="expected tokens/step")
  ax.plot([r["nodes"] for r in rows], [r["speedup"] for r in rows], "o-", label="expected speedup")
  ax.axvline(chosen, color="C3", lw=0.8, ls="--", label=f"chosen: {chosen} nodes")
  ax.axhline(1.0, color="k", lw=0.5)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("tree nodes")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def print_report(result: dict) -> None:
  meta = result["meta"]
  acc = np.asarray(meta["head_topk_accuracy"])
  print(f"path values: {meta.get('estimate', 'product')}; "
        f"per-head accuracy on {meta['calibration']['prompts']} held-out prompts "
        f"(backbone top-1 check: {meta['backbone_top1']:.3f}):")
  given = meta.get("head_top1_given_path") or [None] * len(acc)
  for k, (row, n, g) in enumerate(zip(acc, meta["positions_per_head"], given), 1):
    print(f"  head {k}: top-1 {row[0]:.3f}  top-5 {row[min(4, len(row) - 1)]:.3f}"
          + (f"  top-1 given heads 1..{k - 1} right {g:.3f}" if g is not None and k > 1 else "")
          + f"  ({n} positions)")
  print(f"{'nodes':>6} | {'expected tokens/step':>20} | {'step ms':>8} | {'expected speedup':>16}")
  for r in result["table"]:
    mark = []
    if r["nodes"] == meta["best_measured_nodes"]:
      mark.append("best")
    if r["nodes"] == meta["num_nodes"]:
      mark.append("chosen")
    print(f"{r['nodes']:>6} | {r['tokens_per_step']:>20.3f} | {r['step_ms']:>8.2f} | {r['speedup']:>15.3f}x"
          + (f"  <- {', '.join(mark)}" if mark else ""))
  if meta["vanilla_is_faster"]:
    print("  no tree beats vanilla decoding with these heads on this hardware")
  print(f"  hardware: {hardware.describe(meta['hardware'])}")


def main(argv):
  del argv
  from medusa_jax import cli  # pylint: disable=g-import-not-at-top
  runtime.quiet_jax_logs()
  # Our own progress lines stay on (quiet_jax_logs lowers absl's verbosity for the libraries).
  logging.getLogger("medusa_jax").setLevel(logging.INFO)
  f = flags.FLAGS
  config = cli.config()
  cli.check_medusa(config, vanilla=None)  # before the load: untrained heads would calibrate nothing
  nodes = f.nodes.strip().lower()
  if nodes not in ("auto", "0") and not nodes.isdigit():
    raise ValueError(f"--nodes must be a number of nodes, 0 or 'auto', not {f.nodes!r}.")
  loaded = runtime.load(config, heads=cli.HEADS.value, checkpoint=cli.CHECKPOINT.value)
  max_new = int(config.decode.max_new_tokens)  # --max_new_tokens lands here through cli.config()
  result = calibrate(
      config, loaded, num_nodes=0 if nodes == "auto" else int(nodes), max_nodes=f.max_nodes,
      num_prompts=f.num_prompts, max_new_tokens=max_new, num_ranks=f.num_ranks, batch_size=f.batch_size,
      sizes=[int(s) for s in f.sizes], runs=f.runs, out=f.out, plot=f.plot,
      source=cli.CHECKPOINT.value or cli.HEADS.value, estimate=f.estimate)
  print_report(result)
  if f.out:
    print(f"  wrote {f.out}" + (f" and {result['plot']}" if result.get("plot") else ""))


def run_cli():
  """The command (`python -m medusa_jax.calibrate`, the `medusa-calibrate` script).

  Flags are defined only when run as a program, so importing this module (notebooks, tests,
  other CLIs with their own --num_prompts or --out) defines none.
  """
  from medusa_jax import cli  # pylint: disable=g-import-not-at-top,unused-import  (defines --config etc.)
  from medusa_jax import entry  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("nodes", "auto", "Tree size to write, root included; 0 or 'auto' picks the measured "
                      "size with the best expected speedup.")
  flags.DEFINE_integer("max_nodes", 64, "Largest tree considered by --nodes auto.")
  flags.DEFINE_integer("num_prompts", 32, "Held-out ShareGPT prompts to decode.")
  flags.DEFINE_integer("num_ranks", 10, "Ranks per head in the accuracy table.")
  flags.DEFINE_integer("batch_size", 16, "Prompts decoded together.")
  flags.DEFINE_list("sizes", [str(s) for s in DEFAULT_SIZES], "Tree sizes whose step cost is measured.")
  flags.DEFINE_enum("estimate", "joint", list(ESTIMATES), "How a tree path's acceptance is estimated: "
                    "'joint' = measured frequency of the whole path, 'product' = product of per-head "
                    "accuracies (the paper's; assumes independent heads, underrates deep paths).")
  flags.DEFINE_integer("runs", 10, "Timed steps per size (the median is used).")
  flags.DEFINE_string("out", None, "Write the tree JSON here (loadable with --tree FILE).")
  flags.DEFINE_bool("plot", True, "Also save a PNG of the expected speedup next to --out.")
  entry.run(main)


if __name__ == "__main__":
  run_cli()
