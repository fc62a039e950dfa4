"""The config schema: defaults, validation, and conversion to frozen dataclasses.

Config files in ``configs/`` start from ``default_config()`` and change what they need; the CLIs load
them with ``config_flags.DEFINE_config_file(..., lock_config=True)``, so an unknown key in a file or
an override such as ``--config.trian.steps=3`` fails at once with the list of valid keys. Modules never
see a ConfigDict: ``model_config``/``heads_config``/``sampling``/``medusa_spec`` turn it into
hashable dataclasses at the boundary.
"""

from __future__ import annotations

import ml_collections

from medusa_jax import bundled

ConfigDict = ml_collections.ConfigDict


def default_config() -> ConfigDict:
  c = ConfigDict()
  # A short name (the bundled SmolLM2), an HF safetensors directory, or a .gguf file.
  c.model = bundled.SMOLLM2
  c.dtype = "float32"  # fp32 on CPU (bf16 matmuls are ~8x slower on XLA-CPU); bfloat16 on GPU/TPU.
  c.seed = 0

  c.heads = ConfigDict(dict(num_heads=5, num_layers=1, shared_lm_head=True))

  c.decode = ConfigDict(dict(
      mode="vanilla",          # vanilla | medusa
      tree="mc_sim_7b_63",     # a named tree, chain:N, dense:k,d, or a JSON file
      acceptance="greedy",     # greedy | typical | sample
      temperature=0.0,
      top_p=1.0,
      typical_epsilon=0.09,
      typical_delta=0.3,
      max_new_tokens=128,
  ))
  return c


def model_overrides(config: ConfigDict) -> dict:
  return {"dtype": config.dtype, "param_dtype": "float32"}


def heads_config(config: ConfigDict):
  from medusa_jax import heads  # pylint: disable=g-import-not-at-top
  return heads.HeadsConfig(**config.heads.to_dict())


def sampling(config: ConfigDict):
  from medusa_jax import decode  # pylint: disable=g-import-not-at-top
  d = config.decode
  return decode.Sampling(temperature=float(d.temperature), top_p=float(d.top_p),
                         max_new_tokens=int(d.max_new_tokens))


def medusa_spec(config: ConfigDict, hcfg=None, tree_spec: str | None = None):
  from medusa_jax import decode, tree  # pylint: disable=g-import-not-at-top
  hcfg = hcfg or heads_config(config)
  d = config.decode
  return decode.MedusaSpec(heads=hcfg, tree=tree.resolve(tree_spec or d.tree, num_heads=hcfg.num_heads),
                           acceptance=d.acceptance, typical_epsilon=float(d.typical_epsilon),
                           typical_delta=float(d.typical_delta))
