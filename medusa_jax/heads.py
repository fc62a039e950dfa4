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


def param_axes(hcfg: HeadsConfig) -> dict:
  axes = {"w": ("medusa_heads", "medusa_layers", "embed", "embed_out"),
          "b": ("medusa_heads", "medusa_layers", "embed_out")}
  if not hcfg.shared_lm_head:
    axes["lm_head"] = ("medusa_heads", "embed", "vocab")
  if hcfg.draft_vocab:
    axes["vocab_ids"] = ("draft_vocab",)
  if hcfg.next_token_input:
    axes["tok_w"] = ("medusa_heads", "embed", "embed_out")
  return axes


def init_params(hcfg: HeadsConfig, cfg: ModelConfig, base=None) -> dict:
  """Zero residual blocks; per-head LM heads copied from the backbone's (needs ``base``)."""
  M, n, D = hcfg.num_heads, hcfg.num_layers, cfg.dim
  p = {"w": jnp.zeros((M, n, D, D), cfg.param_dtype), "b": jnp.zeros((M, n, D), cfg.param_dtype)}
  if hcfg.next_token_input:
    p["tok_w"] = jnp.zeros((M, D, D), cfg.param_dtype)
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


def head_states(hcfg: HeadsConfig, cfg: ModelConfig, params, hidden_BxLxD, next_BxL=None):
  """The residual stacks: [B, L, D] -> [B, L, M, D]. ``next_BxL``: the token after each position
  (required with ``next_token_input``, ignored otherwise)."""
  dt = cfg.compute_dtype
  medusa = params["medusa"]
  x = jnp.broadcast_to(hidden_BxLxD[:, :, None, :], hidden_BxLxD.shape[:2] + (hcfg.num_heads, cfg.dim))
  x = x.astype(dt)
  if hcfg.next_token_input:
    if next_BxL is None:
      raise ValueError("These heads read the next token (HeadsConfig.next_token_input): pass next_BxL.")
    emb = params["base"]["embed"][next_BxL].astype(dt)
    x = x + jnp.einsum("bld,mde->blme", emb, medusa["tok_w"].astype(dt))
  for j in range(hcfg.num_layers):
    y = jnp.einsum("blmd,mde->blme", x, medusa["w"][:, j].astype(dt)) + medusa["b"][:, j].astype(dt)
    x = x + jax.nn.silu(y)
  return x


def subset_logits(hcfg: HeadsConfig, cfg: ModelConfig, params, hidden_BxLxD, next_BxL=None):
  """Head logits over the draft vocabulary [B, L, M, V'] (V' = V without one), float32."""
  x = head_states(hcfg, cfg, params, hidden_BxLxD, next_BxL)
  dt = cfg.compute_dtype
  acc = jnp.promote_types(dt, jnp.float32)
  if hcfg.draft_vocab:
    eq = "blmd,vd->blmv" if hcfg.shared_lm_head else "blmd,mvd->blmv"
    return jnp.einsum(eq, x, _draft_w(hcfg, cfg, params).astype(dt), preferred_element_type=acc)
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
    return _draft_w(hcfg, cfg, params)
  return params["base"]["embed"] if cfg.tie_embeddings else None


def _draft_w(hcfg: HeadsConfig, cfg: ModelConfig, params):
  """``draft_weight``, read from ``medusa/draft_w`` once ``prepare_for_decoding`` has gathered it
  (training and the prefill gather it on the fly)."""
  w = params["medusa"].get("draft_w")
  return draft_weight(hcfg, cfg, params) if w is None else w


def prepare_for_decoding(hcfg: HeadsConfig, cfg: ModelConfig, params):
  """Params with the draft projection gathered once (``medusa/draft_w``), outside the decode loop:
  gathering it inside the loop body copied (and transposed) the whole LM head every step."""
  if not hcfg.draft_vocab or "draft_w" in params["medusa"]:
    return params
  return {**params, "medusa": {**params["medusa"], "draft_w": draft_weight(hcfg, cfg, params)}}


def logits(hcfg: HeadsConfig, cfg: ModelConfig, params, hidden_BxLxD, next_BxL=None):
  """Head logits [B, L, M, V] (float32); tokens outside the draft vocabulary get -inf."""
  sub = subset_logits(hcfg, cfg, params, hidden_BxLxD, next_BxL)
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
