"""Orbax checkpoints: resumable training state, and a params-only export for decoding.

Training (``WORKDIR/checkpoints``): a ``CheckpointManager`` with two named items, ``state`` (the
trainable params, optimizer state and step) and ``data`` (the grain iterator position, JSON), so a
resumed run sees exactly the batches it would have seen. Frozen params are not saved: they come from
the model loader, and ``WORKDIR/run_meta.json`` records which model they belong to. Saves are atomic
(Orbax writes to a temporary directory and renames it when complete).

Decoding (``WORKDIR/export``): the heads, plus the backbone when training changed it (Medusa-2),
with ``export_meta.json`` naming the model, its architecture and the heads' config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from medusa_jax import heads as heads_lib
from medusa_jax import model as model_lib
from medusa_jax.convert import WeightsError


class CheckpointError(WeightsError):
  """A checkpoint that is partial, corrupt, or belongs to another model or run."""


def architecture(cfg: model_lib.ModelConfig) -> dict:
  """What must match for weights to be interchangeable (dtypes may differ)."""
  d = dataclasses.asdict(cfg)
  for k in ("dtype", "param_dtype", "name", "max_seq_len", "bos_id", "eos_ids"):
    d.pop(k)
  d["rope_scaling"] = list(d["rope_scaling"]) if d["rope_scaling"] else None
  return d


def check_architecture(saved: dict, cfg: model_lib.ModelConfig, where: str) -> None:
  now = architecture(cfg)
  diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
  if diff:
    detail = ", ".join(f"{k}: saved {a} vs now {b}" for k, (a, b) in sorted(diff.items()))
    raise CheckpointError(f"{where} was made for another model ({detail}). Point --config.model at the "
                          "model it was trained with, or use a fresh --workdir.")


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                      tree)


# ----------------------------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------------------------

class TrainCheckpoints:
  """Saves every N steps and at the end, keeps the last few, restores the newest."""

  def __init__(self, workdir: str, *, every: int, keep: int, meta: dict):
    self.dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    meta_path = os.path.join(workdir, "run_meta.json")
    if os.path.exists(meta_path):
      with open(meta_path) as f:
        saved = json.load(f)
      check_architecture(saved["architecture"], meta["cfg"], f"The run in {workdir}")
      if saved.get("trainable") != meta["trainable"] or saved.get("heads") != meta["heads"]:
        raise CheckpointError(f"The run in {workdir} trained {saved.get('trainable')} with heads "
                              f"{saved.get('heads')}; this config trains {meta['trainable']} with heads "
                              f"{meta['heads']}. Use a fresh --workdir.")
    elif jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      _write_json(meta_path, {"architecture": architecture(meta["cfg"]), "trainable": meta["trainable"],
                              "heads": meta["heads"], "model": meta["model"]})
    self.manager = ocp.CheckpointManager(
        self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                                       create=True, enable_async_checkpointing=False),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict | None, force: bool = False) -> bool:
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data_state or {})), force=force)

  def restore(self, step: int, target_state):
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(target_state)), data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"Checkpoint step {step} in {self.dir} cannot be restored ({type(e).__name__}: "
                            f"{str(e)[:300]}). It may be partial or from another config; delete that step "
                            "directory to resume from an earlier one.") from None
    return out.state, (out.data or None)

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# ----------------------------------------------------------------------------------------------
# Params-only export for decoding
# ----------------------------------------------------------------------------------------------

def save_export(path: str, cfg: model_lib.ModelConfig, hcfg: heads_lib.HeadsConfig, params: dict, *,
                include_base: bool, model: str) -> None:
  """Writes ``{'medusa': ...}`` (+ ``'base'`` if trained) and its metadata to ``path``."""
  path = os.path.abspath(path)
  tree = {"medusa": params["medusa"]}
  if include_base:
    tree["base"] = params["base"]
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, "params"), tree, force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    _write_json(os.path.join(path, "export_meta.json"), {
        "architecture": architecture(cfg), "heads": dataclasses.asdict(hcfg), "includes_base": include_base,
        "model": model})


def load_export(path: str, cfg: model_lib.ModelConfig, base) -> tuple[dict, heads_lib.HeadsConfig]:
  """Loads an export made by training; ``base`` is used when the export holds only the heads."""
  path = os.path.abspath(path)  # Orbax wants absolute paths; users type relative ones
  meta_path = os.path.join(path, "export_meta.json")
  if not os.path.exists(meta_path) or not os.path.isdir(os.path.join(path, "params")):
    raise CheckpointError(f"{path} is not a medusa_jax export (expected export_meta.json and params/); "
                          "train writes one to WORKDIR/export.")
  with open(meta_path) as f:
    meta = json.load(f)
  check_architecture(meta["architecture"], cfg, f"The export {path}")
  hcfg = heads_lib.HeadsConfig(**meta["heads"])
  target = {"medusa": jax.eval_shape(lambda: heads_lib.init_params(hcfg, cfg, _shape_base(cfg)))}
  if meta["includes_base"]:
    target["base"] = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  try:
    tree = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), target)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"The export {path} cannot be read ({type(e).__name__}: {str(e)[:300]}); it may be "
                          "partial. Export again from the training checkpoints.") from None
  params = {"base": tree["base"] if meta["includes_base"] else jax.tree.map(jnp.asarray, base),
            "medusa": tree["medusa"]}
  return params, hcfg


def _shape_base(cfg):
  """Zeros standing in for the backbone when only shapes matter (per-head LM heads copy its shape)."""
  return {"embed": jnp.zeros((cfg.vocab_size, cfg.dim), cfg.param_dtype),
          **({} if cfg.tie_embeddings else {"lm_head": jnp.zeros((cfg.dim, cfg.vocab_size), cfg.param_dtype)})}


def to_numpy(tree):
  return jax.tree.map(np.asarray, tree)
