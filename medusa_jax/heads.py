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


def param_axes(hcfg: HeadsConfig) -> dict:
  axes = {"w": ("medusa_heads", "medusa_layers", "embed", "embed_out"),
          "b": ("medusa_heads", "medusa_layers", "embed_out")}
  if not hcfg.shared_lm_head:
    axes["lm_head"] = ("medusa_heads", "embed", "vocab")
  return axes


def init_params(hcfg: HeadsConfig, cfg: ModelConfig, base=None) -> dict:
  """Zero residual blocks; per-head LM heads copied from the backbone's (needs ``base``)."""
  M, n, D = hcfg.num_heads, hcfg.num_layers, cfg.dim
  p = {"w": jnp.zeros((M, n, D, D), cfg.param_dtype), "b": jnp.zeros((M, n, D), cfg.param_dtype)}
  if not hcfg.shared_lm_head:
    if base is None:
      raise ValueError("Per-head LM heads are initialised from the backbone's: pass its params.")
    w = model_lib.lm_head_weight(cfg, base)
    p["lm_head"] = jnp.broadcast_to(w[None], (M,) + w.shape).astype(cfg.param_dtype)
  return p


def head_states(hcfg: HeadsConfig, cfg: ModelConfig, medusa, hidden_BxLxD):
  """The residual stacks: [B, L, D] -> [B, L, M, D]."""
  dt = cfg.compute_dtype
  x = jnp.broadcast_to(hidden_BxLxD[:, :, None, :], hidden_BxLxD.shape[:2] + (hcfg.num_heads, cfg.dim))
  x = x.astype(dt)
  for j in range(hcfg.num_layers):
    y = jnp.einsum("blmd,mde->blme", x, medusa["w"][:, j].astype(dt)) + medusa["b"][:, j].astype(dt)
    x = x + jax.nn.silu(y)
  return x


def logits(hcfg: HeadsConfig, cfg: ModelConfig, params, hidden_BxLxD):
  """Head logits [B, L, M, V] (float32) from the backbone's final hidden state."""
  x = head_states(hcfg, cfg, params["medusa"], hidden_BxLxD)
  dt = cfg.compute_dtype
  acc = jnp.promote_types(dt, jnp.float32)
  if hcfg.shared_lm_head:
    w = model_lib.lm_head_weight(cfg, params["base"]).astype(dt)
    return jnp.einsum("blmd,dv->blmv", x, w, preferred_element_type=acc)
  return jnp.einsum("blmd,mdv->blmv", x, params["medusa"]["lm_head"].astype(dt), preferred_element_type=acc)
