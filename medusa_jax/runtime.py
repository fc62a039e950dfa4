"""Shared set-up for the CLIs and notebooks: config -> (model config, params, tokenizer, heads)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from absl import flags
from absl import logging as absl_logging
import jax
import jax.numpy as jnp

from medusa_jax import checkpoint as ckpt
from medusa_jax import convert
from medusa_jax import heads as heads_lib
from medusa_jax import release_heads
from medusa_jax import sharding
from medusa_jax.model import ModelConfig


@dataclasses.dataclass
class Loaded:
  cfg: ModelConfig
  params: dict           # {'base': ..., 'medusa': ...}
  tokenizer: Any
  heads: heads_lib.HeadsConfig


def model_overrides(config) -> dict:
  """What a config file changes in the backbone it loads (``convert.load_model``'s overrides)."""
  return {"dtype": config.dtype, "param_dtype": "float32"}


def random_heads(hcfg, cfg, base, seed: int = 0, scale: float = 0.02):
  """Freshly initialised heads with small random residual weights, for correctness checks."""
  med = heads_lib.init_params(hcfg, cfg, base)
  keys = jax.random.split(jax.random.PRNGKey(seed), 2)
  med["w"] = scale * jax.random.normal(keys[0], med["w"].shape, med["w"].dtype)
  med["b"] = scale * jax.random.normal(keys[1], med["b"].shape, med["b"].dtype)
  return med


def load(config, heads: str | None = None, checkpoint: str | None = None) -> Loaded:
  """Loads the backbone named by ``config.model`` and Medusa heads from one of three places.

  Args:
    config: a ConfigDict from ``configs/``.
    heads: 'random' (fresh random heads), a directory in the original release's format
      (medusa_lm_head.safetensors + config.json), a medusa_jax export (its heads only: e.g.
      Medusa-2 starting from Medusa-1 heads), or None (zero-initialised heads: identity blocks).
    checkpoint: a params-only export written by training (``--checkpoint DIR``); it holds both
      the backbone and the heads and takes precedence over ``heads``.
  """
  cfg, base, tok = convert.load_model(config.model, **model_overrides(config))
  hcfg = heads_lib.config_from(config)
  if checkpoint:
    params, hcfg = ckpt.load_export(checkpoint, cfg, base)
    return Loaded(cfg, params, tok, hcfg)
  base = jax.tree.map(jnp.asarray, base)
  if heads == "random":
    medusa = random_heads(hcfg, cfg, base, config.seed)
  elif heads and os.path.exists(os.path.join(heads, "export_meta.json")):  # heads of a medusa_jax export
    exported, saved = ckpt.load_export(heads, cfg, base)
    if saved != hcfg:
      raise ckpt.CheckpointError(f"{heads} holds heads {saved}, but the config asks for {hcfg}: set config.heads "
                                 "to match, or use the export these heads came from.")
    medusa = exported["medusa"]
  elif heads:
    asked = hcfg
    hcfg, medusa = release_heads.load(heads, cfg)
    medusa = jax.tree.map(jnp.asarray, medusa)
    if asked.prefix_layer:  # the release has none: a fresh one (the identity) keeps the heads' outputs
      hcfg = dataclasses.replace(hcfg, prefix_layer=True)
      medusa["prefix"] = heads_lib.init_prefix(cfg, jax.random.PRNGKey(config.seed))
  else:
    medusa = heads_lib.init_params(hcfg, cfg, base)
  return Loaded(cfg, {"base": base, "medusa": medusa}, tok, hcfg)


def decode_placement(config, loaded: Loaded) -> tuple[Any, dict]:
  """(placement, params) to decode ``loaded`` with: in one process (None, its params), one device,
  where the CPU kernel may run; with several (``jax.distributed``: every host runs the same
  decoding) a ``sharding.DecodePlacement`` over all their devices (``config.mesh.decode_shape``)
  and the params placed on it, each host building only its own devices' shards."""
  if jax.process_count() == 1:
    return None, loaded.params
  placement = sharding.DecodePlacement.from_config(config, loaded.cfg, loaded.heads)
  return placement, placement.put(loaded.params, placement.params(loaded.params))


def quiet_jax_logs():
  """Library INFO logs off unless ``--verbosity`` is given: Orbax logs every file it writes, and jax
  that no TPU library was found on every CPU/GPU start."""
  if not (flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present):
    absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def chat_prompt(tokenizer, text: str) -> list[int]:
  """The first user turn rendered with the tokenizer's chat template, ready for the reply."""
  ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_dict=False)
  return list(ids)


def read_jsonl_prompts(path: str, num: int | None = None) -> list[dict]:
  """MT-Bench-style jsonl: {"question_id", "turns": [first, second, ...]}; the first turn is used."""
  if path == "mt_bench":
    path = os.path.join(os.path.dirname(__file__), "evaldata", "mt_bench_questions.jsonl")
  if not os.path.isfile(path):  # open()'s own error names neither the format nor the bundled set
    raise ValueError(f"{path}: no such prompts file (MT-Bench-style jsonl; 'mt_bench' is the bundled set).")
  out = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        out.append({"question_id": rec.get("question_id", n), "text": rec["turns"][0]})
      except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{path}:{n}: not an MT-Bench-style record with a 'turns' list ({e}).") from None
      if num and len(out) >= num:
        break
  if not out:
    raise ValueError(f"{path} holds no prompts.")
  logging.info("Read %d prompts from %s", len(out), path)
  return out
