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
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

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

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"heads.kind must be one of {KINDS}, got {self.kind!r}")

  @property
  def path_tokens(self) -> int:
    """How many tokens after h_t's position head M reads: 0, 1 (next token) or M (sequential)."""
    return self.num_heads if self.kind == "sequential" else int(self.next_token_input)


KINDS = ("medusa", "sequential")


def param_axes(hcfg: HeadsConfig) -> dict:
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
  return axes


def init_params(hcfg: HeadsConfig, cfg: ModelConfig, base=None) -> dict:
  """Zero residual blocks; per-head LM heads copied from the backbone's (needs ``base``)."""
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
  return p


def draft_vocab_from_counts(hcfg: HeadsConfig, counts_V) -> jax.Array:
  """The ``draft_vocab`` most frequent token ids (ties by id), sorted by id."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  counts = np.asarray(counts_V)
  order = np.lexsort((np.arange(len(counts)), -counts))[:hcfg.draft_vocab]
  return jnp.asarray(np.sort(order).astype(np.int32))


def per_head(medusa: dict, m: int) -> dict:
  """Head m's own params (keeping a leading axis of 1); the shared ``vocab_ids`` stay whole."""
  return {k: (v if k == "vocab_ids" else v[m:m + 1]) for k, v in medusa.items()}


def head_states(hcfg: HeadsConfig, cfg: ModelConfig, params, hidden_BxLxD, path=None, first_head: int = 0):
  """The residual stacks: [B, L, D] -> [B, L, M, D].

  ``path`` holds the tokens after each position, t+1, t+2, ... ([B, L, K], or [B, L] for just
  t+1): heads with ``next_token_input`` read t+1, sequential head m reads t+1 .. t+m. Ignored by
  the paper's heads. ``first_head``: the 0-based index of the first head in ``params['medusa']``
  (a slice of the heads, e.g. one head of a level-by-level draft, still reads its own path length).
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
      x = x + jnp.einsum("bld,mde->blme", emb[:, :, 0], medusa["tok_w"].astype(dt))
  for j in range(hcfg.num_layers):
    y = jnp.einsum("blmd,mde->blme", x, medusa["w"][:, j].astype(dt)) + medusa["b"][:, j].astype(dt)
    x = x + jax.nn.silu(y)
  return x


def subset_logits(hcfg: HeadsConfig, cfg: ModelConfig, params, hidden_BxLxD, path=None, first_head: int = 0):
  """Head logits over the draft vocabulary [B, L, M, V'] (V' = V without one), float32."""
  x = head_states(hcfg, cfg, params, hidden_BxLxD, path, first_head)
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


def decoding_weights(hcfg: HeadsConfig, cfg: ModelConfig, params, kernel: bool = False) -> dict:
  """Loop-invariant weights a decoder computes once per set of params (``decode.Decoder.prepare``),
  kept beside the params pytree, never in it: ``proj_VxD``, the heads' shared projection
  (``shared_weight_VxD``), when there is one; with ``kernel`` (the CPU decode kernel is in use) also
  ``proj_packed``, the same matrix in its panel layout. Gathering the draft rows inside the decode
  loop copied (and transposed) the whole LM head on every step."""
  w = shared_weight_VxD(hcfg, cfg, params)
  if w is None:
    return {}
  out = {"proj_VxD": w}
  if kernel:
    from medusa_jax import cpu_kernels  # pylint: disable=g-import-not-at-top
    out["proj_packed"] = cpu_kernels.pack(jnp.asarray(w).T)
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
