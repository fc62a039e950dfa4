"""Decoding on device: prefill, the vanilla step, and the generation loop.

The whole generation runs inside ``jax.lax.while_loop`` (no host round trip per token); the
streaming variant drives the *same* jitted step from a Python loop and yields tokens as they come.
Medusa's step (``medusa_decode.py``) plugs into the same prefill, state, emission and loop.

Prompts of different lengths are right-padded: sequence b's prompt occupies cache rows
0..len[b]-1 and every sequence then advances its own ``cache['index']``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import cpu_kernels
from medusa_jax import model as model_lib
from medusa_jax.model import ModelConfig


class PromptTooLongError(ValueError):
  """A prompt (plus the requested new tokens) does not fit the model's context."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen; hashable, a jit static argument."""
  temperature: float = 0.0  # 0 = greedy
  top_p: float = 1.0
  max_new_tokens: int = 128


@flax.struct.dataclass
class DecodeState:
  cache: dict
  tokens_BxT: jax.Array      # emitted tokens (T = max_new_tokens + slack), padded with 0
  num_B: jax.Array           # emitted count per sequence
  done_B: jax.Array          # EOS seen or max_new_tokens reached
  last_B: jax.Array          # the newest emitted token: the next one fed to the model
  rng: jax.Array
  steps: jax.Array           # decoding steps taken (forward passes after the prefill)
  extra: Any = None          # mode-specific carry (Medusa: head logits of the last accepted node)


# ----------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------

def bucket(n: int, multiple: int = 64) -> int:
  """Rounds up to a multiple, so that nearby request sizes share one compilation."""
  return max(multiple, -(-n // multiple) * multiple)


def plan_cache(cfg: ModelConfig, prompt_lengths, max_new_tokens: int, step_tokens: int = 1) -> tuple[int, int]:
  """Returns (padded prompt length, cache capacity) for a request, or raises PromptTooLongError.

  The cache is sized to the request (bucketed), not to the model's context: attention reads every
  cache row each step, so an oversized cache costs memory bandwidth.
  """
  longest = int(max(prompt_lengths))
  need = longest + max_new_tokens + step_tokens
  if need > cfg.max_seq_len:
    raise PromptTooLongError(
        f"The prompt has {longest} tokens; with max_new_tokens={max_new_tokens} it needs {need} positions "
        f"but the model's context is {cfg.max_seq_len}. Shorten the prompt or lower --max_new_tokens.")
  capacity = min(bucket(need, 128), cfg.max_seq_len)
  # The padded prompt is written into the cache whole, so it may not outgrow it (a context that is
  # not a multiple of 64 caps the capacity below the prompt's bucket).
  return min(bucket(longest), capacity), capacity


def pad_prompts(prompts: list[list[int]], length: int, pad_id: int = 0):
  B = len(prompts)
  arr = np.full((B, length), pad_id, np.int32)
  for b, p in enumerate(prompts):
    if not p:
      raise ValueError(f"prompt {b} is empty")
    arr[b, :len(p)] = p
  return arr, np.array([len(p) for p in prompts], np.int32)


# ----------------------------------------------------------------------------------------------
# Sampling and emission
# ----------------------------------------------------------------------------------------------

def sampling_logits(logits_xV, sampling: Sampling):
  """The logits plain sampling draws from: divided by the temperature, outside the nucleus -inf.

  Lossless Medusa sampling must target exactly this distribution, so both use this function.
  """
  logits = logits_xV.astype(jnp.float32) / sampling.temperature
  if sampling.top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    cutoff_idx = jnp.sum(cum < sampling.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_desc, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def sample_logits(logits_BxV, rng, sampling: Sampling):
  """Greedy at temperature 0, else temperature + nucleus (top-p) sampling."""
  if sampling.temperature <= 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, sampling_logits(logits_BxV, sampling), axis=-1).astype(jnp.int32)


def emit(state: DecodeState, new_BxA, count_B, eos_ids: tuple[int, ...], max_new_tokens: int) -> DecodeState:
  """Appends up to ``count_B`` tokens per sequence, stopping at EOS and at ``max_new_tokens``.

  Nothing is emitted after an EOS, finished sequences emit nothing, and a sequence never exceeds
  ``max_new_tokens`` (accepted tokens beyond it are dropped).
  """
  A = new_BxA.shape[1]
  a = jnp.arange(A)[None, :]
  count = jnp.where(state.done_B, 0, count_B)
  count = jnp.minimum(count, max_new_tokens - state.num_B)
  is_eos = jnp.isin(new_BxA, jnp.asarray(eos_ids, jnp.int32)) & (a < count[:, None])
  first_eos = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, axis=-1) + 1, A + 1)
  count = jnp.minimum(count, first_eos)
  keep = a < count[:, None]

  def write(row, new, n, k):
    cur = jax.lax.dynamic_slice(row, (n,), (A,))
    return jax.lax.dynamic_update_slice(row, jnp.where(k, new, cur), (n,))

  tokens = jax.vmap(write)(state.tokens_BxT, new_BxA, state.num_B, keep)
  num = state.num_B + count
  last = jnp.where(count > 0, jnp.take_along_axis(new_BxA, jnp.maximum(count - 1, 0)[:, None], 1)[:, 0],
                   state.last_B)
  done = state.done_B | (first_eos <= A) & (count > 0) & is_eos.any(-1) | (num >= max_new_tokens)
  return state.replace(tokens_BxT=tokens, num_B=num, done_B=done, last_B=last)


# ----------------------------------------------------------------------------------------------
# Prefill and the vanilla step
# ----------------------------------------------------------------------------------------------

def prefill(cfg: ModelConfig, params, prompts_BxP, lengths_B, rng, *, capacity: int, sampling: Sampling,
            slack: int = 1, extra_fn: Callable | None = None) -> DecodeState:
  """Runs the prompts through the model, samples the first new token and returns the loop state.

  ``extra_fn(params, hidden_Bx1xD, first_B)`` computes the mode's extra carry from the last prompt
  position and the first new token (Medusa: the heads' candidates there).
  """
  base = params["base"]
  B, P = prompts_BxP.shape
  cache = model_lib.init_cache(cfg, B, capacity)
  positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  mask = model_lib.cache_causal_mask(cache["index"], P, capacity)
  _, hidden, cache = model_lib.forward(cfg, base, prompts_BxP, positions, mask, cache, logits=False)
  cache = {**cache, "index": lengths_B.astype(jnp.int32)}
  last_h = jnp.take_along_axis(hidden, (lengths_B - 1)[:, None, None], axis=1)  # [B, 1, D]
  logits = model_lib.project_logits(cfg, base, last_h)[:, 0]
  rng, sub = jax.random.split(rng)
  first = sample_logits(logits, sub, sampling)
  T = sampling.max_new_tokens + slack
  state = DecodeState(
      cache=cache, tokens_BxT=jnp.zeros((B, T), jnp.int32), num_B=jnp.zeros((B,), jnp.int32),
      done_B=jnp.zeros((B,), bool), last_B=first, rng=rng, steps=jnp.zeros((), jnp.int32),
      extra=None if extra_fn is None else extra_fn(params, last_h, first))
  return emit(state, first[:, None], jnp.ones((B,), jnp.int32), cfg.eos_ids, sampling.max_new_tokens)


def vanilla_step(cfg: ModelConfig, params, state: DecodeState, *, sampling: Sampling) -> DecodeState:
  """Feeds each sequence's newest token and emits one more."""
  cache = state.cache
  S = model_lib.cache_capacity(cache)
  idx = cache["index"]
  mask = model_lib.cache_causal_mask(idx, 1, S)
  logits, _, cache = model_lib.forward(cfg, params["base"], state.last_B[:, None], idx[:, None], mask, cache)
  cache = model_lib.advance(cache, (~state.done_B).astype(jnp.int32))
  rng, sub = jax.random.split(state.rng)
  nxt = sample_logits(logits[:, 0], sub, sampling)
  state = state.replace(cache=cache, rng=rng, steps=state.steps + 1)
  return emit(state, nxt[:, None], jnp.ones_like(state.num_B), cfg.eos_ids, sampling.max_new_tokens)


def _should_continue(state: DecodeState, room: int) -> jax.Array:
  """Some sequence is unfinished and every unfinished one has ``room`` free cache rows."""
  S = model_lib.cache_capacity(state.cache)
  fits = state.done_B | (state.cache["index"] + room <= S)
  return jnp.any(~state.done_B) & jnp.all(fits)


def run_loop(step: Callable[[DecodeState], DecodeState], state: DecodeState, room: int) -> DecodeState:
  """The whole generation in one ``while_loop``: stops when all are done or the cache is full."""
  return jax.lax.while_loop(lambda s: _should_continue(s, room), step, state)


# ----------------------------------------------------------------------------------------------
# A compiled decoder bound to one model, mode and sampling setting
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Decoder:
  """Jitted prefill / step / loop for one config and mode; the params are passed per call.

  ``step_fn(cfg, params, state, sampling=...)`` is the mode's step, ``room`` the cache rows a step
  writes, ``slack`` how many tokens a step may emit beyond ``max_new_tokens`` before truncation.
  ``placement`` (a ``sharding.DecodePlacement``) runs them on a device mesh with explicit shardings
  (params by their logical axes, cache and per-sequence state by batch / kv heads); None: one device.
  """
  cfg: ModelConfig
  sampling: Sampling
  step_fn: Callable = vanilla_step
  room: int = 1
  slack: int = 1
  extra_fn: Callable | None = None
  placement: Any = None
  prepare: Callable = lambda params: params

  def __post_init__(self):
    step = functools.partial(self.step_fn, self.cfg, sampling=self.sampling)
    prefill_fn = functools.partial(prefill, self.cfg, sampling=self.sampling, slack=self.slack,
                                   extra_fn=self.extra_fn)
    # Loop-invariant work on the params (e.g. gathering the heads' draft projection) runs once per
    # generation, outside the while loop.
    loop = lambda p, s: run_loop(functools.partial(step, self.prepare(p)), s, self.room)
    self._fns = (prefill_fn, step, loop)
    self._sharded = {}
    self._prefill = jax.jit(prefill_fn, static_argnames=("capacity",))
    # The cache is donated: each step updates it in place instead of copying S rows per layer.
    self._step = jax.jit(step, donate_argnums=(1,))
    self._prepare = jax.jit(self.prepare)
    self._loop = jax.jit(loop, donate_argnums=(1,))

  def sharded_jits(self, params, batch: int, prompt_len: int, capacity: int):
    """(prefill, step, loop) jitted for ``placement``'s mesh with explicit in/out shardings.

    One set per (params structure, batch, prompt length, capacity): whether the batch splits over
    the data axes depends on its size. ``params`` may be abstract (``jax.ShapeDtypeStruct``s), so
    the steps can be lowered and compiled ahead of time (``medusa_jax.fit``).
    """
    key = (jax.tree.structure(params), batch, prompt_len, capacity)
    if key not in self._sharded:
      pl = self.placement
      prefill_fn, step, loop = self._fns
      prefill_s = functools.partial(prefill_fn, capacity=capacity)
      p_sh = pl.params(params)
      abstract = jax.eval_shape(prefill_s, params, jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32),
                                jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.uint32))
      s_sh = pl.state(abstract)
      # Prompts and lengths are per-sequence (batch over the data axes); the rng key is replicated.
      in_prefill = (p_sh, pl.batch((batch, prompt_len)), pl.batch((batch,)), pl.replicated)
      self._sharded[key] = (
          jax.jit(prefill_s, in_shardings=in_prefill, out_shardings=s_sh),
          # The state (cache included) is donated and comes back with the same shardings.
          jax.jit(step, in_shardings=(p_sh, s_sh), out_shardings=s_sh, donate_argnums=(1,)),
          jax.jit(loop, in_shardings=(p_sh, s_sh), out_shardings=s_sh, donate_argnums=(1,)),
          in_prefill)
    return self._sharded[key]

  def _state_jits(self, params, state):
    want = (jax.tree.structure(params), state.num_B.shape[0], model_lib.cache_capacity(state.cache))
    for (tree, b, _, s), fns in self._sharded.items():
      if (tree, b, s) == want:
        return fns
    raise ValueError("this state was not made by this decoder's start()")

  def decode_params(self, params):
    """``params`` with the CPU kernel's packed weight copies (``cpu_kernels.decode_params``, made
    once per backbone); unchanged on a mesh, off CPU, or when disabled."""
    return params if self.placement is not None else cpu_kernels.decode_params(self.cfg, params)

  def start(self, params, prompts: list[list[int]], rng=None) -> DecodeState:
    params = self.decode_params(params)
    P, S = plan_cache(self.cfg, [len(p) for p in prompts], self.sampling.max_new_tokens, self.room)
    arr, lengths = pad_prompts(prompts, P)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    if self.placement is None:
      return self._prefill(params, jnp.asarray(arr), jnp.asarray(lengths), rng, capacity=S)
    prefill_j, _, _, in_sh = self.sharded_jits(params, len(prompts), P, S)
    # Every host passes the same prompts; put_global builds each host's shards from its copy.
    args = self.placement.put((arr, lengths, np.asarray(rng)), in_sh[1:])
    return prefill_j(params, *args)

  def finish(self, params, state: DecodeState) -> DecodeState:
    params = self.decode_params(params)
    if self.placement is None:
      return self._loop(params, state)
    return self._state_jits(params, state)[2](params, state)

  def generate(self, params, prompts: list[list[int]], rng=None) -> tuple[list[list[int]], DecodeState]:
    state = self.finish(params, self.start(params, prompts, rng))
    return outputs(state), state

  def stream(self, params, prompts: list[list[int]], rng=None) -> Iterator[list[list[int]]]:
    """Yields, after the prefill and after each step, the tokens each sequence newly emitted."""
    params = self.decode_params(params)
    state = self.start(params, prompts, rng)
    if self.placement is None:
      # Loop-invariant work once per generation, as in the while loop, not once per yielded step.
      params = self._prepare(params)
      step = self._step
    else:
      step = self._state_jits(params, state)[1]
    seen = np.zeros(len(prompts), np.int64)
    while True:
      num = np.asarray(state.num_B)
      toks = np.asarray(state.tokens_BxT)
      yield [toks[b, seen[b]:num[b]].tolist() for b in range(len(prompts))]
      seen = num
      if not bool(_should_continue(state, self.room)):
        return
      state = step(params, state)


def outputs(state: DecodeState) -> list[list[int]]:
  toks, num = np.asarray(state.tokens_BxT), np.asarray(state.num_B)
  return [toks[b, :num[b]].tolist() for b in range(toks.shape[0])]


# ----------------------------------------------------------------------------------------------
# Medusa: candidates from the heads, one tree-verification forward, acceptance, commit
# ----------------------------------------------------------------------------------------------

ACCEPTANCES = ("greedy", "typical", "sample")


@dataclasses.dataclass(frozen=True)
class MedusaSpec:
  """Everything static about a Medusa step; hashable, closed over as constants by jit."""
  heads: Any                 # heads.HeadsConfig
  tree: Any                  # tree.TreeBuffers
  acceptance: str = "greedy"  # greedy | typical | sample
  typical_epsilon: float = 0.09
  typical_delta: float = 0.3
  # Test hook, keep True: False makes lossless sampling wrong on purpose (a rejected candidate's mass
  # is not removed, so siblings and the bonus token are drawn from the original p instead of the
  # residual) so that the statistical test can show it detects a broken rule.
  exact_renormalise: bool = True

  def __post_init__(self):
    if self.acceptance not in ACCEPTANCES:
      raise ValueError(f"acceptance must be one of {ACCEPTANCES}, got {self.acceptance!r}")
    if self.tree.depth > self.heads.num_heads:
      raise ValueError(f"The tree is {self.tree.depth} deep but there are only {self.heads.num_heads} Medusa "
                       "heads: use a shallower tree or more heads.")


def head_candidates(spec: MedusaSpec, cfg: ModelConfig, params, hidden_Bx1xD, next_B):
  """Each head's top-k tokens at one position, flattened: [B, sum(segment_topk)].

  ``next_B`` is the token the backbone emitted after that position (read by heads with
  ``next_token_input``).

  Only the heads the tree reaches are evaluated, over their draft vocabulary when they have one:
  their LM projection is the largest cost a Medusa step adds to a small tree's forward.
  """
  from medusa_jax import heads as heads_lib  # pylint: disable=g-import-not-at-top
  depth = len(spec.tree.segment_topk)
  hcfg = dataclasses.replace(spec.heads, num_heads=depth)
  shared = ("vocab_ids",) + (("draft_w",) if spec.heads.shared_lm_head else ())
  medusa = {k: (v if k in shared else v[:depth]) for k, v in params["medusa"].items()}
  sub_params = {"base": params["base"], "medusa": medusa}
  w_VxD = heads_lib.shared_weight_VxD(hcfg, cfg, sub_params)
  if w_VxD is not None:
    # One [V', D] projection shared by the heads: computed vocabulary-major (the weight as the left
    # operand), which XLA-CPU runs without repacking the weight; as x @ w.T with a row per head it
    # repacked the whole transposed [V', D] weight on every step.
    dt = cfg.compute_dtype
    x_BxMxD = heads_lib.head_states(hcfg, cfg, sub_params, hidden_Bx1xD, next_B[:, None])[:, 0]
    logits_VxBxM = jnp.einsum("vd,bmd->vbm", w_VxD.astype(dt), x_BxMxD.astype(dt),
                              preferred_element_type=model_lib.accum_dtype(dt))
    logits_BxMxV = jnp.transpose(logits_VxBxM, (1, 2, 0))  # small: [V', B, M]
  else:
    logits_BxMxV = heads_lib.subset_logits(hcfg, cfg, sub_params, hidden_Bx1xD, next_B[:, None])[:, 0]
  parts = []
  for m, k in enumerate(spec.tree.segment_topk):
    idx = (jnp.argmax(logits_BxMxV[:, m], axis=-1)[:, None] if k == 1
           else jax.lax.top_k(logits_BxMxV[:, m], k)[1])
    parts.append(idx)
  idx = jnp.concatenate(parts, axis=-1).astype(jnp.int32)
  return medusa["vocab_ids"][idx] if spec.heads.draft_vocab else idx


def _typical_ok(logits_BxCxDxV, tokens_BxCxD, temperature, eps, delta):
  """Typical acceptance: p(x) > min(eps, delta * exp(-H(p))), p = softmax(logits / T)."""
  logp = jax.nn.log_softmax(logits_BxCxDxV / temperature, axis=-1)
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  logp_x = jnp.take_along_axis(logp, tokens_BxCxD[..., None], axis=-1)[..., 0]
  threshold = jnp.minimum(eps, delta * jnp.exp(-entropy))
  return jnp.exp(logp_x) > threshold, logp_x


def _exact_sample_walk(tree, logits_BxNxV, tokens_BxN, rng, temperature, renormalise: bool = True):
  """Lossless tree sampling (DESIGN.md): returns (accepted nodes count, last node, bonus token).

  Walking down from the root, the children of the current node are tried in rank order: child c
  is accepted with probability p(c); on rejection p(c) is zeroed and p renormalised. If no child is
  accepted the next token is drawn from what remains of p and the walk stops. ``renormalise=False``
  skips the residual update (a deliberately wrong rule, see ``MedusaSpec.exact_renormalise``).
  """
  B = tokens_BxN.shape[0]
  children = jnp.asarray(tree.children)
  children_valid = jnp.asarray(tree.children_valid)
  W = children.shape[1]
  cur = jnp.zeros((B,), jnp.int32)
  going = jnp.ones((B,), bool)
  count = jnp.zeros((B,), jnp.int32)
  bonus = jnp.zeros((B,), jnp.int32)
  b_idx = jnp.arange(B)
  for _ in range(tree.depth + 1):
    p = jax.nn.softmax(logits_BxNxV[b_idx, cur] / temperature, axis=-1)
    nxt = cur
    accepted = jnp.zeros((B,), bool)
    for w in range(W):
      rng, sub = jax.random.split(rng)
      child = children[cur, w]
      live = going & children_valid[cur, w] & ~accepted
      tok = tokens_BxN[b_idx, child]
      pc = p[b_idx, tok]
      acc = live & (jax.random.uniform(sub, (B,), p.dtype) < pc)
      rej = live & ~acc
      p_rej = p.at[b_idx, tok].set(0.0)
      p_rej = p_rej / jnp.maximum(1.0 - pc, jnp.finfo(p.dtype).tiny)[:, None]
      if renormalise:
        p = jnp.where(rej[:, None], p_rej, p)
      nxt = jnp.where(acc, child, nxt)
      accepted = accepted | acc
    rng, sub = jax.random.split(rng)
    stop = going & ~accepted
    drawn = jax.random.categorical(sub, jnp.log(p), axis=-1).astype(jnp.int32)
    bonus = jnp.where(stop, drawn, bonus)
    count = count + (going & accepted).astype(jnp.int32)
    cur = jnp.where(going, nxt, cur)
    going = going & accepted
  return count, cur, bonus


def medusa_step(cfg: ModelConfig, params, state: DecodeState, *, sampling: Sampling, spec: MedusaSpec
                ) -> DecodeState:
  """One Medusa step: verify the candidate tree in one forward, accept a path, commit its K/V."""
  tree = spec.tree
  cache = state.cache
  S = model_lib.cache_capacity(cache)
  idx = cache["index"]
  B = idx.shape[0]
  b_idx = jnp.arange(B)
  # --- candidates: [root, head1 top-k, head2 top-k, ...] gathered into tree order -------------
  flat = jnp.concatenate([state.last_B[:, None], state.extra], axis=-1)
  tokens_BxN = flat[:, jnp.asarray(tree.tree_indices)]
  positions = idx[:, None] + jnp.asarray(tree.depths)[None, :]
  mask = model_lib.cache_tree_mask(idx, tree.attn_mask, S)
  # Greedy verification needs only each node's argmax: no [B, N, V] logits are materialised.
  greedy = spec.acceptance == "greedy" or sampling.temperature <= 0
  logits_BxNxV, hidden_BxNxD, cache = model_lib.forward(cfg, params["base"], tokens_BxN, positions, mask, cache,
                                                        logits=not greedy)

  # --- acceptance ---------------------------------------------------------------------------------
  paths = jnp.asarray(tree.paths)            # [C, A+1] node ids, root first
  valid = jnp.asarray(tree.path_valid)[:, 1:]
  path_tokens = tokens_BxN[:, paths]         # [B, C, A+1]
  rng, sub = jax.random.split(state.rng)
  if greedy:
    # Node i's candidate is accepted iff it is its parent's argmax; comparing per node [B, N] argmaxes
    # gives the same acceptance as comparing each path's gathered [B, C, A, V] parent logits.
    top_BxN = model_lib.greedy_tokens(cfg, params["base"], hidden_BxNxD)
    ok = top_BxN[:, paths[:, :-1]] == path_tokens[:, :, 1:]
    run = jnp.cumprod((ok & valid[None]).astype(jnp.int32), axis=-1)  # accepted prefix per path
    length = run.sum(-1, dtype=jnp.int32)  # [B, C]; int32 like the cache index, also under x64
    best = jnp.argmax(length, axis=-1)  # the longest, the first in path order among equals
    count = jnp.take_along_axis(length, best[:, None], 1)[:, 0]
    last_node = paths[best, count]
    bonus = top_BxN[b_idx, last_node]
  elif spec.acceptance == "sample":
    # The walk targets plain sampling's distribution, nucleus included (already divided by T).
    count, last_node, bonus = _exact_sample_walk(tree, sampling_logits(logits_BxNxV, sampling), tokens_BxN,
                                                 sub, 1.0, spec.exact_renormalise)
    # The walk's nodes lie on some root-to-leaf path: pick one that passes through last_node.
    on_path = (paths == last_node[:, None, None]).any(-1)  # [B, C]
    best = jnp.argmax(on_path, axis=-1)
  else:
    parent_logits = logits_BxNxV[:, paths[:, :-1]]  # [B, C, A, V]  (typical acceptance)
    ok, logp = _typical_ok(parent_logits, path_tokens[:, :, 1:], sampling.temperature,
                           spec.typical_epsilon, spec.typical_delta)
    run = jnp.cumprod((ok & valid[None]).astype(jnp.int32), axis=-1)  # accepted prefix per path
    length = run.sum(-1, dtype=jnp.int32)  # [B, C]; int32 like the cache index, also under x64
    # Longest path; ties broken by the larger sum of log p over the accepted tokens.
    score = jnp.sum(jnp.where(run > 0, logp, 0.0), axis=-1)
    best_len = length.max(-1, keepdims=True)
    best = jnp.argmax(jnp.where(length == best_len, score, -jnp.inf), axis=-1)
    count = jnp.take_along_axis(length, best[:, None], 1)[:, 0]
    last_node = paths[best, count]
    bonus = sample_logits(logits_BxNxV[b_idx, last_node], sub, sampling)

  # --- commit: move the accepted path's K/V rows right after the prefix ---------------------------
  best_nodes = paths[best]                      # [B, A+1]
  N = tree.num_nodes

  def move(c):
    # Read back only the N rows this step wrote, pick the path's, write them after the prefix:
    # gathering from the whole cache made XLA-CPU transpose-copy every layer's cache each step.
    written = jax.vmap(lambda cb, i: jax.lax.dynamic_slice_in_dim(cb, i, N, axis=1))(c, idx)  # [B, K, N, E]
    rows = jnp.take_along_axis(written, best_nodes[:, None, :, None], axis=2)  # [B, K, A+1, E]
    return model_lib._write_rows(c, rows, idx)  # pylint: disable=protected-access
  if tree.num_paths == 1 and np.array_equal(tree.paths[0], np.arange(tree.paths.shape[1])):
    layers = cache["layers"]  # a chain: the accepted nodes 0..count already follow the prefix
  else:
    # (Skipping it with a lax.cond when nothing moves made XLA-CPU copy every cache array 3 times.)
    layers = [{"k": move(l["k"]), "v": move(l["v"])} for l in cache["layers"]]
  live = ~state.done_B
  cache = {"layers": layers, "index": idx + jnp.where(live, count + 1, 0)}

  # --- emit accepted tokens + the backbone's own next token; next candidates from the heads ----
  A = tree.depth + 1
  acc_tokens = jnp.take_along_axis(path_tokens, best[:, None, None], 1)[:, 0, 1:]  # [B, A-1]
  acc_tokens = jnp.concatenate([acc_tokens, jnp.zeros((B, 1), jnp.int32)], axis=-1)
  new = jnp.where(jnp.arange(A)[None] == count[:, None], bonus[:, None], acc_tokens)
  last_h = hidden_BxNxD[b_idx, last_node][:, None]
  extra = head_candidates(spec, cfg, params, last_h, bonus)
  state = state.replace(cache=cache, rng=rng, steps=state.steps + 1, extra=jnp.where(live[:, None], extra, state.extra))
  return emit(state, new, count + 1, cfg.eos_ids, sampling.max_new_tokens)


def make_decoder(cfg: ModelConfig, sampling: Sampling, spec: MedusaSpec | None = None,
                 placement: Any = None) -> Decoder:
  """A vanilla decoder, or a Medusa one when ``spec`` is given; sharded over a mesh with ``placement``."""
  if spec is None:
    return Decoder(cfg, sampling, placement=placement)
  from medusa_jax import heads as heads_lib  # pylint: disable=g-import-not-at-top
  return Decoder(cfg, sampling, step_fn=functools.partial(medusa_step, spec=spec), room=spec.tree.num_nodes,
                 prepare=functools.partial(heads_lib.prepare_for_decoding, spec.heads, cfg),
                 slack=spec.tree.depth + 1,
                 extra_fn=functools.partial(head_candidates, spec, cfg), placement=placement)
