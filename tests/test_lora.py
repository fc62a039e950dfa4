"""LoRA adapters (medusa_jax/lora.py): fresh ones change nothing, merged ones are W + (alpha / r) A B,
the bf16 decoding export is that merge rounded and decodes like the adapted forward, and each
adapter carries the logical axes of the matrix it adapts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax import lora
from medusa_jax import model as model_lib
from medusa_jax.model import ModelConfig

CFG = ModelConfig(vocab_size=64, dim=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, mlp_dim=24,
                  max_seq_len=64, bos_id=None, eos_ids=())
LCFG = lora.LoraConfig(rank=4, alpha=8.0)


def _forward(base, tokens):
  B, L = tokens.shape
  return model_lib.forward(CFG, base, tokens, jnp.broadcast_to(jnp.arange(L), (B, L)),
                           model_lib.causal_mask(jnp.full((B,), L), L))[0]


def test_fresh_adapters_leave_the_forward_unchanged():
  base = model_lib.init_params(CFG, jax.random.PRNGKey(0))
  ad = lora.init(LCFG, CFG, jax.random.PRNGKey(1))
  assert sorted(ad) == ["layers_0", "layers_1"]
  assert sorted(ad["layers_0"]) == sorted(["wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"])
  assert ad["layers_0"]["wo"]["a"].shape == (4, 4, 4) and ad["layers_0"]["wo"]["b"].shape == (4, 16)
  assert float(jnp.abs(ad["layers_0"]["wq"]["a"]).max()) > 0  # A random, B zero
  merged = lora.merge(LCFG, base, ad)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, merged, base)))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)))
  np.testing.assert_array_equal(_forward(merged, tokens), _forward(base, tokens))


def test_merged_weights_are_w_plus_scaled_ab_and_base_is_untouched():
  base = model_lib.init_params(CFG, jax.random.PRNGKey(0))
  before = jax.tree.map(np.asarray, base)
  ad = jax.tree.map(lambda x: x + 0.1, lora.init(LCFG, CFG, jax.random.PRNGKey(1)))
  merged = lora.merge(LCFG, base, ad)
  a, b = np.asarray(ad["layers_1"]["wo"]["a"], np.float64), np.asarray(ad["layers_1"]["wo"]["b"], np.float64)
  want = np.asarray(base["layers_1"]["wo"], np.float64) + (8.0 / 4) * np.einsum("her,rd->hed", a, b)
  np.testing.assert_allclose(merged["layers_1"]["wo"], want, rtol=1e-6, atol=1e-7)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, before, jax.tree.map(np.asarray, base))))


def test_bf16_export_is_the_rounded_merge_and_decodes_like_the_adapted_forward():
  """The decoding export stores the merge in the base's dtype. With bf16 weights that is a real
  conversion (at float32 the export would be the float32 merge itself, compared with itself): each
  exported matrix must be the bf16 rounding of W + (alpha / r) A B computed in float64, and its
  forward must match training's adapted forward (the float32 merge) up to that rounding, far
  closer than to the unadapted base."""
  cfg = CFG.replace(param_dtype="bfloat16")
  base = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  ad = jax.tree.map(lambda x: x + 0.1, lora.init(LCFG, cfg, jax.random.PRNGKey(1)))
  exported = lora.merge(LCFG, base, ad, dtype=cfg.param_dtype)
  for layer, mats in ad.items():
    for name, adapter in mats.items():
      w = np.asarray(base[layer][name], np.float64)
      a, b = np.asarray(adapter["a"], np.float64), np.asarray(adapter["b"], np.float64)
      r = a.shape[-1]
      want = w + LCFG.scale * (a.reshape(-1, r) @ b.reshape(r, -1)).reshape(w.shape)
      got = exported[layer][name]
      assert got.dtype == jnp.bfloat16, (layer, name, got.dtype)
      # One bf16 step at most: float32 accumulation, then rounding, may land on the other side of a tie.
      np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(jnp.asarray(want, jnp.bfloat16), np.float64),
                                 rtol=2.0 ** -7, atol=0, err_msg=f"{layer}/{name}")
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 7)))
  run = lambda p: np.asarray(model_lib.forward(cfg, p, tokens, jnp.broadcast_to(jnp.arange(7), (2, 7)),
                                               model_lib.causal_mask(jnp.full((2,), 7), 7))[0], np.float64)
  adapted, got, unadapted = run(lora.merge(LCFG, base, ad)), run(exported), run(base)
  assert not np.array_equal(got, adapted)  # bf16 rounding happened: the comparison below is not with itself
  # Measured: ~3e-4 of the adaptation's own effect; a merge at half the scale is ~0.1 off.
  assert np.linalg.norm(got - adapted) < 1e-2 * np.linalg.norm(adapted - unadapted)


def test_adapter_axes_follow_their_matrix():
  axes = lora.axes(LCFG, CFG)
  shapes = model_lib.param_shapes(CFG)
  for layer, mats in axes.items():
    for name, ab in mats.items():
      w_axes = shapes[layer][name][1]
      assert ab["a"][:-1] + ab["b"][1:] == w_axes and ab["a"][-1] == ab["b"][0] == "lora_rank"
  assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple)) == jax.tree.structure(
      lora.init(LCFG, CFG, jax.random.PRNGKey(0)))


@pytest.mark.parametrize("targets,match", [(r"layers_\d+/attn_norm", "not an attention or MLP matrix"),
                                           (r"layer_\d+/wq", "matches no backbone matrix")])
def test_bad_targets(targets, match):
  with pytest.raises(ValueError, match=match):
    lora.init(lora.LoraConfig(rank=2, targets=targets), CFG, jax.random.PRNGKey(0))


def test_targets_select_a_subset():
  ad = lora.init(lora.LoraConfig(rank=2, targets=r"layers_1/(wq|wv)"), CFG, jax.random.PRNGKey(0))
  assert {l: sorted(m) for l, m in ad.items()} == {"layers_1": ["wq", "wv"]}
