"""A pure-functional Llama-family decoder (Llama 2/3, Vicuna, Mistral, Qwen2, SmolLM2).

Plain functions over an explicit params pytree (no Linen state): ``forward`` takes the backbone
params, tokens, their RoPE positions, an attention mask over the KV cache and the cache itself, and
returns ``(logits, hidden, new_cache)``. Nothing about Medusa lives here: a tree verification is a
forward whose mask is a tree mask.

Einsum legend (see ``medusa_jax/__init__.py``): B batch, L new tokens, S cache rows, D model, H query
heads, K kv heads, G = H // K query heads per kv head, E head dim, F MLP width, V vocabulary.

Parameter layout (``base``), HF names in brackets::

  embed        [V, D]      (model.embed_tokens)
  layers_i/attn_norm [D]   (input_layernorm)
          wq [D, H, E], wk/wv [D, K, E], wo [H, E, D]   (self_attn.{q,k,v,o}_proj, transposed)
          bq [H, E], bk/bv [K, E]                       (only with qkv_bias, e.g. Qwen2)
          mlp_norm [D]     (post_attention_layernorm)
          w_gate/w_up [D, F], w_down [F, D]             (mlp.{gate,up,down}_proj, transposed)
  final_norm   [D]         (model.norm)
  lm_head      [D, V]      (lm_head, only when embeddings are untied)

Every weight projection a backend may serve goes through one seam, ``backends.project``, in the
groups ``projections`` names (the matrices that read one input: q|k|v, o, gate|up, down; the LM
head). Decoding may run beside the params on a second pytree, a backend's copy of those groups in
its own layout (the CPU decode kernel's panels: ``backends.prepare``); ``forward(..., prepared=...)``
then lets the backend take the calls it serves. Without one, or for calls it declines, the plain
weights go to XLA's dot. The params pytree itself is never changed by decoding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import backends

Params = Any
Cache = dict


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a Llama-family decoder. Hashable: usable as a jit static argument."""
  vocab_size: int
  dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  # llama3-style scaling: (factor, low_freq_factor, high_freq_factor, original_max_position).
  rope_scaling: tuple[float, float, float, int] | None = None
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False
  max_seq_len: int = 8192
  # Sliding-window attention (Mistral) is not implemented: the loader caps max_seq_len at the window,
  # where full attention and the window agree, and records the window for error messages.
  sliding_window: int | None = None
  bos_id: int | None = 1
  eos_ids: tuple[int, ...] = (2,)
  dtype: str = "float32"        # activations / matmul inputs
  param_dtype: str = "float32"  # stored weights
  name: str = "llama"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------

def param_shapes(cfg: ModelConfig) -> dict:
  """Shapes and logical axis names of every backbone parameter: {path: (shape, axes)}."""
  D, H, K, E, F, V = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  layer = {
      "attn_norm": ((D,), ("norm",)),
      "wq": ((D, H, E), ("embed", "heads", "head_dim")),
      "wk": ((D, K, E), ("embed", "kv_heads", "head_dim")),
      "wv": ((D, K, E), ("embed", "kv_heads", "head_dim")),
      "wo": ((H, E, D), ("heads", "head_dim", "embed")),
      "mlp_norm": ((D,), ("norm",)),
      "w_gate": ((D, F), ("embed", "mlp")),
      "w_up": ((D, F), ("embed", "mlp")),
      "w_down": ((F, D), ("mlp", "embed")),
  }
  if cfg.qkv_bias:
    layer.update({
        "bq": ((H, E), ("heads", "head_dim")),
        "bk": ((K, E), ("kv_heads", "head_dim")),
        "bv": ((K, E), ("kv_heads", "head_dim")),
    })
  tree = {"embed": ((V, D), ("vocab", "embed")), "final_norm": ((D,), ("norm",))}
  for i in range(cfg.num_layers):
    tree[f"layers_{i}"] = dict(layer)
  if not cfg.tie_embeddings:
    tree["lm_head"] = ((D, V), ("embed", "vocab"))
  return tree


def _is_leaf_spec(x):
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)


def param_axes(cfg: ModelConfig) -> dict:
  """Logical axis names, a pytree parallel to ``init_params``'s (tuples are leaves)."""
  return jax.tree.map(lambda s: s[1], param_shapes(cfg), is_leaf=_is_leaf_spec)


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
  """Random backbone params (normal(0.02) matrices, unit norms, zero biases)."""
  specs = param_shapes(cfg)
  flat, treedef = jax.tree.flatten_with_path(specs, is_leaf=_is_leaf_spec)
  keys = jax.random.split(rng, len(flat))
  leaves = []
  for key, (path, (shape, _)) in zip(keys, flat):
    name = path[-1].key
    if name.endswith("norm"):
      leaves.append(jnp.ones(shape, cfg.param_dtype))
    elif name.startswith("b"):
      leaves.append(jnp.zeros(shape, cfg.param_dtype))
    else:
      leaves.append((0.02 * jax.random.normal(key, shape)).astype(cfg.param_dtype))
  return jax.tree.unflatten(treedef, leaves)


def lm_head_weight(cfg: ModelConfig, base: Params) -> jax.Array:
  """The [D, V] output projection (the transposed embedding when tied)."""
  return base["embed"].T if cfg.tie_embeddings else base["lm_head"]


def project_logits(cfg: ModelConfig, base: Params, hidden: jax.Array, prepared: Params | None = None) -> jax.Array:
  """[..., D] -> [..., V] logits; through a backend where ``prepared`` (``Decoder.prepare``) has its copy."""
  (logits,) = backends.project(hidden.astype(cfg.compute_dtype), (lm_head_weight(cfg, base),),
                               None if prepared is None else prepared["lm_head"],
                               preferred_element_type=accum_dtype(cfg.compute_dtype))
  return logits


def greedy_tokens(cfg: ModelConfig, base: Params, hidden: jax.Array, prepared: Params | None = None) -> jax.Array:
  """``argmax(project_logits(...), -1)`` as [B, L] int32, for callers that need only the argmax.

  With tied embeddings the [V, D] embedding is the matmul's left operand and the logits come out
  vocabulary-major ([V, B, L]), reduced over V where they are: as ``x @ embed.T`` with more than one
  row, XLA-CPU repacked the whole transposed embedding on every call (3x the time of one read of it
  at L = 4, the bulk of a small Medusa tree's extra cost over a one-token step).
  """
  dt, acc = cfg.compute_dtype, accum_dtype(cfg.compute_dtype)
  if not cfg.tie_embeddings or backends.takes(hidden, None if prepared is None else prepared["lm_head"]):
    return jnp.argmax(project_logits(cfg, base, hidden, prepared), axis=-1).astype(jnp.int32)
  logits_VxBxL = jnp.einsum("vd,bld->vbl", base["embed"].astype(dt), hidden.astype(dt),
                            preferred_element_type=acc)
  return jnp.argmax(logits_VxBxL, axis=0).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Projection groups (what a backend may prepare: backends.prepare)
# ----------------------------------------------------------------------------------------------

def _layer_projections(p) -> dict:
  """One layer's projections, grouped by input, each weight plain [in, ...]: q|k|v (they read the
  same normed input), o, gate|up, down. o is one [H*E, D] matrix: as a two-axis [H, E, D]
  contraction XLA-CPU copied a transposed wo every step."""
  H, E, D = p["wo"].shape
  return {"qkv": (p["wq"], p["wk"], p["wv"]), "wo": (p["wo"].reshape(H * E, D),),
          "gate_up": (p["w_gate"], p["w_up"]), "down": (p["w_down"],)}


def projections(cfg: ModelConfig, base: Params) -> Params:
  """The backbone's projection groups, ``{'layers': [{qkv, wo, gate_up, down}], 'lm_head'}``: what
  ``decode.Decoder.prepare`` gives ``backends.prepare``, whose copy (``prepared``, the same pytree)
  ``forward`` takes beside the params."""
  return {"layers": [_layer_projections(base[f"layers_{i}"]) for i in range(cfg.num_layers)],
          "lm_head": (lm_head_weight(cfg, base),)}


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------

CACHE_AXES = ("batch", "kv_heads", "cache_len", "head_dim")


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=None) -> Cache:
  """An empty fixed-capacity cache: per layer k/v [B, K, S, E] and the valid length per sequence.

  Rows are the second-to-last axis so that each (sequence, kv head) is one contiguous [S, E] matrix:
  both attention matmuls then read the cache in place. With [B, S, K, E] XLA-CPU transpose-copied
  every layer's k and v to this order on every step (at batch 32 that was most of a decode step).
  """
  dtype = dtype or cfg.compute_dtype
  shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
  layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)]
  return {"layers": layers, "index": jnp.zeros((batch,), jnp.int32)}


def cache_axes(cfg: ModelConfig) -> dict:
  layers = [{"k": CACHE_AXES, "v": CACHE_AXES} for _ in range(cfg.num_layers)]
  return {"layers": layers, "index": ("batch",)}


def cache_capacity(cache: Cache) -> int:
  return cache["layers"][0]["k"].shape[2]


def write_cache_rows(cache_BxKxSxE, new_BxKxLxE, index_B):
  """Writes each sequence's L new rows at its own offset (rows index[b] .. index[b]+L-1).

  One scatter, which XLA-CPU performs in place on the donated cache. A dynamic-update-slice per
  sequence is also in place, but at batch 1 XLA fused a second copy of it into the attention matmul's
  operand and then copied the whole cache (several times per layer) to keep the two apart.
  Rows must lie inside the cache (callers check the room before a step).
  """
  B, K, L, _ = new_BxKxLxE.shape
  rows_Bx1xL = (index_B[:, None] + jnp.arange(L, dtype=index_B.dtype)[None, :])[:, None, :]
  b_Bx1x1 = jnp.arange(B, dtype=index_B.dtype)[:, None, None]
  k_1xKx1 = jnp.arange(K, dtype=index_B.dtype)[None, :, None]
  return cache_BxKxSxE.at[b_Bx1x1, k_1xKx1, rows_Bx1xL].set(
      new_BxKxLxE.astype(cache_BxKxSxE.dtype), indices_are_sorted=True, unique_indices=True)


def keep_cache_rows(cache: Cache, keep_BxA, written: int) -> Cache:
  """Of the ``written`` rows each sequence b wrote at ``index[b]``.., keeps rows ``keep_BxA[b]``
  (offsets into them, in order) and moves them to ``index[b]``, ``index[b]+1``, ...: a tree step's
  accepted path becomes the sequence's next rows. ``index`` is unchanged (``advance`` moves it).

  Only the written rows are read back: gathering from the whole cache made XLA-CPU transpose-copy
  every layer's cache on every step.
  """
  index_B = cache["index"]

  def move(c_BxKxSxE):
    written_BxKxNxE = jax.vmap(lambda cb, i: jax.lax.dynamic_slice_in_dim(cb, i, written, axis=1))(c_BxKxSxE, index_B)
    rows_BxKxAxE = jnp.take_along_axis(written_BxKxNxE, keep_BxA[:, None, :, None], axis=2)
    return write_cache_rows(c_BxKxSxE, rows_BxKxAxE, index_B)

  return {**cache, "layers": [{"k": move(l["k"]), "v": move(l["v"])} for l in cache["layers"]]}


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

def accum_dtype(dtype):
  """Reductions run in at least float32 (float64 stays float64 for exactness tests)."""
  return jnp.promote_types(dtype, jnp.float32)


def rms_norm(x, w, eps):
  acc = accum_dtype(x.dtype)
  x32 = x.astype(acc)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * w.astype(acc)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [E/2] as a NumPy float64 constant, with llama3 scaling when configured."""
  E = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, E, 2, dtype=np.float64) / E))
  if cfg.rope_scaling is not None:
    factor, low_ff, high_ff, orig_max = cfg.rope_scaling
    low_wavelen, high_wavelen = orig_max / low_ff, orig_max / high_ff
    wavelen = 2 * math.pi / inv
    smooth = (orig_max / wavelen - low_ff) / (high_ff - low_ff)
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
  return inv


def apply_rope(x_BxLxNxE, positions_BxL, inv_freq):
  """Rotary embedding in the HF (rotate-half) convention."""
  acc = accum_dtype(x_BxLxNxE.dtype)
  angles = positions_BxL.astype(acc)[..., None] * inv_freq.astype(acc)  # [B, L, E/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x = x_BxLxNxE.astype(acc)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxE.dtype)


def _attention(cfg, q_BxLxHxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS, prepared=None):
  """Grouped-query attention over the cache; one [G*L, E] x [E, S] matmul per (sequence, kv head).

  A decoding backend's (``prepared``: one of the layer's prepared groups) takes it where it has an
  attention of its own (``backends.attend``): the CPU backend's reads only the written rows.

  The G query heads sharing a kv head and the L new tokens are merged into one matmul row axis
  (M = G*L) so that both matmuls are plain batched [b, k] matmuls with the cache operand read in
  place; with g and l as separate free axes XLA-CPU's dot ran several times slower.
  """
  out = backends.attend(q_BxLxHxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS, prepared)
  if out is not None:
    return out
  B, L, H, E = q_BxLxHxE.shape
  K = cfg.num_kv_heads
  G = H // K
  S = k_BxKxSxE.shape[2]
  q = q_BxLxHxE.reshape(B, L, K, G, E).transpose(0, 2, 3, 1, 4).reshape(B, K, G * L, E)
  acc = accum_dtype(q.dtype)
  scores = jnp.einsum("bkme,bkse->bkms", q, k_BxKxSxE, preferred_element_type=acc)
  scores = scores.reshape(B, K, G, L, S) / math.sqrt(E)
  scores = jnp.where(mask_BxLxS[:, None, None, :, :], scores, jnp.finfo(acc).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKxSxE.dtype).reshape(B, K, G * L, S)
  out = jnp.einsum("bkms,bkse->bkme", probs, v_BxKxSxE, preferred_element_type=acc)
  out = out.reshape(B, K, G, L, E).transpose(0, 3, 1, 2, 4)
  return out.reshape(B, L, H, E).astype(q_BxLxHxE.dtype)


def _layer(cfg, p, x_BxLxD, positions_BxL, mask_BxLxS, layer_cache, index_B, inv_freq, prepared=None):
  dt = cfg.compute_dtype
  B, L = x_BxLxD.shape[:2]
  w, prepared = _layer_projections(p), prepared or {}
  h = rms_norm(x_BxLxD, p["attn_norm"], cfg.norm_eps)
  q, k, v = backends.project(h, w["qkv"], prepared.get("qkv"))
  if cfg.qkv_bias:
    q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
  q = apply_rope(q, positions_BxL, inv_freq)
  k = apply_rope(k, positions_BxL, inv_freq)
  if layer_cache is None:  # training / no cache: attend over the L new tokens only.
    new_cache = None
    k_all, v_all = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  else:
    k_all = write_cache_rows(layer_cache["k"], k.transpose(0, 2, 1, 3), index_B)  # [B, K, L, E]
    v_all = write_cache_rows(layer_cache["v"], v.transpose(0, 2, 1, 3), index_B)
    new_cache = {"k": k_all, "v": v_all}
  attn = _attention(cfg, q, k_all.astype(dt), v_all.astype(dt), mask_BxLxS,
                    prepared.get("qkv") if layer_cache is not None else None)
  (o,) = backends.project(attn.reshape(B, L, -1), w["wo"], prepared.get("wo"))
  x = x_BxLxD + o
  h = rms_norm(x, p["mlp_norm"], cfg.norm_eps)
  gate, up = backends.project(h, w["gate_up"], prepared.get("gate_up"))
  (down,) = backends.project(jax.nn.silu(gate) * up, w["down"], prepared.get("down"))
  return x + down, new_cache


def forward(cfg: ModelConfig, base: Params, tokens_BxL, positions_BxL, mask, cache: Cache | None = None,
            *, logits: bool = True, prepared: Params | None = None):
  """One forward over L new tokens.

  Args:
    cfg: architecture.
    base: backbone params (``params['base']``).
    tokens_BxL: int token ids.
    positions_BxL: RoPE positions of the new tokens (a tree node's is prefix length + depth).
    mask: bool attention mask. With a cache, [B, L, S] over the cache rows *after* the new tokens
      are written at rows ``cache['index'][b] + l``; without a cache, [B, L, L] over the new tokens.
    cache: KV cache from ``init_cache`` or None (training). ``index`` is left unchanged: the caller
      decides how many of the written rows become part of the sequence (see ``advance``).
    logits: also compute the [B, L, V] logits (prefill skips them and projects only what it needs).
    prepared: a backend's copy of ``projections(cfg, base)`` (``backends.prepare``) or None; the
      projections it takes (the CPU kernel: calls of few rows) then run there.

  Returns:
    (logits [B, L, V] float32 or None, final hidden state [B, L, D] after the final norm, new cache).
  """
  inv_freq = rope_inv_freq(cfg)
  x = base["embed"][tokens_BxL].astype(cfg.compute_dtype)
  index_B = None if cache is None else cache["index"]
  new_layers = []
  for i in range(cfg.num_layers):
    layer_cache = None if cache is None else cache["layers"][i]
    x, lc = _layer(cfg, base[f"layers_{i}"], x, positions_BxL, mask, layer_cache, index_B, inv_freq,
                   None if prepared is None else prepared["layers"][i])
    new_layers.append(lc)
  hidden = rms_norm(x, base["final_norm"], cfg.norm_eps)
  out_logits = project_logits(cfg, base, hidden, prepared) if logits else None
  new_cache = None if cache is None else {"layers": new_layers, "index": cache["index"]}
  return out_logits, hidden, new_cache


def decoder_layer(cfg: ModelConfig, p: Params, x_BxLxD, positions_BxL, mask, cache: Cache | None = None):
  """One decoder layer with params ``p`` (a ``layers_i`` of ``param_shapes``) over ``x`` outside the
  backbone (the heads' prefix layer, ``heads.prefix_layer``): ``forward``'s layer, mask and
  cache conventions, for a one-layer ``init_cache``. Returns ``(x [B, L, D], new cache or None)``."""
  index_B = None if cache is None else cache["index"]
  x, lc = _layer(cfg, p, x_BxLxD.astype(cfg.compute_dtype), positions_BxL, mask,
                 None if cache is None else cache["layers"][0], index_B, rope_inv_freq(cfg))
  return x, None if cache is None else {**cache, "layers": [lc]}


def advance(cache: Cache, num_B) -> Cache:
  """Makes the next ``num_B`` written rows of each sequence part of it."""
  return {**cache, "index": cache["index"] + num_B.astype(jnp.int32)}


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------

def causal_mask(length_B, L: int):
  """[B, L, L] causal mask for training on right-padded rows (padding attends to nothing new)."""
  i = jnp.arange(L)
  m = i[None, :, None] >= i[None, None, :]
  return m & (i[None, None, :] < length_B[:, None, None])


def segment_causal_mask(segment_ids_BxL):
  """[B, L, L] causal mask restricted to the same segment (packed rows); segment 0 is padding."""
  L = segment_ids_BxL.shape[1]
  i = jnp.arange(L)
  causal = i[:, None] >= i[None, :]
  same = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return causal[None] & same & (segment_ids_BxL[:, None, :] > 0)


def cache_causal_mask(index_B, L: int, S: int):
  """[B, L, S] mask for L consecutive new tokens written at rows index[b] .. index[b]+L-1."""
  rows = jnp.arange(S)[None, None, :]
  last = index_B[:, None, None] + jnp.arange(L)[None, :, None]
  return rows <= last


def cache_tree_mask(index_B, tree_mask_NxN, S: int):
  """[B, N, S] mask for N tree nodes written at rows index[b] .. index[b]+N-1: prefix + ancestors."""
  N = tree_mask_NxN.shape[0]
  rows = jnp.arange(S)[None, None, :]
  rel = rows - index_B[:, None, None]  # row offset relative to the first node
  prefix = rel < 0
  in_tree = (rel >= 0) & (rel < N)
  tm = jnp.asarray(tree_mask_NxN)
  gathered = jax.vmap(lambda r: tm[:, jnp.clip(r, 0, N - 1)])(rel[:, 0, :])  # [B, N, S]
  return prefix | (in_tree & gathered)
