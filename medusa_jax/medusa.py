"""The Medusa step, read top to bottom: draft -> verify -> accept -> commit -> emit.

One step of Medusa decoding (Cai et al. 2024, arXiv 2401.10774), for a batch:

  draft   Head m reads the backbone's final hidden state h_t at the position that predicted the
          newest token (carried from the previous step, ``decode.DraftCarry``) and guesses token
          t+m+1. Each head's top-k, gathered by the static tree, gives N candidate nodes; node 0,
          the root, is the newest token itself. Sequential heads (``heads.kind='sequential'``)
          also read their path's tokens, so the tree is drafted level by level instead.
  verify  One backbone forward over the N nodes with the tree's attention mask: a node attends to
          the prefix, its ancestors and itself, at position prefix length + depth. Its output is the
          backbone's prediction after the node's whole path, so every path is checked at once.
  accept  A rule picks, per sequence, the longest acceptable prefix of one root-to-leaf path and
          the bonus token after it (the backbone's own next token there):
            greedy   a candidate is accepted iff it is the backbone's argmax at its parent: the
                     output is token for token greedy decoding's;
            typical  the paper's typical acceptance, p(x) > min(eps, delta exp(-H(p))) at
                     temperature T: fast, not distribution-preserving; the bonus token greedy;
            sample   exact tree speculative sampling: the output is distributed exactly as
                     sampling from the backbone at temperature T (and top-p).
  commit  The accepted nodes' K/V rows move to the cache rows right after the prefix.
  emit    Accepted tokens + the bonus token; the hidden state at the last accepted node is the
          next step's draft input. With the heads' prefix layer (``heads.prefix_layer``) the
          layer first runs over the accepted nodes' hidden states, appending them to its own
          cache, and its output at the last accepted node is the draft input (``draft_carry``).

Everything about the tree (mask, depths, gather indices, paths) is a NumPy constant of
``tree.TreeBuffers``, closed over by jit. Shape letters: B batch, N tree nodes, C root-to-leaf
paths, A = depth + 1 (the most tokens one step emits), M heads, V vocabulary, V' draft vocabulary,
D model, S cache rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import backends
from medusa_jax import decode
from medusa_jax import heads as heads_lib
from medusa_jax import model as model_lib
from medusa_jax import tree as tree_lib
from medusa_jax.decode import DecodeParams, DecodeState, Sampling
from medusa_jax.model import ModelConfig

ACCEPTANCES = ("greedy", "typical", "sample")
BONUS_RULES = ("greedy", "sample")


@dataclasses.dataclass(frozen=True)
class MedusaSpec:
  """Everything static about a Medusa step; hashable, closed over as constants by jit."""
  heads: Any                 # heads.HeadsConfig
  tree: Any                  # tree.TreeBuffers
  acceptance: str = "greedy"  # greedy | typical | sample
  typical_epsilon: float = 0.09
  typical_delta: float = 0.3
  # Typical acceptance's tokens that are not verified candidates (the bonus token, and the prefill's
  # first token): 'greedy' as in the paper ("the first token is taken greedily and unconditionally
  # accepted"), or 'sample' them at the temperature.
  typical_bonus: str = "greedy"
  # Test hook, keep True: False makes lossless sampling wrong on purpose (a rejected candidate's mass
  # is not removed, so siblings and the bonus token are drawn from the original p instead of the
  # residual) so that the statistical test can show it detects a broken rule.
  exact_renormalise: bool = True

  def __post_init__(self):
    if self.acceptance not in ACCEPTANCES:
      raise ValueError(f"acceptance must be one of {ACCEPTANCES}, got {self.acceptance!r}")
    if self.typical_bonus not in BONUS_RULES:
      raise ValueError(f"typical_bonus must be one of {BONUS_RULES}, got {self.typical_bonus!r}")
    if self.tree.depth > self.heads.num_heads:
      raise ValueError(f"The tree is {self.tree.depth} deep but there are only {self.heads.num_heads} Medusa "
                       "heads: use a shallower tree or more heads.")


def spec_from(config, hcfg: heads_lib.HeadsConfig | None = None, tree_spec: str | None = None) -> MedusaSpec:
  """The Medusa step a config file asks for (``config.decode``), for heads ``hcfg`` (default
  ``config.heads``) and a tree (default ``config.decode.tree``)."""
  hcfg = hcfg or heads_lib.config_from(config)
  d = config.decode
  return MedusaSpec(heads=hcfg, tree=tree_lib.resolve(tree_spec or d.tree, num_heads=hcfg.num_heads),
                    acceptance=d.acceptance, typical_epsilon=float(d.typical_epsilon),
                    typical_delta=float(d.typical_delta), typical_bonus=d.typical_bonus)


@flax.struct.dataclass
class Accepted:
  """What the acceptance rule chose, per sequence."""
  path_B: jax.Array       # the root-to-leaf path it walked (a row of tree.paths)
  count_B: jax.Array      # candidates accepted along it, 0..depth
  last_node_B: jax.Array  # the last accepted node (0, the root, when nothing was accepted)
  bonus_B: jax.Array      # the token after the last accepted node


# ----------------------------------------------------------------------------------------------
# 1. Draft
# ----------------------------------------------------------------------------------------------

def _head_logits(hcfg, cfg: ModelConfig, params, hidden_BxLxD, path, first_head: int, weights: dict):
  """[B, L, M, V'] logits of the heads in ``params`` (a slice starting at head ``first_head``);
  ``weights``: ``DecodeParams.heads`` (the shared projection gathered once, maybe a backend's copy too)."""
  proj_VxD = weights.get("proj_VxD")
  if proj_VxD is None:
    proj_VxD = heads_lib.shared_weight_VxD(hcfg, cfg, params)
  blocks = weights.get("blocks")
  if proj_VxD is None:
    return heads_lib.subset_logits(hcfg, cfg, params, hidden_BxLxD, path, first_head, blocks)
  dt = cfg.compute_dtype
  x_BxLxMxD = heads_lib.head_states(hcfg, cfg, params, hidden_BxLxD, path, first_head, blocks)
  if backends.takes(x_BxLxMxD, weights.get("proj")):  # one read of the projection for every head's row
    return backends.project(x_BxLxMxD, (proj_VxD.T,), weights["proj"])[0]
  # One [V', D] projection shared by the heads: computed vocabulary-major (the weight as the left
  # operand), which XLA-CPU runs without repacking the weight; as x @ w.T with a row per head it
  # repacked the whole transposed [V', D] weight on every step.
  logits_VxBxLxM = jnp.einsum("vd,blmd->vblm", proj_VxD.astype(dt), x_BxLxMxD.astype(dt),
                              preferred_element_type=model_lib.accum_dtype(dt))
  return jnp.moveaxis(logits_VxBxLxM, 0, -1)  # small: [V', B, L, M]


def _top(logits_xV, k: int):
  return jnp.argmax(logits_xV, axis=-1)[..., None] if k == 1 else jax.lax.top_k(logits_xV, k)[1]


def head_candidates(spec: MedusaSpec, cfg: ModelConfig, params, hidden_BxD, root_B, weights=None):
  """Each head's top-k tokens at one position, flattened: [B, sum(segment_topk)] (Medusa heads).

  ``root_B`` is the token the backbone chose after that position (read by heads with
  ``next_token_input``); ``weights`` the heads' loop-invariant weights (``heads.decoding_weights``:
  the shared projection gathered once), if prepared. Only the heads the tree reaches are evaluated, over their draft
  vocabulary when they have one: their LM projection is the largest cost a Medusa step adds to a
  small tree's forward.
  """
  depth = len(spec.tree.segment_topk)
  hcfg = dataclasses.replace(spec.heads, num_heads=depth)
  sub = {"base": params["base"], "medusa": {k: (v if k == "vocab_ids" else v[:depth])
                                            for k, v in params["medusa"].items() if k != "prefix"}}
  logits_BxMxV = _head_logits(hcfg, cfg, sub, hidden_BxD[:, None], root_B[:, None], 0, weights or {})[:, 0]
  idx = jnp.concatenate([_top(logits_BxMxV[:, m], k) for m, k in enumerate(spec.tree.segment_topk)], axis=-1)
  idx = idx.astype(jnp.int32)
  return sub["medusa"]["vocab_ids"][idx] if spec.heads.draft_vocab else idx


def draft_levels(spec: MedusaSpec, cfg: ModelConfig, params, hidden_BxD, root_B, weights=None):
  """The tree's node tokens [B, N] drafted level by level (sequential heads).

  Level d's candidates are head d's top-k, evaluated once per level-(d-1) node that has children
  (batched over those nodes): each reads h_t and the tokens on its path from the root, drafted at
  the levels before. The node order, parents, ranks and each node's slot among its level's parents
  are NumPy constants of the tree (``tree.TreeBuffers.level_parents`` / ``parent_slot``).
  """
  tree = spec.tree
  B = root_B.shape[0]
  one = dataclasses.replace(spec.heads, num_heads=1)
  tokens_BxN = jnp.zeros((B, tree.num_nodes), jnp.int32).at[:, 0].set(root_B.astype(jnp.int32))
  for d in range(1, tree.depth + 1):
    parents_P = tree.level_parents[d - 1]
    path_BxPxd = tokens_BxN[:, tree.ancestors[parents_P, :d]]   # root .. parent, drafted already
    hidden_BxPxD = jnp.broadcast_to(hidden_BxD[:, None], (B, len(parents_P), hidden_BxD.shape[-1]))
    sub = {"base": params["base"], "medusa": heads_lib.per_head(params["medusa"], d - 1)}
    logits_BxPxV = _head_logits(one, cfg, sub, hidden_BxPxD, path_BxPxd, d - 1, weights or {})[:, :, 0]
    top_BxPxK = _top(logits_BxPxV, tree.topk[d - 1]).astype(jnp.int32)
    nodes = np.flatnonzero(tree.depths == d)
    tok_BxK = top_BxPxK[:, tree.parent_slot[nodes], tree.rank[nodes]]
    if spec.heads.draft_vocab:
      tok_BxK = params["medusa"]["vocab_ids"][tok_BxK]
    tokens_BxN = tokens_BxN.at[:, nodes].set(tok_BxK)
  return tokens_BxN


def draft(spec: MedusaSpec, cfg: ModelConfig, dp: DecodeParams, state: DecodeState):
  """The N tree nodes' tokens [B, N]: the newest token (root), then the heads' guesses in tree order."""
  if spec.heads.kind == "sequential":
    return draft_levels(spec, cfg, dp.params, state.draft.hidden_BxD, state.last_B, dp.heads)
  cand = head_candidates(spec, cfg, dp.params, state.draft.hidden_BxD, state.last_B, dp.heads)
  flat_BxF = jnp.concatenate([state.last_B[:, None], cand], axis=-1)  # [root, head1 top-k, head2 top-k, ...]
  return flat_BxF[:, jnp.asarray(spec.tree.tree_indices)]


# ----------------------------------------------------------------------------------------------
# 2. Verify
# ----------------------------------------------------------------------------------------------

def verify(spec: MedusaSpec, cfg: ModelConfig, dp: DecodeParams, cache, tokens_BxN, *, logits: bool):
  """One forward over the tree nodes with the tree mask, writing their K/V at rows index.. index+N-1.

  Returns ``(logits [B, N, V] or None, hidden [B, N, D], cache)``; greedy acceptance needs only
  each node's argmax, so it asks for no logits (no [B, N, V] array is materialised).
  """
  tree = spec.tree
  idx_B = cache["index"]
  positions_BxN = idx_B[:, None] + jnp.asarray(tree.depths)[None, :]
  mask_BxNxS = model_lib.cache_tree_mask(idx_B, tree.attn_mask, model_lib.cache_capacity(cache))
  return model_lib.forward(cfg, dp.params["base"], tokens_BxN, positions_BxN, mask_BxNxS, cache, logits=logits,
                           prepared=dp.prepared)


# ----------------------------------------------------------------------------------------------
# 3. Accept
# ----------------------------------------------------------------------------------------------

def _longest(run_BxCxA, paths_CxA1):
  """The longest accepted prefix, first in path order among equals: (path, count, last node)."""
  length_BxC = run_BxCxA.sum(-1, dtype=jnp.int32)  # int32 like the cache index, also under x64
  path_B = jnp.argmax(length_BxC, axis=-1)
  count_B = jnp.take_along_axis(length_BxC, path_B[:, None], 1)[:, 0]
  return path_B, count_B, paths_CxA1[path_B, count_B]


def accept_greedy(spec: MedusaSpec, cfg: ModelConfig, dp: DecodeParams, tokens_BxN, hidden_BxNxD) -> Accepted:
  """A candidate is accepted iff it is the backbone's argmax at its parent node.

  Comparing per-node [B, N] argmaxes gives the same acceptance as comparing each path's gathered
  [B, C, A, V] parent logits, at a fraction of the memory traffic.
  """
  tree = spec.tree
  paths_CxA1 = jnp.asarray(tree.paths)  # node ids, root first
  top_BxN = model_lib.greedy_tokens(cfg, dp.params["base"], hidden_BxNxD, dp.prepared)
  ok_BxCxA = top_BxN[:, paths_CxA1[:, :-1]] == tokens_BxN[:, paths_CxA1[:, 1:]]
  run_BxCxA = jnp.cumprod((ok_BxCxA & jnp.asarray(tree.path_valid)[None, :, 1:]).astype(jnp.int32), axis=-1)
  path_B, count_B, last_B = _longest(run_BxCxA, paths_CxA1)
  return Accepted(path_B, count_B, last_B, top_BxN[jnp.arange(tokens_BxN.shape[0]), last_B])


def typical_ok(logits_BxCxAxV, tokens_BxCxA, temperature, eps, delta):
  """Typical acceptance: p(x) > min(eps, delta * exp(-H(p))), p = softmax(logits / T); and log p(x)."""
  logp = jax.nn.log_softmax(logits_BxCxAxV / temperature, axis=-1)
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  logp_x = jnp.take_along_axis(logp, tokens_BxCxA[..., None], axis=-1)[..., 0]
  threshold = jnp.minimum(eps, delta * jnp.exp(-entropy))
  return jnp.exp(logp_x) > threshold, logp_x


def accept_typical(spec: MedusaSpec, sampling: Sampling, logits_BxNxV, tokens_BxN, rng) -> Accepted:
  """The longest typical prefix, ties broken by the larger sum of log p over its accepted tokens;
  the bonus token greedy (``typical_bonus='greedy'``, the paper's rule) or sampled."""
  tree = spec.tree
  paths_CxA1 = jnp.asarray(tree.paths)
  ok_BxCxA, logp_BxCxA = typical_ok(logits_BxNxV[:, paths_CxA1[:, :-1]], tokens_BxN[:, paths_CxA1[:, 1:]],
                                    sampling.temperature, spec.typical_epsilon, spec.typical_delta)
  run_BxCxA = jnp.cumprod((ok_BxCxA & jnp.asarray(tree.path_valid)[None, :, 1:]).astype(jnp.int32), axis=-1)
  length_BxC = run_BxCxA.sum(-1, dtype=jnp.int32)
  score_BxC = jnp.sum(jnp.where(run_BxCxA > 0, logp_BxCxA, 0.0), axis=-1)
  best_BxC = length_BxC == length_BxC.max(-1, keepdims=True)
  path_B = jnp.argmax(jnp.where(best_BxC, score_BxC, -jnp.inf), axis=-1)
  count_B = jnp.take_along_axis(length_BxC, path_B[:, None], 1)[:, 0]
  last_B = paths_CxA1[path_B, count_B]
  bonus_logits_BxV = logits_BxNxV[jnp.arange(tokens_BxN.shape[0]), last_B]
  rule = sampling if spec.typical_bonus == "sample" else Sampling(temperature=0.0)
  return Accepted(path_B, count_B, last_B, decode.sample_logits(bonus_logits_BxV, rng, rule))


def exact_sample_walk(tree, logits_BxNxV, tokens_BxN, rng, renormalise: bool = True):
  """Lossless tree sampling: returns (accepted count, last node, bonus token), each [B].

  Medusa's candidates are deterministic (top-k), so the draft distribution is a point mass and
  speculative sampling's rule becomes: walking down from the root, try the children of the
  current node in rank order; accept child c with probability p(c); on rejection zero p(c) and
  renormalise p. If no child is accepted, draw the next token from what remains of p and stop;
  after an accepted leaf, draw it from the leaf's p. ``logits`` are the target's, already divided
  by the temperature. ``renormalise=False`` skips the residual update (a deliberately wrong rule,
  see ``MedusaSpec.exact_renormalise``).
  """
  B = tokens_BxN.shape[0]
  children_NxW = jnp.asarray(tree.children)
  valid_NxW = jnp.asarray(tree.children_valid)
  W = children_NxW.shape[1]
  b_idx = jnp.arange(B)
  cur_B = jnp.zeros((B,), jnp.int32)
  going_B = jnp.ones((B,), bool)
  count_B = jnp.zeros((B,), jnp.int32)
  bonus_B = jnp.zeros((B,), jnp.int32)
  for _ in range(tree.depth + 1):
    p_BxV = jax.nn.softmax(logits_BxNxV[b_idx, cur_B], axis=-1)
    nxt_B = cur_B
    accepted_B = jnp.zeros((B,), bool)
    for w in range(W):
      rng, sub = jax.random.split(rng)
      child_B = children_NxW[cur_B, w]
      live_B = going_B & valid_NxW[cur_B, w] & ~accepted_B
      tok_B = tokens_BxN[b_idx, child_B]
      pc_B = p_BxV[b_idx, tok_B]
      acc_B = live_B & (jax.random.uniform(sub, (B,), p_BxV.dtype) < pc_B)
      if renormalise:
        residual = p_BxV.at[b_idx, tok_B].set(0.0) / jnp.maximum(1.0 - pc_B, jnp.finfo(p_BxV.dtype).tiny)[:, None]
        p_BxV = jnp.where((live_B & ~acc_B)[:, None], residual, p_BxV)
      nxt_B = jnp.where(acc_B, child_B, nxt_B)
      accepted_B = accepted_B | acc_B
    rng, sub = jax.random.split(rng)
    stop_B = going_B & ~accepted_B
    drawn_B = jax.random.categorical(sub, jnp.log(p_BxV), axis=-1).astype(jnp.int32)
    bonus_B = jnp.where(stop_B, drawn_B, bonus_B)
    count_B = count_B + (going_B & accepted_B).astype(jnp.int32)
    cur_B = jnp.where(going_B, nxt_B, cur_B)
    going_B = going_B & accepted_B
  return count_B, cur_B, bonus_B


def accept_sample(spec: MedusaSpec, sampling: Sampling, logits_BxNxV, tokens_BxN, rng) -> Accepted:
  """Exact sampling over the tree, targeting plain sampling's distribution (nucleus included)."""
  count_B, last_B, bonus_B = exact_sample_walk(spec.tree, decode.sampling_logits(logits_BxNxV, sampling),
                                               tokens_BxN, rng, spec.exact_renormalise)
  # The walk's nodes lie on some root-to-leaf path: pick one that passes through the last node.
  on_path_BxC = (jnp.asarray(spec.tree.paths) == last_B[:, None, None]).any(-1)
  return Accepted(jnp.argmax(on_path_BxC, axis=-1), count_B, last_B, bonus_B)


# ----------------------------------------------------------------------------------------------
# 4. Commit and 5. emit
# ----------------------------------------------------------------------------------------------

def commit(spec: MedusaSpec, cache, acc: Accepted, live_B):
  """The accepted path's K/V rows move right after the prefix; live sequences grow by count + 1
  (the accepted candidates and the root, whose row the step wrote first)."""
  tree = spec.tree
  chain = tree.num_paths == 1 and np.array_equal(tree.paths[0], np.arange(tree.paths.shape[1]))
  # A chain's accepted nodes 0..count already follow the prefix. (Skipping the move with a lax.cond
  # when nothing moves made XLA-CPU copy every cache array 3 times.)
  if not chain:
    cache = model_lib.keep_cache_rows(cache, jnp.asarray(tree.paths)[acc.path_B], tree.num_nodes)
  return model_lib.advance(cache, jnp.where(live_B, acc.count_B + 1, 0))


def draft_carry(spec: MedusaSpec, cfg: ModelConfig, dp: DecodeParams, prefix, hidden_BxNxD, acc: Accepted, live_B
                ) -> decode.DraftCarry:
  """The next step's draft input: the hidden state at the last accepted node; with the prefix layer,
  the layer's output there, after it ran over the accepted path's nodes (root first) at the rows
  after its prefix, as in ``commit``. ``prefix`` is its cache; rejected nodes never enter it."""
  b_B = jnp.arange(hidden_BxNxD.shape[0])
  if not spec.heads.prefix_layer:
    return decode.DraftCarry(hidden_BxNxD[b_B, acc.last_node_B])
  # All A path slots run (a static shape); past the accepted count the path's padding (node 0) is
  # written beyond the advanced index, where the next step's rows overwrite it before reading.
  nodes_BxA = jnp.asarray(spec.tree.paths)[acc.path_B]
  h_BxAxD = jnp.take_along_axis(hidden_BxNxD, nodes_BxA[:, :, None], axis=1)
  out_BxAxD, prefix = heads_lib.prefix_decode(cfg, dp.params, h_BxAxD, prefix)
  prefix = model_lib.advance(prefix, jnp.where(live_B, acc.count_B + 1, 0))
  return decode.DraftCarry(out_BxAxD[b_B, acc.count_B], prefix=prefix)


def prefill_carry(cfg: ModelConfig, dp: DecodeParams, hidden_BxPxD, lengths_B, capacity: int) -> decode.DraftCarry:
  """The first draft input with the prefix layer: the layer over each (right-padded) prompt, its
  output at the last prompt position; its cache then holds the prompt's rows (``decode.prefill``)."""
  prefix = heads_lib.prefix_cache(cfg, hidden_BxPxD.shape[0], capacity)
  out_BxPxD, prefix = heads_lib.prefix_decode(cfg, dp.params, hidden_BxPxD, prefix)
  last_BxD = jnp.take_along_axis(out_BxPxD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  return decode.DraftCarry(last_BxD, prefix={**prefix, "index": lengths_B.astype(jnp.int32)})


def emitted(spec: MedusaSpec, tokens_BxN, acc: Accepted):
  """[B, A]: the accepted candidates along the path, then the bonus token (the rest is padding)."""
  A = spec.tree.depth + 1
  path_tokens_BxA = tokens_BxN[jnp.arange(tokens_BxN.shape[0])[:, None], jnp.asarray(spec.tree.paths)[acc.path_B]]
  shifted_BxA = jnp.concatenate([path_tokens_BxA[:, 1:], jnp.zeros_like(path_tokens_BxA[:, :1])], axis=-1)
  return jnp.where(jnp.arange(A)[None] == acc.count_B[:, None], acc.bonus_B[:, None], shifted_BxA)


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------

def medusa_step(cfg: ModelConfig, dp: DecodeParams, state: DecodeState, *, sampling: Sampling,
                spec: MedusaSpec) -> DecodeState:
  """One Medusa step: draft, verify the tree in one forward, accept a path, commit its K/V, emit."""
  tokens_BxN = draft(spec, cfg, dp, state)
  greedy = spec.acceptance == "greedy" or sampling.temperature <= 0
  logits_BxNxV, hidden_BxNxD, cache = verify(spec, cfg, dp, state.cache, tokens_BxN, logits=not greedy)
  rng, sub = jax.random.split(state.rng)
  if greedy:
    acc = accept_greedy(spec, cfg, dp, tokens_BxN, hidden_BxNxD)
  elif spec.acceptance == "typical":
    acc = accept_typical(spec, sampling, logits_BxNxV, tokens_BxN, sub)
  else:
    acc = accept_sample(spec, sampling, logits_BxNxV, tokens_BxN, sub)
  cache = commit(spec, cache, acc, ~state.done_B)
  carry = draft_carry(spec, cfg, dp, state.draft.prefix, hidden_BxNxD, acc, ~state.done_B)
  state = state.replace(cache=cache, rng=rng, steps=state.steps + 1, draft=carry)
  return decode.emit(state, emitted(spec, tokens_BxN, acc), acc.count_B + 1, cfg.eos_ids, sampling.max_new_tokens)


def check_sampling(spec: MedusaSpec, sampling: Sampling) -> None:
  if spec.acceptance == "greedy" and sampling.temperature > 0:
    raise ValueError(
        f"Greedy acceptance decodes greedily, but the temperature is {sampling.temperature:g}: to sample, use "
        "--acceptance sample (exact: distributed as plain sampling) or --acceptance typical (the paper's "
        "faster approximation); or set --temperature 0.")


def make_decoder(cfg: ModelConfig, sampling: Sampling, spec: MedusaSpec | None = None,
                 placement: Any = None) -> decode.Decoder:
  """A vanilla decoder, or a Medusa one when ``spec`` is given; sharded over a mesh with ``placement``."""
  if spec is None:
    return decode.Decoder(cfg, sampling, placement=placement)
  check_sampling(spec, sampling)
  return decode.Decoder(
      cfg, sampling, step_fn=functools.partial(medusa_step, spec=spec), room=spec.tree.num_nodes,
      slack=spec.tree.depth + 1, carry_draft=True,
      greedy_first=spec.acceptance == "typical" and spec.typical_bonus == "greedy",
      heads_weights=functools.partial(heads_lib.decoding_weights, spec.heads, cfg), placement=placement,
      draft_prefill=functools.partial(prefill_carry, cfg) if spec.heads.prefix_layer else None)
