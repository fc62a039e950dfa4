"""Tests of the backbone (medusa_jax/model.py): big-config shapes, masks by gradients, cached decoding.

Parity with transformers lives in test_convert.py; here the model is checked against itself: a
cached step-by-step forward must equal one full forward, and masks must cut gradients exactly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax import model as model_lib
from medusa_jax.model import ModelConfig

LLAMA2_7B = ModelConfig(vocab_size=32000, dim=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                        head_dim=128, mlp_dim=11008, max_seq_len=4096)
LLAMA3_8B = ModelConfig(vocab_size=128256, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                        head_dim=128, mlp_dim=14336, rope_theta=500000.0, max_seq_len=8192,
                        rope_scaling=(8.0, 1.0, 4.0, 8192))


def _full_forward(cfg, base, tokens_BxL):
  B, L = tokens_BxL.shape
  positions = jnp.broadcast_to(jnp.arange(L), (B, L))
  mask = model_lib.causal_mask(jnp.full((B,), L), L)
  return model_lib.forward(cfg, base, tokens_BxL, positions, mask)


# ----- shapes of real-size configs (abstract: costs nothing) -------------------------------------


@pytest.mark.parametrize("cfg,num_params", [(LLAMA2_7B, 6_738_415_616), (LLAMA3_8B, 8_030_261_248)],
                         ids=["llama2-7b", "llama3-8b"])
def test_big_config_shapes(cfg, num_params):
  params = jax.eval_shape(functools.partial(model_lib.init_params, cfg), jax.random.PRNGKey(0))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == num_params
  layer = params["layers_0"]
  assert layer["wq"].shape == (cfg.dim, cfg.num_heads, cfg.head_dim)
  assert layer["wk"].shape == (cfg.dim, cfg.num_kv_heads, cfg.head_dim)
  assert layer["wo"].shape == (cfg.num_heads, cfg.head_dim, cfg.dim)
  assert params["lm_head"].shape == (cfg.dim, cfg.vocab_size)

  # Every parameter has one logical axis name per dimension.
  axes = model_lib.param_axes(cfg)
  is_axes = lambda x: isinstance(x, tuple)
  assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(params)
  for a, p in zip(jax.tree.leaves(axes, is_leaf=is_axes), jax.tree.leaves(params)):
    assert len(a) == p.ndim

  B, L, S = 2, 16, 64
  cache = jax.eval_shape(lambda: model_lib.init_cache(cfg, B, S))
  assert len(cache["layers"]) == cfg.num_layers
  assert cache["layers"][0]["k"].shape == (B, cfg.num_kv_heads, S, cfg.head_dim)
  assert cache["index"].shape == (B,) and cache["index"].dtype == jnp.int32

  def fwd(base, cache):
    tokens = jnp.zeros((B, L), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(L), (B, L))
    mask = model_lib.cache_causal_mask(cache["index"], L, S)
    return model_lib.forward(cfg, base, tokens, positions, mask, cache)

  logits, hidden, new_cache = jax.eval_shape(fwd, params, cache)
  assert logits.shape == (B, L, cfg.vocab_size) and logits.dtype == jnp.float32
  assert hidden.shape == (B, L, cfg.dim)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), new_cache) == jax.tree.map(lambda x: (x.shape, x.dtype),
                                                                                cache)

  # Training path (no cache): [B, L, L] mask, no cache returned.
  _, _, none = jax.eval_shape(lambda b: _full_forward(cfg, b, jnp.zeros((B, L), jnp.int32)), params)
  assert none is None


def test_tied_embeddings_have_no_lm_head():
  cfg = LLAMA2_7B.replace(tie_embeddings=True, qkv_bias=True)
  params = jax.eval_shape(functools.partial(model_lib.init_params, cfg), jax.random.PRNGKey(0))
  assert "lm_head" not in params
  assert params["layers_3"]["bk"].shape == (cfg.num_kv_heads, cfg.head_dim)


# ----- cached decoding equals one full forward -------------------------------------------------


def test_cached_decoding_equals_full_forward(tiny):
  cfg, params = tiny
  base = params["base"]
  B, L, S = 2, 24, 64
  tokens = jax.random.randint(jax.random.PRNGKey(1), (B, L), 0, cfg.vocab_size)
  full_logits, full_hidden, _ = jax.jit(functools.partial(_full_forward, cfg))(base, tokens)

  @jax.jit
  def chunk(base, cache, toks):
    n = toks.shape[1]
    idx = cache["index"]
    positions = idx[:, None] + jnp.arange(n)[None, :]
    mask = model_lib.cache_causal_mask(idx, n, S)
    logits, hidden, cache = model_lib.forward(cfg, base, toks, positions, mask, cache)
    return logits, hidden, model_lib.advance(cache, jnp.full((B,), n))

  # A prefill of 10, a chunk of 3 at a non-zero offset, then one token at a time.
  cache = model_lib.init_cache(cfg, B, S)
  pieces, start = [], 0
  for n in [10, 3] + [1] * (L - 13):
    logits, hidden, cache = chunk(base, cache, tokens[:, start:start + n])
    pieces.append((logits, hidden))
    start += n
  assert int(cache["index"][0]) == L
  logits = jnp.concatenate([p[0] for p in pieces], axis=1)
  hidden = jnp.concatenate([p[1] for p in pieces], axis=1)
  assert float(jnp.abs(full_logits).max()) > 1.0  # the comparison below is not between near-zeros
  np.testing.assert_allclose(logits, full_logits, atol=1e-5, rtol=0)
  np.testing.assert_allclose(hidden, full_hidden, atol=1e-5, rtol=0)


def test_cache_index_is_per_sequence(tiny):
  """Two sequences at different cache offsets decode as if each were alone."""
  cfg, params = tiny
  base = params["base"]
  S = 32
  seqs = [np.array([5, 9, 17, 33, 65, 129, 7]), np.array([11, 3, 200, 42])]

  def last_logits_alone(seq):
    logits, _, _ = jax.jit(functools.partial(_full_forward, cfg))(base, jnp.asarray(seq)[None])
    return logits[0, -1]

  # Prefill both prompts (right-padded) except their last token, then feed the last tokens together.
  P = max(len(s) for s in seqs) - 1
  prompts = np.zeros((2, P), np.int32)
  for b, s in enumerate(seqs):
    prompts[b, :len(s) - 1] = s[:-1]
  @jax.jit
  def run(base, prompts, idx, last):
    cache = model_lib.init_cache(cfg, 2, S)
    positions = jnp.broadcast_to(jnp.arange(P), (2, P))
    _, _, cache = model_lib.forward(cfg, base, prompts, positions,
                                    model_lib.cache_causal_mask(cache["index"], P, S), cache, logits=False)
    cache = {**cache, "index": idx}
    return model_lib.forward(cfg, base, last, idx[:, None], model_lib.cache_causal_mask(idx, 1, S), cache)[0]

  idx = jnp.array([len(s) - 1 for s in seqs], jnp.int32)
  logits = run(base, jnp.asarray(prompts), idx, jnp.array([[s[-1]] for s in seqs], jnp.int32))
  for b, s in enumerate(seqs):
    np.testing.assert_allclose(logits[b, 0], last_logits_alone(s), atol=1e-5, rtol=0)


# ----- masks, checked by gradients -----------------------------------------------------------------


def _embed_grad_rows(base, tokens_1xL, fwd, t):
  """|d sum(logits[0, t]) / d embed| summed per embedding row, for each position's token."""
  g = _embed_grad(fwd, base, tokens_1xL, t)
  return np.abs(np.asarray(g)[np.asarray(tokens_1xL[0])]).sum(-1)


@functools.partial(jax.jit, static_argnums=0)
def _embed_grad(fwd, base, tokens_1xL, t):
  def f(embed):
    logits, _, _ = fwd({**base, "embed": embed}, tokens_1xL)
    return logits[0, t].sum()
  return jax.grad(f)(base["embed"])


def test_causal_by_gradients(tiny):
  cfg, params = tiny
  assert not cfg.tie_embeddings  # with tied embeddings the LM head would touch every row
  base = params["base"]
  L = 12
  tokens = jnp.arange(10, 10 + L)[None]  # a distinct token (embedding row) per position
  fwd = lambda b, toks: _full_forward(cfg, b, toks)
  for t in (0, 5, L - 1):
    rows = _embed_grad_rows(base, tokens, fwd, t)
    assert (rows[:t + 1] > 0).all(), rows
    assert (rows[t + 1:] == 0).all(), rows


def test_cache_mask_causal_by_gradients(tiny):
  """The same through the cache path: a chunk written at offset 4 sees the prefix and itself only."""
  cfg, params = tiny
  base, S = params["base"], 16
  prefix = jnp.arange(40, 44)[None]
  chunk = jnp.arange(60, 66)[None]

  def fwd(b, toks):
    cache = model_lib.init_cache(cfg, 1, S)
    _, _, cache = model_lib.forward(cfg, b, prefix, jnp.arange(4)[None],
                                    model_lib.cache_causal_mask(cache["index"], 4, S), cache)
    cache = model_lib.advance(cache, jnp.array([4]))
    mask = model_lib.cache_causal_mask(cache["index"], 6, S)
    return model_lib.forward(cfg, b, toks, 4 + jnp.arange(6)[None], mask, cache)

  for t in (0, 2, 5):
    g = _embed_grad_rows(base, chunk, fwd, t)
    assert (g[:t + 1] > 0).all() and (g[t + 1:] == 0).all(), g
  # ...and the prefix rows do receive gradient (they are attended to through the cache).
  g = np.abs(np.asarray(_embed_grad(fwd, base, chunk, 0))).sum(-1)
  assert (g[40:44] > 0).all() and g[61:].sum() == 0


def test_causal_mask_hides_right_padding(tiny):
  cfg, params = tiny
  base, L = params["base"], 8
  tokens = jnp.arange(100, 100 + L)[None]
  length = 5

  def fwd(b, toks):
    positions = jnp.arange(L)[None]
    return model_lib.forward(cfg, b, toks, positions, model_lib.causal_mask(jnp.array([length]), L))

  for t in (0, length - 1):
    g = _embed_grad_rows(base, tokens, fwd, t)
    assert (g[:t + 1] > 0).all() and (g[t + 1:] == 0).all(), g
  # Valid positions are unaffected by the padding that follows them.
  full, _, _ = jax.jit(functools.partial(_full_forward, cfg))(base, tokens[:, :length])
  padded, _, _ = jax.jit(fwd)(base, tokens)
  np.testing.assert_allclose(padded[:, :length], full, atol=1e-5, rtol=0)


def test_segment_mask_isolates_packed_segments(tiny):
  cfg, params = tiny
  base = params["base"]
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
  tokens = jnp.arange(20, 28)[None]

  def fwd(b, toks):
    return model_lib.forward(cfg, b, toks, jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]]),
                             model_lib.segment_causal_mask(seg))

  g = _embed_grad_rows(base, tokens, fwd, 4)  # second token of segment 2
  np.testing.assert_array_equal(g > 0, [False, False, False, True, True, False, False, False])
  g = _embed_grad_rows(base, tokens, fwd, 2)  # last token of segment 1
  np.testing.assert_array_equal(g > 0, [True, True, True, False, False, False, False, False])
  # A packed segment equals the same tokens run alone.
  packed, _, _ = jax.jit(fwd)(base, tokens)
  alone, _, _ = jax.jit(functools.partial(_full_forward, cfg))(base, tokens[:, 3:7])
  np.testing.assert_allclose(packed[:, 3:7], alone, atol=1e-5, rtol=0)


def test_chain_tree_mask_equals_causal_mask():
  """A tree that is a single chain is a causal block: cache_tree_mask must agree with cache_causal_mask."""
  N, S = 5, 16
  idx = jnp.array([0, 3, 11], jnp.int32)
  chain = np.tril(np.ones((N, N), bool))
  np.testing.assert_array_equal(model_lib.cache_tree_mask(idx, chain, S),
                                model_lib.cache_causal_mask(idx, N, S))


def test_rope_scaling_changes_only_low_frequencies():
  cfg = ModelConfig(vocab_size=8, dim=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=8)
  plain = model_lib.rope_inv_freq(cfg)
  scaled = model_lib.rope_inv_freq(cfg.replace(rope_scaling=(8.0, 1.0, 4.0, 64)))
  wavelen = 2 * np.pi / plain
  np.testing.assert_array_equal(scaled[wavelen < 64 / 4], plain[wavelen < 64 / 4])
  np.testing.assert_allclose(scaled[wavelen > 64], plain[wavelen > 64] / 8.0, rtol=1e-6)
