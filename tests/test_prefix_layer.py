"""Tests of the heads' prefix layer (``heads.prefix_layer``: one decoder layer over the backbone's
hidden states feeds every head, with its own KV cache when decoding).

What is pinned:
  * a fresh layer (zero ``wo`` / ``w_down``) is the identity: head logits exactly as without it,
    while its attention and MLP already get gradients;
  * decoding, batched with ragged prompts, for Medusa and sequential heads and greedy / sample /
    typical acceptance: before every step the heads' input is the reference's, the layer run from
    scratch (no cache) over the backbone's hidden states of the whole accepted sequence; its cache
    index follows the backbone's; greedy output is vanilla greedy decoding's;
  * the same on a (one-device) decoding mesh, through ``DecodePlacement``'s shardings;
  * a few training steps with the layer lower the heads' loss and train the layer, and the
    trainer's cached hidden states (``train.cache_hidden``) give the same loss;
  * an export carries the layer and loads back; the release format refuses it.
Decoding runs in float64 (x64), so no argmax near-tie between the cached tree forward and the
reference can flip a token.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medusa_jax import checkpoint as ckpt_lib
from medusa_jax import config as config_lib
from medusa_jax import decode
from medusa_jax import heads as heads_lib
from medusa_jax import medusa
from medusa_jax import model as model_lib
from medusa_jax import optim
from medusa_jax import release_heads
from medusa_jax import sharding
from medusa_jax import trainer
from medusa_jax import tree as tree_lib
from medusa_jax.heads import HeadsConfig
from medusa_jax.model import ModelConfig

CFG = ModelConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                  max_seq_len=256, bos_id=None, eos_ids=(), dtype="float64", param_dtype="float64")
PROMPTS = [np.random.default_rng(5).integers(0, 64, n).tolist() for n in (6, 11, 3)]
MAX_NEW = 30
TREE = tree_lib.resolve("mc_sim_7b_63", num_heads=4, max_topk=CFG.vocab_size)
HEADS = {"medusa": HeadsConfig(num_heads=4, prefix_layer=True),
         "sequential": HeadsConfig(num_heads=4, prefix_layer=True, kind="sequential")}


def _normal(rng, shape, std):
  return rng.normal(0, std, shape)


def _random_prefix(cfg, seed, std=0.1):
  """A trained-looking prefix layer: every matrix random (wo and w_down too), unit norms."""
  rng = np.random.default_rng(seed)
  return {k: np.ones(shape) if k.endswith("norm") else _normal(rng, shape, std)
          for k, (shape, _) in heads_lib.prefix_shapes(cfg).items()}


@functools.lru_cache(maxsize=None)
def _params(kind):
  """float64 NumPy params: a backbone of std-0.1 matrices (attention and the MLP matter), random
  head blocks (and path projections) and a random prefix layer."""
  hcfg = HEADS[kind]
  rng = np.random.default_rng(1)
  is_spec = lambda x: isinstance(x, tuple) and isinstance(x[0], tuple)
  base = jax.tree_util.tree_map_with_path(
      lambda path, spec: np.ones(spec[0]) if path[-1].key.endswith("norm") else _normal(rng, spec[0], 0.1),
      model_lib.param_shapes(CFG), is_leaf=is_spec)
  M, D = hcfg.num_heads, CFG.dim
  med = {"w": _normal(rng, (M, 1, D, D), 0.1), "b": _normal(rng, (M, 1, D), 0.1),
         "prefix": _random_prefix(CFG, 2)}
  if hcfg.kind == "sequential":
    med["path_w"] = _normal(rng, (M, M, D, D), 0.1)
  return {"base": base, "medusa": med}


def _base32():
  """``_params``' backbone in float32 (NumPy: eager ``model.init_params`` compiles op by op)."""
  return jax.tree.map(lambda x: x.astype(np.float32), _params("medusa")["base"])


@functools.partial(jax.jit, static_argnums=0)
def _reference_inputs(hcfg, params, tokens_BxL, lengths_B):
  """(the heads' inputs, the backbone's hidden states) at every position, teacher-forced from
  scratch: the backbone, then the prefix layer, each one causal forward without a cache."""
  L = tokens_BxL.shape[1]
  positions = jnp.broadcast_to(jnp.arange(L), tokens_BxL.shape)
  mask = model_lib.causal_mask(lengths_B, L)
  _, hidden, _ = model_lib.forward(CFG, params["base"], tokens_BxL, positions, mask, logits=False)
  return heads_lib.heads_input(hcfg, CFG, params, hidden, positions, mask), hidden


@functools.lru_cache(maxsize=None)
def _vanilla():
  with jax.enable_x64(True):
    return medusa.make_decoder(CFG, decode.Sampling(max_new_tokens=MAX_NEW)).generate(
        {"base": _params("medusa")["base"]}, PROMPTS)[0]


def _walk(dec, params, rng):
  """Runs the decoder's own jitted step from its prefill; returns the outputs and, before each step,
  (backbone cache index, prefix cache index, the heads' input, live) per sequence."""
  dp = dec.prepare(params)
  state = dec.start(dp, PROMPTS, rng)
  step = dec.state_programs(dp, state)[0]
  seen = []
  while bool(decode.should_continue(state, dec.room)):
    seen.append((np.asarray(state.cache["index"]), np.asarray(state.draft.prefix["index"]),
                 np.asarray(state.draft.hidden_BxD), ~np.asarray(state.done_B)))
    state = step(dp, state)
  return decode.outputs(state), seen


def _check_against_reference(hcfg, params, outs, seen):
  """Before each step, each live sequence's heads' input is the reference's at its last cache row."""
  seqs = [p + o for p, o in zip(PROMPTS, outs)]
  tokens, lengths = decode.pad_prompts(seqs, decode.bucket(max(map(len, seqs))))
  ref, hidden = map(np.asarray, _reference_inputs(hcfg, params, jnp.asarray(tokens), jnp.asarray(lengths)))
  checked = 0
  for index_B, prefix_index_B, carry_BxD, live_B in seen:
    np.testing.assert_array_equal(prefix_index_B[live_B], index_B[live_B])
    for b in np.flatnonzero(live_B):
      np.testing.assert_allclose(carry_BxD[b], ref[b, index_B[b] - 1], rtol=1e-9, atol=1e-9)
      checked += 1
  # Not vacuous: the layer changes what the heads read, and steps accepted different numbers of tokens.
  assert np.abs(ref - hidden).max() > 0.1
  steps = [sum(1 for s in seen if s[3][b]) for b in range(len(PROMPTS))]
  assert checked == sum(steps)
  assert any(len(o) - 1 > s for o, s in zip(outs, steps)), (steps, [len(o) for o in outs])
  return steps


@pytest.mark.parametrize("kind,acceptance", [("medusa", "greedy"), ("sequential", "greedy"),
                                             ("medusa", "sample"), ("sequential", "typical")])
def test_decoding_feeds_the_heads_the_layer_over_the_accepted_history(kind, acceptance):
  hcfg = HEADS[kind]
  temperature = 0.0 if acceptance == "greedy" else 1.0
  sampling = decode.Sampling(temperature=temperature, max_new_tokens=MAX_NEW)
  # Exact sampling's tree walk unrolls over every node's children: a smaller tree compiles faster.
  tree = tree_lib.resolve("dense:4,2", num_heads=4) if acceptance == "sample" else TREE
  spec = medusa.MedusaSpec(heads=hcfg, tree=tree, acceptance=acceptance)
  with jax.enable_x64(True):
    params = jax.tree.map(jnp.asarray, _params(kind))
    outs, seen = _walk(medusa.make_decoder(CFG, sampling, spec), params, jax.random.PRNGKey(7))
    _check_against_reference(hcfg, params, outs, seen)
  assert all(len(o) == MAX_NEW for o in outs)
  if acceptance == "greedy":
    assert outs == _vanilla()


def test_decoding_on_a_mesh():
  """The prefix cache through ``DecodePlacement`` (its logical axes are the backbone cache's)."""
  hcfg = HEADS["medusa"]
  c = config_lib.default_config()
  spec = medusa.MedusaSpec(heads=hcfg, tree=TREE)
  with jax.enable_x64(True):
    pl = sharding.DecodePlacement.from_config(c, CFG, hcfg, devices=jax.devices()[:1], shape="data=1,fsdp=1,tensor=1")
    params = _params("medusa")
    p_sh = pl.put(params, pl.params(params))
    dec = medusa.make_decoder(CFG, decode.Sampling(max_new_tokens=MAX_NEW), spec, placement=pl)
    outs, seen = _walk(dec, p_sh, jax.random.PRNGKey(0))
    _check_against_reference(hcfg, jax.tree.map(jnp.asarray, params), outs, seen)
  assert outs == _vanilla()


def test_a_fresh_layer_is_the_identity():
  cfg = CFG.replace(dtype="float32", param_dtype="float32")
  hcfg = HeadsConfig(num_heads=3, prefix_layer=True)
  base = _base32()
  med = heads_lib.init_params(hcfg, cfg, base, rng=jax.random.PRNGKey(3))
  assert not np.any(med["prefix"]["wo"]) and not np.any(med["prefix"]["w_down"])
  med["w"] = 0.3 * jax.random.normal(jax.random.PRNGKey(1), med["w"].shape)
  hidden = jax.random.normal(jax.random.PRNGKey(2), (2, 9, cfg.dim))
  positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
  mask = model_lib.causal_mask(jnp.array([9, 6]), 9)

  def logits(prefix, through_layer: bool):
    params = {"base": base, "medusa": {**med, "prefix": prefix}}
    x = heads_lib.heads_input(hcfg, cfg, params, hidden, positions, mask) if through_layer else hidden
    return heads_lib.logits(hcfg, cfg, params, x)

  with_layer, without = jax.jit(lambda p: (logits(p, True), logits(p, False)))(med["prefix"])
  np.testing.assert_array_equal(with_layer, without)
  # ... and the layer still learns: its output projections get gradients.
  g = jax.jit(jax.grad(lambda p: jnp.sum(logits(p, True) ** 2)))(med["prefix"])
  assert float(jnp.abs(g["wo"]).max()) > 0 and float(jnp.abs(g["w_down"]).max()) > 0


def _batch(cfg, L=24):
  """Two packed rows of a short repeating text (learnable in a few steps), padding at the end."""
  seg = np.array([[1] * 13 + [2] * 9 + [0] * 2, [1] * 21 + [0] * 3], np.int32)
  pos = np.stack([np.concatenate([np.arange(13), np.arange(9), [0, 0]]), np.concatenate([np.arange(21), [0] * 3])])
  text = np.tile(np.array([5, 9, 2, 7, 5, 1, 3]), 4)[:L]
  tok = np.where(seg > 0, np.stack([text, np.roll(text, 3)]), 0).astype(np.int32)
  return {"tokens": jnp.asarray(tok), "loss_mask": jnp.asarray((seg > 0).astype(np.int32)),
          "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos.astype(np.int32))}


def test_tiny_training_lowers_the_loss():
  cfg = CFG.replace(dtype="float32", param_dtype="float32")
  c = config_lib.default_config()
  c.heads.update(dict(num_heads=2, prefix_layer=True))
  c.train.update(dict(seq_len=24, steps=10))
  hcfg = heads_lib.config_from(c)
  assert hcfg.prefix_layer
  base = _base32()
  params = {"base": base, "medusa": heads_lib.init_params(hcfg, cfg, base)}
  split = optim.split_for_training(c.train, params)
  assert set(split.tparams) == {"medusa"} and "wq" in split.tparams["medusa"]["prefix"]  # trains, by the rules
  sc = trainer.step_config(c, cfg, hcfg)
  batch = _batch(cfg)
  loss = lambda t, batch: trainer.loss_fn(sc, t, split.frozen, batch, jnp.asarray(0))[0]
  tx = optax.adam(3e-2)

  @jax.jit
  def step(t, opt):
    value, g = jax.value_and_grad(loss)(t, batch)
    updates, opt = tx.update(g, opt, t)
    return optax.apply_updates(t, updates), opt, value

  t, opt = split.tparams, tx.init(split.tparams)
  losses = []
  for _ in range(8):
    t, opt, value = step(t, opt)
    losses.append(float(value))
  assert losses[-1] < 0.8 * losses[0], losses
  assert float(jnp.abs(t["medusa"]["prefix"]["wo"]).max()) > 0  # the layer itself trained
  # train.cache_hidden: the looked-up hidden states are the backbone's, so the layer still applies.
  mask = model_lib.segment_causal_mask(batch["segment_ids"])

  @jax.jit
  def both(t):
    _, hidden, _ = model_lib.forward(cfg, base, batch["tokens"], batch["positions"], mask, logits=False)
    return loss(t, {**batch, "hidden": hidden}), loss(t, batch)

  cached, computed = both(t)
  np.testing.assert_allclose(float(cached), float(computed), rtol=1e-6)


def test_export_round_trip_and_release_format(tmp_path):
  cfg = CFG.replace(dtype="float32", param_dtype="float32")
  hcfg = HeadsConfig(num_heads=2, prefix_layer=True)
  base = _base32()
  med = heads_lib.init_params(hcfg, cfg, base)
  med["prefix"] = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _random_prefix(cfg, 4))
  path = str(tmp_path / "export")
  ckpt_lib.save_export(path, cfg, hcfg, {"base": base, "medusa": med}, include_base=False, model="test")
  params, loaded = ckpt_lib.load_export(path, cfg, base)
  assert loaded == hcfg
  jax.tree.map(np.testing.assert_array_equal, params["medusa"], med)
  with pytest.raises(release_heads.WeightsError, match="prefix layer"):
    release_heads.save(str(tmp_path / "release"), hcfg, cfg, med)
