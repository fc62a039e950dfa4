"""Medusa decoding heads.

Head m (m = 1..M) reads the backbone's final hidden state h_t (after the final norm) and predicts
the token at t+m+1. It is a stack of n residual blocks ``x + SiLU(x W + b)`` (W and b
zero-initialised, so a fresh head is the identity and starts as a copy of the backbone's next-token
prediction), followed by an LM projection: either the head's own (initialised from the backbone's)
or the backbone's LM head, shared and frozen with it.

Params (under ``params['medusa']``), stacked over heads so all heads run as one einsum::

  w        [M, n, D, D]   ('medusa_heads', 'medusa_layers', 'embed', 'embed_out')
  b        [M, n, D]      ('medusa_heads', 'medusa_layers', 'embed_out')
  lm_head  [M, D, V]      ('medusa_heads', 'embed', 'vocab'), only when not shared

Stacked blocks each have their own weights (the original's ``[ResBlock(h)] * n`` shared them).

``next_token_input`` (not in the paper; off by default): when decoding, the backbone's own next token
t+1 is already known when the heads guess t+2, t+3, ... (it is the step's bonus token), yet a Medusa
head never sees it. With this option each head adds a projection of that token's (frozen) embedding
to its input, ``x_m = h_t + embed[tok_{t+1}] U_m``, before its blocks::

  tok_w    [M, D, D]      ('medusa_heads', 'embed', 'embed_out'), zero-initialised

Training feeds the true next token (teacher forcing), decoding the token the backbone chose. Such
heads cannot be written in the original release's format.

``kind='sequential'`` (Hydra-style heads, Ankner et al. 2024; not in the Medusa paper): head m also
reads every token drafted before it on its own tree path, t+1 .. t+m (the root and its ancestors),
so a deep node is a guess about a *known* prefix::

  x_m = h_t + sum_{j < m} embed[tok_{t+1+j}] U_{m,j}
  path_w   [M, M, D, D]   ('medusa_heads', 'medusa_path', 'embed', 'embed_out'), zero-initialised;
                          only j < m of head m is used (the rest stays zero)

Hydra concatenates [h_t, embeddings] into its first block's input; a sum of projected embeddings is
the same linear map on that concatenation with the identity kept on h_t, so fresh heads are still
the identity, as Medusa heads are. Decoding drafts the tree level by level (``medusa.draft``);
training is teacher-forced on the data's tokens.

``prefix_layer`` (Hydra++'s prefix attention, Ankner et al. 2024; off by default): h_t alone sums up
the context only as the backbone's next-token prediction needs it. With this option one more decoder
layer of the backbone's shapes (``model.param_shapes``' ``layers_i``), the heads' own, runs causally
over the backbone's final hidden states, and its output at t, not h_t, is every head's input
(``heads_input``)::

  prefix       {attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down (, bq, bk, bv)}, the
               backbone's axes; wo and w_down zero-initialised

Zero output projections make a fresh layer the identity on its residual stream, so fresh heads see
h_t exactly, as without it. It has its own KV cache when decoding (``prefix_decode``): prefill runs it
over the prompt, and each step over the accepted nodes' hidden states only, so its rows are those of
the accepted sequence, as teacher-forced training sees it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import backends
from medusa_jax import model as model_lib
from medusa_jax.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
  num_heads: int = 5
  num_layers: int = 1
  shared_lm_head: bool = True  # the right default for small models: SmolLM2's LM head is 28M of 135M
  # >0: the heads propose only these many tokens, the most frequent in the training targets
  # (``vocab_ids``). Verification stays exact, so greedy output is unchanged; what shrinks is the
  # heads' LM projection, the largest cost of training them and of a small tree's step on a CPU.
  draft_vocab: int = 0
  # Condition every head on the embedding of the backbone's next token (see the module docstring).
  next_token_input: bool = False
  # 'medusa': every head reads h_t (and the next token with next_token_input); 'sequential': head m
  # also reads the tokens of its tree path before it (Hydra-style, see the module docstring).
  kind: str = "medusa"
  # One decoder layer over the backbone's hidden states feeds the heads (see the module docstring).
  prefix_layer: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"heads.kind must be one of {KINDS}, got {self.kind!r}")

  @property
  def path_tokens(self) -> int:
    """How many tokens after h_t's position head M reads: 0, 1 (next token) or M (sequential)."""
    return self.num_heads if self.kind == "sequential" else int(self.next_token_input)


KINDS = ("medusa", "sequential")


def config_from(config) -> HeadsConfig:
  """The heads a config file asks for (``config.heads``)."""
  return HeadsConfig(**config.heads.to_dict())


def prefix_shapes(cfg: ModelConfig) -> dict:
  """The prefix layer's {name: (shape, axes)}: one backbone layer's."""
  return model_lib.param_shapes(cfg.replace(num_layers=1))["layers_0"]


def param_axes(hcfg: HeadsConfig, cfg: ModelConfig | None = None) -> dict:
  """Logical axes of ``params['medusa']``; ``cfg`` is needed with ``prefix_layer`` (its biases)."""
  axes = {"w": ("medusa_heads", "medusa_layers", "embed", "embed_out"),
          "b": ("medusa_heads", "medusa_layers", "embed_out")}
  if not hcfg.shared_lm_head:
    axes["lm_head"] = ("medusa_heads", "embed", "vocab")
  if hcfg.draft_vocab:
    axes["vocab_ids"] = ("draft_vocab",)
  if hcfg.next_token_input:
    axes["tok_w"] = ("medusa_heads", "embed", "embed_out")
  if hcfg.kind == "sequential":
    axes["path_w"] = ("medusa_heads", "medusa_path", "embed", "embed_out")
  if hcfg.prefix_layer:
    if cfg is None:
      raise ValueError("The prefix layer's axes depend on the backbone: pass its ModelConfig.")
    axes["prefix"] = {k: a for k, (_, a) in prefix_shapes(cfg).items()}
  return axes


def init_prefix(cfg: ModelConfig, rng) -> dict:
  """A fresh prefix layer: ``model.init_params``' layer init, but zero ``wo`` and ``w_down``, so the
  layer adds nothing to its input (its attention and MLP still get gradients through them)."""
  out = {}
  for key, (name, (shape, _)) in zip(jax.random.split(rng, 16), prefix_shapes(cfg).items()):
    if name.endswith("norm"):
      out[name] = jnp.ones(shape, cfg.param_dtype)
    elif name.startswith("b") or name in ("wo", "w_down"):
      out[name] = jnp.zeros(shape, cfg.param_dtype)
    else:
      out[name] = (0.02 * jax.random.normal(key, shape)).astype(cfg.param_dtype)
  return out


def init_params(hcfg: HeadsConfig, cfg: ModelConfig, base=None, rng=None) -> dict:
  """Zero residual blocks; per-head LM heads copied from the backbone's (needs ``base``); with
  ``prefix_layer`` a fresh prefix layer drawn from ``rng`` (default key 0)."""
  M, n, D = hcfg.num_heads, hcfg.num_layers, cfg.dim
  p = {"w": jnp.zeros((M, n, D, D), cfg.param_dtype), "b": jnp.zeros((M, n, D), cfg.param_dtype)}
  if hcfg.next_token_input:
    p["tok_w"] = jnp.zeros((M, D, D), cfg.param_dtype)
  if hcfg.kind == "sequential":
    p["path_w"] = jnp.zeros((M, M, D, D), cfg.param_dtype)
  if not hcfg.shared_lm_head:
    if base is None:
      raise ValueError("Per-head LM heads are initialised from the backbone's: pass its params.")
    w = model_lib.lm_head_weight(cfg, base)
    p["lm_head"] = jnp.broadcast_to(w[None], (M,) + w.shape).astype(cfg.param_dtype)
  if hcfg.draft_vocab:
    if hcfg.draft_vocab > cfg.vocab_size:
      raise ValueError(f"draft_vocab={hcfg.draft_vocab} exceeds the vocabulary ({cfg.vocab_size}).")
    p["vocab_ids"] = jnp.arange(hcfg.draft_vocab, dtype=jnp.int32)  # replaced by set_draft_vocab
  if hcfg.prefix_layer:
    p["prefix"] = init_prefix(cfg, jax.random.PRNGKey(0) if rng is None else rng)
  return p


def draft_vocab_from_counts(hcfg: HeadsConfig, counts_V) -> jax.Array:
  """The ``draft_vocab`` most frequent token ids (ties by id), sorted by id."""
  counts = np.asarray(counts_V)
  order = np.lexsort((np.arange(len(counts)), -counts))[:hcfg.draft_vocab]
  return jnp.asarray(np.sort(order).astype(np.int32))


def per_head(medusa: dict, m: int) -> dict:
  """Head m's own params (keeping a leading axis of 1); the shared ``vocab_ids`` stay whole. The
  prefix layer is left out: it runs once before the heads (``heads_input``), not per head."""
  return {k: (v if k == "vocab_ids" else v[m:m + 1]) for k, v in medusa.items() if k != "prefix"}


def heads_input(hcfg: HeadsConfig, cfg: ModelConfig, params, hidden_BxLxD, positions_BxL, mask_BxLxL):
  """What the heads read at each position, teacher-forced (training, calibration): the backbone's
  hidden states, or with ``prefix_layer`` the prefix layer's output over them, under the backbone's
  own (segment-)causal mask and positions."""
  if not hcfg.prefix_layer:
    return hidden_BxLxD
  return model_lib.decoder_layer(cfg, params["medusa"]["prefix"], hidden_BxLxD, positions_BxL, mask_BxLxL)[0]


def prefix_cache(cfg: ModelConfig, batch: int, capacity: int) -> dict:
  """The prefix layer's empty KV cache: ``model.init_cache`` of one layer."""
  return model_lib.init_cache(cfg.replace(num_layers=1), batch, capacity)


def prefix_cache_axes(cfg: ModelConfig) -> dict:
  """Logical axes of ``prefix_cache``: the backbone cache's."""
  return model_lib.cache_axes(cfg.replace(num_layers=1))


def prefix_decode(cfg: ModelConfig, params, hidden_BxLxD, cache: dict):
  """Runs the prefix layer over L new rows per sequence written at ``cache['index'][b]`` onwards,
  each attending to the cache's rows before it (``index`` is unchanged: the caller ``advance``s it
  by the rows that count). Returns (output [B, L, D], cache)."""
  L, S = hidden_BxLxD.shape[1], model_lib.cache_capacity(cache)
  index_B = cache["index"]
  positions_BxL = index_B[:, None] + jnp.arange(L, dtype=index_B.dtype)[None, :]
  mask_BxLxS = model_lib.cache_causal_mask(index_B, L, S)
  return model_lib.decoder_layer(cfg, params["medusa"]["prefix"], hidden_BxLxD, positions_BxL, mask_BxLxS, cache)


def head_states(hcfg: HeadsConfig, cfg: ModelConfig, params, hidden_BxLxD, path=None, first_head: int = 0,
                blocks=None):
  """The residual stacks: [B, L, D] -> [B, L, M, D].

  ``path`` holds the tokens after each position, t+1, t+2, ... ([B, L, K], or [B, L] for just
  t+1): heads with ``next_token_input`` read t+1, sequential head m reads t+1 .. t+m. Ignored by
  the paper's heads. ``first_head``: the 0-based index of the first head in ``params['medusa']``
  (a slice of the heads, e.g. one head of a level-by-level draft, still reads its own path length).
  ``blocks``: the same weights split per head (``split_blocks``, a decoder's loop-invariant copy).
  """
  dt = cfg.compute_dtype
  medusa = params["medusa"]
  M = medusa["w"].shape[0]
  x = jnp.broadcast_to(hidden_BxLxD[:, :, None, :], hidden_BxLxD.shape[:2] + (M, cfg.dim)).astype(dt)
  if hcfg.path_tokens:
    if path is None:
      raise ValueError("These heads read the tokens after h_t's position (next_token_input or sequential): "
                       "pass path.")
    path_BxLxK = path[..., None] if path.ndim == hidden_BxLxD.ndim - 1 else path
    emb = params["base"]["embed"][path_BxLxK].astype(dt)  # [B, L, K, D]
    if hcfg.kind == "sequential":
      # Head m (0-based, overall index first_head + m) reads path tokens 0 .. first_head + m.
      adds = [jnp.einsum("blkd,kde->ble", emb[:, :, :first_head + m + 1],
                         medusa["path_w"][m, :first_head + m + 1].astype(dt)) for m in range(M)]
      x = x + jnp.stack(adds, axis=2)
    if hcfg.next_token_input:
      x = x + _heads_dot(emb[:, :, None, 0], medusa["tok_w"], blocks and blocks["tok_w"], first_head, dt)
  for j in range(hcfg.num_layers):
    y = _heads_dot(x, medusa["w"][:, j], blocks and [w[j] for w in blocks["w"]], first_head, dt)
    x = x + jax.nn.silu(y + medusa["b"][:, j].astype(dt))
  return x


def _heads_dot(x_BxLxMxD, w_MxDxE, split, first_head: int, dt):
  """[B, L, M (or 1, shared), D] x head m's [D, E] -> [B, L, M, E]; with ``split`` (the heads'
  weights one array each, ``split_blocks``) one dot per head, reading each weight where it lies."""
  M = w_MxDxE.shape[0]
  if split is None:
    x = jnp.broadcast_to(x_BxLxMxD, x_BxLxMxD.shape[:2] + (M, x_BxLxMxD.shape[-1]))
    return jnp.einsum("blmd,mde->blme", x, w_MxDxE.astype(dt))
  shared = x_BxLxMxD.shape[2] == 1
  return jnp.stack([x_BxLxMxD[:, :, 0 if shared else m] @ split[first_head + m].astype(dt) for m in range(M)],
                   axis=2)


def split_blocks(hcfg: HeadsConfig, medusa) -> dict:
  """The heads' [D, D] weights as one array per head (and block): what ``head_states`` reads when
  decoding. Slicing a head out of the stacked weights inside a decode step made XLA-CPU copy each
  slice on every step (its dot reads whole buffers); a decoder splits them once, when it prepares."""
  M = medusa["w"].shape[0]
  out = {"w": [[medusa["w"][m, j] for j in range(hcfg.num_layers)] for m in range(M)], "tok_w": None}
  if hcfg.next_token_input:
    out["tok_w"] = [medusa["tok_w"][m] for m in range(M)]
  return out


def subset_logits(hcfg: HeadsConfig, cfg: ModelConfig, params, hidden_BxLxD, path=None, first_head: int = 0,
                  blocks=None):
  """Head logits over the draft vocabulary [B, L, M, V'] (V' = V without one), float32."""
  x = head_states(hcfg, cfg, params, hidden_BxLxD, path, first_head, blocks)
  dt = cfg.compute_dtype
  acc = jnp.promote_types(dt, jnp.float32)
  if hcfg.draft_vocab:
    eq = "blmd,vd->blmv" if hcfg.shared_lm_head else "blmd,mvd->blmv"
    return jnp.einsum(eq, x, draft_weight(hcfg, cfg, params).astype(dt), preferred_element_type=acc)
  if hcfg.shared_lm_head:
    w = model_lib.lm_head_weight(cfg, params["base"]).astype(dt)
    return jnp.einsum("blmd,dv->blmv", x, w, preferred_element_type=acc)
  return jnp.einsum("blmd,mdv->blmv", x, params["medusa"]["lm_head"].astype(dt), preferred_element_type=acc)


def draft_weight(hcfg: HeadsConfig, cfg: ModelConfig, params):
  """The LM projection restricted to the draft vocabulary, row-major: [V', D] (or [M, V', D])."""
  ids = params["medusa"]["vocab_ids"]
  if hcfg.shared_lm_head:
    base = params["base"]
    return base["embed"][ids] if cfg.tie_embeddings else jnp.take(base["lm_head"], ids, axis=1).T
  return jnp.swapaxes(jnp.take(params["medusa"]["lm_head"], ids, axis=2), 1, 2)


def shared_weight_VxD(hcfg: HeadsConfig, cfg: ModelConfig, params):
  """The LM projection all heads share as a row-major [V', D] matrix: the gathered draft rows, or
  the tied embedding. None when the heads have their own projections or it exists only as an
  untied [D, V] LM head."""
  if not hcfg.shared_lm_head:
    return None
  if hcfg.draft_vocab:
    return draft_weight(hcfg, cfg, params)
  return params["base"]["embed"] if cfg.tie_embeddings else None


def _projections(cfg: ModelConfig, weights) -> dict:
  """The shared projection as a projection group (``backends``): one plain [D, V'] weight."""
  del cfg  # backends.prepare's signature: the backbone's groups need it
  return {"proj": (weights["proj_VxD"].T,)}


def decoding_weights(hcfg: HeadsConfig, cfg: ModelConfig, params, backend: bool = False) -> dict:
  """Loop-invariant weights a decoder computes once per set of params (``decode.Decoder.prepare``),
  kept beside the params pytree, never in it: ``blocks``, the heads' [D, D] weights one array per
  head (``split_blocks``); ``proj_VxD``, the heads' shared projection
  (``shared_weight_VxD``), when there is one; with ``backend`` (a projection backend serves the
  backbone) also ``proj``, the backend's copy of it (``backends.prepare``). Gathering the draft rows
  inside the decode loop copied (and transposed) the whole LM head on every step."""
  out = {"blocks": split_blocks(hcfg, params["medusa"])}
  w = shared_weight_VxD(hcfg, cfg, params)
  if w is None:
    return out
  out["proj_VxD"] = w
  if backend:
    out.update(backends.prepare(_projections, cfg, out) or {})
  return out


def logits(hcfg: HeadsConfig, cfg: ModelConfig, params, hidden_BxLxD, path=None):
  """Head logits [B, L, M, V] (float32); tokens outside the draft vocabulary get -inf."""
  sub = subset_logits(hcfg, cfg, params, hidden_BxLxD, path)
  if not hcfg.draft_vocab:
    return sub
  full = jnp.full(sub.shape[:-1] + (cfg.vocab_size,), -jnp.inf, sub.dtype)
  return full.at[..., params["medusa"]["vocab_ids"]].set(sub)


def subset_index(hcfg: HeadsConfig, cfg: ModelConfig, params):
  """[V] int32: each token's index in the draft vocabulary, -1 outside it (identity without one)."""
  if not hcfg.draft_vocab:
    return jnp.arange(cfg.vocab_size, dtype=jnp.int32)
  ids = params["medusa"]["vocab_ids"]
  return jnp.full((cfg.vocab_size,), -1, jnp.int32).at[ids].set(jnp.arange(ids.shape[0], dtype=jnp.int32))
