"""LoRA adapters on the backbone's matrices: how Medusa-2's released recipe trains the backbone.

A matrix W (``model.param_shapes`` layout: input axes first) becomes ``W + (alpha / r) · A B`` with
A [in..., r] and B [r, out...]. B starts at zero, so fresh adapters leave the forward unchanged; A
starts random (normal, std 1/sqrt(fan-in)), so B's first gradient is not zero. The base weights are
never trained (bit-identical after any number of steps), and the adapters merge into them exactly
for decoding (``merge``), which then costs nothing extra.

Params (under ``params['lora']``), nested like the backbone's::

  layers_i/<matrix>/a   [*in, r]   (W's input axes..., 'lora_rank')
  layers_i/<matrix>/b   [r, *out]  ('lora_rank', W's output axes...)

so each adapter shards like the matrix it adapts (``config.mesh.rules`` maps 'lora_rank' to None).
The released recipe: r 32, alpha 16, all attention and MLP matrices.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import model as model_lib
from medusa_jax.model import ModelConfig

# Input axes of each adaptable matrix (the remaining axes are its output).
_IN_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
DEFAULT_TARGETS = r"layers_\d+/(wq|wk|wv|wo|w_gate|w_up|w_down)"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 0            # 0: no adapters (full fine-tuning, or none)
  alpha: float = 16.0
  targets: str = DEFAULT_TARGETS  # regex over 'layers_0/wq'-style paths, matched in full

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def config_from(config) -> LoraConfig | None:
  """The backbone's adapters a config file asks for (``config.train.lora``); None for rank 0."""
  lc = config.train.lora
  return LoraConfig(rank=int(lc.rank), alpha=float(lc.alpha), targets=lc.targets) if int(lc.rank) > 0 else None


def target_paths(lcfg: LoraConfig, cfg: ModelConfig) -> list[tuple[str, str]]:
  """(layer, matrix) pairs the regex selects; an error if it selects none or a non-matrix."""
  shapes = model_lib.param_shapes(cfg)
  out = []
  for layer, sub in shapes.items():
    if not isinstance(sub, dict):
      continue
    for name in sub:
      if re.fullmatch(lcfg.targets, f"{layer}/{name}"):
        if name not in _IN_AXES:
          raise ValueError(f"LoRA target {layer}/{name} is not an attention or MLP matrix "
                           f"(adaptable: {', '.join(_IN_AXES)}).")
        out.append((layer, name))
  if not out:
    raise ValueError(f"config.train.lora.targets={lcfg.targets!r} matches no backbone matrix "
                     "(paths look like 'layers_0/wq').")
  return out


def _split(cfg: ModelConfig, layer: str, name: str):
  shape, axes = model_lib.param_shapes(cfg)[layer][name]
  n = _IN_AXES[name]
  return shape[:n], shape[n:], axes[:n], axes[n:]


def init(lcfg: LoraConfig, cfg: ModelConfig, rng) -> dict:
  """Fresh adapters: A ~ normal(0, 1/fan_in), B = 0 (the adapted forward equals the base one)."""
  pairs = target_paths(lcfg, cfg)
  keys = jax.random.split(rng, len(pairs))
  out: dict = {}
  for key, (layer, name) in zip(keys, pairs):
    ins, outs, _, _ = _split(cfg, layer, name)
    fan_in = int(np.prod(ins))
    a = jax.random.normal(key, (*ins, lcfg.rank), jnp.float32) / math.sqrt(fan_in)
    out.setdefault(layer, {})[name] = {"a": a.astype(cfg.param_dtype),
                                       "b": jnp.zeros((lcfg.rank, *outs), cfg.param_dtype)}
  return out


def axes(lcfg: LoraConfig, cfg: ModelConfig) -> dict:
  """Logical axis names, parallel to ``init``'s tree (tuples are leaves)."""
  out: dict = {}
  for layer, name in target_paths(lcfg, cfg):
    _, _, in_axes, out_axes = _split(cfg, layer, name)
    out.setdefault(layer, {})[name] = {"a": (*in_axes, "lora_rank"), "b": ("lora_rank", *out_axes)}
  return out


def delta(lcfg: LoraConfig, w, adapter):
  """(alpha / r) · A B in W's shape, accumulated in float32."""
  a, b = adapter["a"], adapter["b"]
  r = a.shape[-1]
  ab = jnp.dot(a.reshape(-1, r).astype(jnp.float32), b.reshape(r, -1).astype(jnp.float32))
  return (lcfg.scale * ab).reshape(w.shape)


def merge(lcfg: LoraConfig, base: dict, adapters: dict, dtype=None) -> dict:
  """The backbone with every adapter added to its matrix; ``base`` itself is not changed.

  Adapted matrices come out in float32 (a bf16 weight would round a small update away before the
  forward sees it) unless ``dtype`` is given (the decoding export stores the base's own dtype).
  """
  out = dict(base)
  for layer, mats in adapters.items():
    merged = {}
    for name, ad in mats.items():
      w = base[layer][name]
      merged[name] = (w.astype(jnp.float32) + delta(lcfg, w, ad)).astype(dtype or jnp.float32)
    out[layer] = {**base[layer], **merged}
  return out
