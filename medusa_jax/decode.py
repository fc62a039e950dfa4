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
  return bucket(longest), min(bucket(need, 128), bucket(cfg.max_seq_len, 1))


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

def sample_logits(logits_BxV, rng, sampling: Sampling):
  """Greedy at temperature 0, else temperature + nucleus (top-p) sampling."""
  if sampling.temperature <= 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV.astype(jnp.float32) / sampling.temperature
  if sampling.top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    cutoff_idx = jnp.sum(cum < sampling.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_desc, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


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

  ``extra_fn(params, hidden_Bx1xD)`` computes the mode's extra carry from the last prompt position
  (Medusa: the heads' logits there).
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
      extra=None if extra_fn is None else extra_fn(params, last_h))
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
  """
  cfg: ModelConfig
  sampling: Sampling
  step_fn: Callable = vanilla_step
  room: int = 1
  slack: int = 1
  extra_fn: Callable | None = None

  def __post_init__(self):
    step = functools.partial(self.step_fn, self.cfg, sampling=self.sampling)
    self._prefill = jax.jit(functools.partial(
        prefill, self.cfg, sampling=self.sampling, slack=self.slack, extra_fn=self.extra_fn),
        static_argnames=("capacity",))
    # The cache is donated: each step updates it in place instead of copying S rows per layer.
    self._step = jax.jit(step, donate_argnums=(1,))
    self._loop = jax.jit(lambda p, s: run_loop(functools.partial(step, p), s, self.room), donate_argnums=(1,))

  def start(self, params, prompts: list[list[int]], rng=None) -> DecodeState:
    P, S = plan_cache(self.cfg, [len(p) for p in prompts], self.sampling.max_new_tokens, self.room)
    arr, lengths = pad_prompts(prompts, P)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return self._prefill(params, jnp.asarray(arr), jnp.asarray(lengths), rng, capacity=S)

  def finish(self, params, state: DecodeState) -> DecodeState:
    return self._loop(params, state)

  def generate(self, params, prompts: list[list[int]], rng=None) -> tuple[list[list[int]], DecodeState]:
    state = self.finish(params, self.start(params, prompts, rng))
    return outputs(state), state

  def stream(self, params, prompts: list[list[int]], rng=None) -> Iterator[list[list[int]]]:
    """Yields, after the prefill and after each step, the tokens each sequence newly emitted."""
    state = self.start(params, prompts, rng)
    seen = np.zeros(len(prompts), np.int64)
    while True:
      num = np.asarray(state.num_B)
      toks = np.asarray(state.tokens_BxT)
      yield [toks[b, seen[b]:num[b]].tolist() for b in range(len(prompts))]
      seen = num
      if not bool(_should_continue(state, self.room)):
        return
      state = self._step(params, state)


def outputs(state: DecodeState) -> list[list[int]]:
  toks, num = np.asarray(state.tokens_BxT), np.asarray(state.num_B)
  return [toks[b, :num[b]].tolist() for b in range(toks.shape[0])]
