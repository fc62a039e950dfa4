"""Decoding on device: the loop state, prefill, the vanilla step, emission and the generation loop.

The whole generation runs inside ``jax.lax.while_loop`` (no host round trip per token); the
streaming variant drives the *same* jitted step from a Python loop and yields tokens as they come.
A ``Decoder`` binds one step function (the vanilla step here, Medusa's in ``medusa.py``) to a model
and a sampling setting, on one device or on a mesh (``placement``), with one code path for both.

Prompts of different lengths are right-padded: sequence b's prompt occupies cache rows
0..len[b]-1 and every sequence then advances its own ``cache['index']``.

``batched_generate`` answers many prompts in batches of one shape (distillation, calibration).

Shape letters: B batch, P padded prompt length, S cache rows, T emitted-token buffer, D model, V
vocabulary, A tokens one step may emit.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from medusa_jax import backends
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


def sampling_from(config) -> Sampling:
  """The sampling a config file asks for (``config.decode``)."""
  d = config.decode
  return Sampling(temperature=float(d.temperature), top_p=float(d.top_p), max_new_tokens=int(d.max_new_tokens))


@flax.struct.dataclass
class DraftCarry:
  """What a drafting mode (Medusa) carries from one step to the next: the backbone's final hidden
  state at the position whose prediction is the newest emitted token. The heads read it (and that
  token, ``DecodeState.last_B``) to draft the next step's candidates.

  With the heads' prefix layer (``heads.prefix_layer``) ``hidden_BxD`` is that layer's output there
  and ``prefix`` its KV cache (``heads.prefix_cache``), holding the accepted positions' rows only."""
  hidden_BxD: jax.Array
  prefix: dict | None = None


@flax.struct.dataclass
class DecodeState:
  cache: dict
  tokens_BxT: jax.Array      # emitted tokens (T = max_new_tokens + slack), padded with 0
  num_B: jax.Array           # emitted count per sequence
  done_B: jax.Array          # EOS seen or max_new_tokens reached
  last_B: jax.Array          # the newest emitted token: the next one fed to the model
  rng: jax.Array
  steps: jax.Array           # decoding steps taken (forward passes after the prefill)
  draft: DraftCarry | None = None  # drafting modes only


@flax.struct.dataclass
class DecodeParams:
  """What a decoder runs on (``Decoder.prepare``): the shared ``{base, medusa}`` params pytree,
  unchanged, beside loop-invariant copies the decoder owns. Training never sees the copies.

  ``prepared``: a projection backend's copy of the backbone's projections (``backends.prepare`` of
  ``model.projections``), or None where XLA's dots serve them all.
  ``heads``: the heads' loop-invariant weights (``heads.decoding_weights``), ``{}`` without heads.
  """
  params: dict
  prepared: dict | None = None
  heads: dict = flax.struct.field(default_factory=dict)


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
    window = (f" (its {cfg.sliding_window}-token sliding window: longer contexts would need sliding-window "
              "attention, which is not implemented)") if cfg.sliding_window else ""
    raise PromptTooLongError(
        f"The prompt has {longest} tokens; with max_new_tokens={max_new_tokens} it needs {need} positions "
        f"but the model's context is {cfg.max_seq_len}{window}. Shorten the prompt or lower --max_new_tokens.")
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

def prefill(cfg: ModelConfig, dp: DecodeParams, prompts_BxP, lengths_B, rng, *, capacity: int,
            sampling: Sampling, slack: int = 1, carry_draft: bool = False, greedy_first: bool = False,
            draft_prefill: Callable | None = None) -> DecodeState:
  """Runs the prompts through the model, chooses the first new token and returns the loop state.

  ``carry_draft``: keep the last prompt position's hidden state for the first draft (Medusa);
  ``draft_prefill(dp, hidden_BxPxD, lengths_B, capacity) -> DraftCarry`` makes that carry instead
  (Medusa's prefix layer runs over the whole prompt).
  ``greedy_first``: take the first token greedily whatever the temperature (the paper's typical
  acceptance takes every token that is not a verified candidate greedily).
  """
  base = dp.params["base"]
  B, P = prompts_BxP.shape
  cache = model_lib.init_cache(cfg, B, capacity)
  positions_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  mask = model_lib.cache_causal_mask(cache["index"], P, capacity)
  _, hidden_BxPxD, cache = model_lib.forward(cfg, base, prompts_BxP, positions_BxP, mask, cache, logits=False,
                                             prepared=dp.prepared)
  cache = {**cache, "index": lengths_B.astype(jnp.int32)}
  last_h_Bx1xD = jnp.take_along_axis(hidden_BxPxD, (lengths_B - 1)[:, None, None], axis=1)
  logits_BxV = model_lib.project_logits(cfg, base, last_h_Bx1xD, dp.prepared)[:, 0]
  rng, sub = jax.random.split(rng)
  first_B = sample_logits(logits_BxV, sub, Sampling(temperature=0.0) if greedy_first else sampling)
  T = sampling.max_new_tokens + slack
  state = DecodeState(
      cache=cache, tokens_BxT=jnp.zeros((B, T), jnp.int32), num_B=jnp.zeros((B,), jnp.int32),
      done_B=jnp.zeros((B,), bool), last_B=first_B, rng=rng, steps=jnp.zeros((), jnp.int32),
      draft=None if not carry_draft else (DraftCarry(last_h_Bx1xD[:, 0]) if draft_prefill is None
                                          else draft_prefill(dp, hidden_BxPxD, lengths_B, capacity)))
  return emit(state, first_B[:, None], jnp.ones((B,), jnp.int32), cfg.eos_ids, sampling.max_new_tokens)


def vanilla_step(cfg: ModelConfig, dp: DecodeParams, state: DecodeState, *, sampling: Sampling) -> DecodeState:
  """Feeds each sequence's newest token and emits one more."""
  cache = state.cache
  S = model_lib.cache_capacity(cache)
  idx_B = cache["index"]
  mask = model_lib.cache_causal_mask(idx_B, 1, S)
  logits_Bx1xV, _, cache = model_lib.forward(cfg, dp.params["base"], state.last_B[:, None], idx_B[:, None], mask,
                                             cache, prepared=dp.prepared)
  cache = model_lib.advance(cache, (~state.done_B).astype(jnp.int32))
  rng, sub = jax.random.split(state.rng)
  next_B = sample_logits(logits_Bx1xV[:, 0], sub, sampling)
  state = state.replace(cache=cache, rng=rng, steps=state.steps + 1)
  return emit(state, next_B[:, None], jnp.ones_like(state.num_B), cfg.eos_ids, sampling.max_new_tokens)


def should_continue(state: DecodeState, room: int) -> jax.Array:
  """Some sequence is unfinished and every unfinished one has ``room`` free cache rows."""
  S = model_lib.cache_capacity(state.cache)
  fits = state.done_B | (state.cache["index"] + room <= S)
  return jnp.any(~state.done_B) & jnp.all(fits)


def run_loop(step: Callable[[DecodeState], DecodeState], state: DecodeState, room: int) -> DecodeState:
  """The whole generation in one ``while_loop``: stops when all are done or the cache is full."""
  return jax.lax.while_loop(lambda s: should_continue(s, room), step, state)


# ----------------------------------------------------------------------------------------------
# A compiled decoder bound to one model, mode and sampling setting
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Decoder:
  """Jitted prefill / step / loop for one config and mode; the params are passed per call.

  ``step_fn(cfg, dparams, state, sampling=...)`` is the mode's step, ``room`` the cache rows a step
  writes, ``slack`` how many tokens a step may emit beyond ``max_new_tokens`` before truncation,
  ``carry_draft``/``greedy_first``/``draft_prefill`` as in ``prefill``, ``heads_weights(params,
  backend=) -> dict`` the mode's loop-invariant head weights (``DecodeParams.heads``; ``backend``:
  a projection backend serves the backbone, so the heads' projection gets its copy too).
  ``placement`` (a ``sharding.DecodePlacement``) runs them on a device mesh with explicit shardings
  (params by their logical axes, cache and per-sequence state by batch / kv heads); None: one
  device, where XLA places everything and a projection backend (the CPU kernel) may be used.

  Call ``prepare(params)`` once and pass its ``DecodeParams`` to ``generate``/``start``/``stream``:
  given a plain params dict they prepare it on every call (a backend's copy of the backbone copies
  its weights once more each time).
  """
  cfg: ModelConfig
  sampling: Sampling
  step_fn: Callable = vanilla_step
  room: int = 1
  slack: int = 1
  carry_draft: bool = False
  greedy_first: bool = False
  heads_weights: Callable | None = None
  placement: Any = None
  draft_prefill: Callable | None = None

  def __post_init__(self):
    self.step = functools.partial(self.step_fn, self.cfg, sampling=self.sampling)
    self._prefill_fn = functools.partial(prefill, self.cfg, sampling=self.sampling, slack=self.slack,
                                         carry_draft=self.carry_draft, greedy_first=self.greedy_first,
                                         draft_prefill=self.draft_prefill)
    self._loop_fn = lambda dp, state: run_loop(functools.partial(self.step, dp), state, self.room)
    self._prefills, self._steps = {}, {}

  # --- params -----------------------------------------------------------------------------------

  def prepare(self, params) -> DecodeParams:
    """The ``DecodeParams`` this decoder runs on: the hook through which a projection backend makes
    its copy of the backbone's projections (``backends.prepare``; on one device only). Given another
    decoder's ``DecodeParams`` of the same backbone (vanilla and Medusa in one benchmark), its copy
    is shared, not remade."""
    prepared = None
    if isinstance(params, DecodeParams):
      params, prepared = params.params, params.prepared
    elif self.placement is None:
      prepared = backends.prepare(model_lib.projections, self.cfg, params["base"])
    heads = {} if self.heads_weights is None else self.heads_weights(params, backend=prepared is not None)
    return DecodeParams(params=params, prepared=prepared, heads=heads)

  def _prepared(self, params) -> DecodeParams:
    return params if isinstance(params, DecodeParams) else self.prepare(params)

  # --- compiled programs (one code path for one device and for a mesh) ----------------------------

  def _jit(self, fn, in_shardings, out_shardings, **kw):
    if self.placement is None:  # one device: XLA places everything
      return jax.jit(fn, **kw)
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, **kw)

  def prefill_program(self, dp: DecodeParams, batch: int, prompt_len: int, capacity: int):
    """(jitted prefill(dp, prompts, lengths, rng), shardings of its inputs or None on one device).

    On a mesh, one per (params structure, batch, prompt length, capacity): whether the batch splits
    over the data axes depends on its size. ``dp`` may be abstract (``jax.ShapeDtypeStruct``s), so
    the programs can be lowered and compiled ahead of time (``medusa_jax.fit``).
    """
    key = (capacity,) if self.placement is None else (jax.tree.structure(dp), batch, prompt_len, capacity)
    if key not in self._prefills:
      fn = functools.partial(self._prefill_fn, capacity=capacity)
      in_sh = out_sh = None
      if self.placement is not None:
        pl = self.placement
        # Prompts and lengths are per-sequence (batch over the data axes); the rng key is replicated.
        in_sh = (pl.decode_params(dp), pl.batch((batch, prompt_len)), pl.batch((batch,)), pl.replicated)
        out_sh = pl.state(jax.eval_shape(fn, dp, jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32),
                                         jax.ShapeDtypeStruct((batch,), jnp.int32),
                                         jax.ShapeDtypeStruct((2,), jnp.uint32)))
      self._prefills[key] = (self._jit(fn, in_sh, out_sh), in_sh)
    return self._prefills[key]

  def state_programs(self, dp: DecodeParams, state: DecodeState):
    """(jitted step(dp, state), jitted loop(dp, state)) for states shaped like ``state`` (concrete
    or abstract). The state, cache included, is donated: each step updates it in place instead of
    copying S rows per layer, and on a mesh it comes back with the shardings it went in with."""
    key = None if self.placement is None else (
        jax.tree.structure(dp), state.num_B.shape[0], model_lib.cache_capacity(state.cache))
    if key not in self._steps:
      sh = None if self.placement is None else (self.placement.decode_params(dp), self.placement.state(state))
      out = None if sh is None else sh[1]
      self._steps[key] = (self._jit(self.step, sh, out, donate_argnums=(1,)),
                          self._jit(self._loop_fn, sh, out, donate_argnums=(1,)))
    return self._steps[key]

  # --- generation ---------------------------------------------------------------------------------

  def start(self, params, prompts: list[list[int]], rng=None) -> DecodeState:
    """The prefill: the loop state after each prompt's first new token."""
    dp = self._prepared(params)
    P, S = plan_cache(self.cfg, [len(p) for p in prompts], self.sampling.max_new_tokens, self.room)
    arr, lengths = pad_prompts(prompts, P)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    fn, in_sh = self.prefill_program(dp, len(prompts), P, S)
    args = (jnp.asarray(arr), jnp.asarray(lengths), rng)
    if in_sh is not None:
      # Every host passes the same prompts; put builds each host's shards from its copy.
      args = self.placement.put((arr, lengths, np.asarray(rng)), in_sh[1:])
    return fn(dp, *args)

  def finish(self, params, state: DecodeState) -> DecodeState:
    """Runs the loop from ``state`` (made by ``start``) until every sequence is done."""
    dp = self._prepared(params)
    return self.state_programs(dp, state)[1](dp, state)

  def generate(self, params, prompts: list[list[int]], rng=None) -> tuple[list[list[int]], DecodeState]:
    dp = self._prepared(params)
    state = self.finish(dp, self.start(dp, prompts, rng))
    return outputs(state), state

  def stream(self, params, prompts: list[list[int]], rng=None) -> Iterator[list[list[int]]]:
    """Yields, after the prefill and after each step, the tokens each sequence newly emitted; the
    steps are the loop's own jitted step."""
    dp = self._prepared(params)
    state = self.start(dp, prompts, rng)
    step = self.state_programs(dp, state)[0]
    seen = np.zeros(len(prompts), np.int64)
    while True:
      num = host_value(state.num_B)
      toks = host_value(state.tokens_BxT)
      yield [toks[b, seen[b]:num[b]].tolist() for b in range(len(prompts))]
      seen = num
      if not bool(should_continue(state, self.room)):
        return
      state = step(dp, state)


def host_value(x) -> np.ndarray:
  """``x`` whole, as a NumPy array on this host. With several processes a batch split over the data
  axes has rows on other hosts' devices, which only a gather (every host calls this) brings here."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def outputs(state: DecodeState) -> list[list[int]]:
  toks, num = host_value(state.tokens_BxT), host_value(state.num_B)
  return [toks[b, :num[b]].tolist() for b in range(toks.shape[0])]


# ----------------------------------------------------------------------------------------------
# Many prompts
# ----------------------------------------------------------------------------------------------

def batched_generate(decoder: Decoder, params, prompts: Sequence[Sequence[int]], batch_size: int,
                     rng) -> Iterator[tuple[list[int], list[list[int]]]]:
  """Generates for all prompts, shortest first; yields ``(indices into prompts, outputs)`` per batch.

  Sorting by length keeps the padding within a batch small and the number of prompt-length
  buckets (compilations) low. A short last batch is filled up with copies of its last prompt, so
  every batch has the same shape and the loop is not compiled again for one odd size.
  """
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  for n, start in enumerate(range(0, len(order), batch_size)):
    idx = order[start:start + batch_size]
    batch = [list(prompts[i]) for i in idx]
    batch += [batch[-1]] * (batch_size - len(batch))
    outs, _ = decoder.generate(params, batch, jax.random.fold_in(rng, n))
    yield idx, outs[:len(idx)]


def reply_text(tokenizer, tokens: Sequence[int], eos_ids: Sequence[int]) -> str:
  """The decoded reply, without its end token (the chat template adds its own when rendering)."""
  tokens = list(tokens)
  if tokens and tokens[-1] in eos_ids:
    tokens = tokens[:-1]
  return tokenizer.decode(tokens, skip_special_tokens=True)
