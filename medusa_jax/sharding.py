"""Device mesh and shardings from the config: JAX SPMD is the distributed engine (no launcher).

``config.mesh.shape`` names the mesh axes and their sizes (-1 = the rest of the devices, over all
hosts); ``config.mesh.rules`` maps the logical axis names carried by every parameter, cache and batch
array to mesh axes. A dimension that a mesh axis does not divide evenly is replicated instead (e.g.
SmolLM2's 9 attention heads on a 2-way tensor axis), so any config runs on any mesh.

Why the shardings are what they are:
- params: FSDP over ``fsdp`` (the ``embed`` dimension), tensor parallelism over ``tensor`` (attention
  heads, MLP width, vocabulary); replicated over ``data``. Optimizer moments follow their params.
- batch: split over (``data``, ``fsdp``): FSDP is data parallelism whose weights are gathered per layer.
- KV cache: batch over the data axes, kv heads over ``tensor`` — it follows the attention it feeds.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medusa_jax import heads as heads_lib
from medusa_jax import model as model_lib


def maybe_initialize_distributed(config) -> None:
  """Calls ``jax.distributed.initialize()`` when asked, or when the environment is a multi-host job."""
  mode = config.mesh.get("distributed_init", "auto")
  if mode == "never" or jax.distributed.is_initialized():
    return
  multi_host_env = any(os.environ.get(k) for k in (
      "JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")) or (
          "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")) or (
              int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ)
  if mode == "always" or multi_host_env:
    jax.distributed.initialize()
    logging.info("jax.distributed initialised: process %d of %d, %d devices",
                 jax.process_index(), jax.process_count(), jax.device_count())


def mesh_shape(config, num_devices: int | None = None) -> tuple[tuple[str, ...], tuple[int, ...]]:
  n = num_devices or jax.device_count()
  names = tuple(a for a, _ in config.mesh.shape)
  sizes = [int(s) for _, s in config.mesh.shape]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh.shape {config.mesh.shape}: at most one axis may be -1.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if n % known:
    raise ValueError(f"config.mesh.shape {config.mesh.shape} does not divide the {n} devices.")
  sizes = [n // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != n:
    raise ValueError(f"config.mesh.shape {dict(zip(names, sizes))} uses {int(np.prod(sizes))} devices, "
                     f"but there are {n}. Use -1 for one axis to take the rest.")
  return names, tuple(sizes)


def make_mesh(config, devices=None) -> Mesh:
  devices = devices if devices is not None else jax.devices()
  names, sizes = mesh_shape(config, len(devices))
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    arr = mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # pylint: disable=broad-except  # CPU / unusual topologies
    arr = np.asarray(devices).reshape(sizes)
  return Mesh(arr, names)


def spec_for(axes: tuple, shape: tuple, rules, mesh: Mesh) -> P:
  """PartitionSpec for one array: each logical axis -> its mesh axes, if they divide the dimension."""
  rules = dict(rules)
  used: set[str] = set()
  out = []
  for name, dim in zip(axes, shape):
    target = rules.get(name)
    cand = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    cand = tuple(a for a in cand if a in mesh.shape and a not in used and mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in cand])) if cand else 1
    if cand and dim % size == 0:
      used.update(cand)
      out.append(cand[0] if len(cand) == 1 else cand)
    else:
      out.append(None)
  return P(*out)


def tree_shardings(axes_tree, abstract_tree, rules, mesh: Mesh):
  """NamedShardings for a pytree, from its parallel tree of logical axis names."""
  is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
  flat_axes = jax.tree.leaves(axes_tree, is_leaf=is_axes)
  flat_vals, treedef = jax.tree.flatten(abstract_tree)
  if len(flat_axes) != len(flat_vals):
    raise ValueError("axis-name tree and value tree differ in structure")
  return jax.tree.unflatten(treedef, [NamedSharding(mesh, spec_for(a, v.shape, rules, mesh))
                                      for a, v in zip(flat_axes, flat_vals)])


def params_axes(cfg: model_lib.ModelConfig, hcfg: heads_lib.HeadsConfig) -> dict:
  return {"base": model_lib.param_axes(cfg), "medusa": heads_lib.param_axes(hcfg)}


def subtree_like(full: dict, part: dict) -> dict:
  """The entries of ``full`` at the paths present in the nested dict ``part``."""
  return {k: subtree_like(full[k], v) if isinstance(v, dict) else full[k] for k, v in part.items()}


def _batch_axes(mesh, rules):
  target = dict(rules).get("batch")
  cand = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
  cand = tuple(a for a in cand if a in mesh.shape and mesh.shape[a] > 1)
  return None if not cand else (cand[0] if len(cand) == 1 else cand)


class TrainPlacement:
  """Shardings of the train step's inputs and outputs, derived from logical axes and the mesh."""

  def __init__(self, config, mesh: Mesh, cfg, hcfg, tparams: dict, frozen: dict):
    self.mesh, self.rules = mesh, tuple(tuple(r) for r in config.mesh.rules)
    axes = params_axes(cfg, hcfg)
    self.t_shard = tree_shardings(subtree_like(axes, tparams), tparams, self.rules, mesh)
    self.f_shard = tree_shardings(subtree_like(axes, frozen), frozen, self.rules, mesh) if frozen else {}
    self._base_axes = axes["base"]
    self._opt = None
    self._teacher = None
    self._abstract_t = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tparams)
    self.replicated = NamedSharding(mesh, P())
    self.batch = NamedSharding(mesh, P(_batch_axes(mesh, self.rules), None))

  def put(self, tparams, frozen):
    return jax.device_put(tparams, self.t_shard), (jax.device_put(frozen, self.f_shard) if frozen else frozen)

  def put_frozen_like(self, base):
    self._teacher = tree_shardings(self._base_axes, base, self.rules, self.mesh)
    return jax.device_put(base, self._teacher)

  def put_batch(self, batch: dict):
    # Each host holds its own rows; together they form the global batch split over the data axes.
    return {k: jax.make_array_from_process_local_data(self.batch, np.asarray(v))
            for k, v in batch.items() if k != "id"}

  def opt_shardings(self, tx):
    # Optimizer moments mirror their params' shardings; counters and other scalars are replicated.
    if self._opt is None:
      abstract = jax.eval_shape(tx.init, self._abstract_t)
      self._opt = optax.tree_map_params(tx, lambda _, sh: sh, abstract, self.t_shard,
                                        transform_non_params=lambda _: self.replicated)
    return self._opt

  def step_in_shardings(self, tx, with_teacher: bool):
    batch = {k: self.batch for k in ("tokens", "loss_mask", "segment_ids", "positions")}
    teacher = self._teacher if with_teacher else None
    return (self.t_shard, self.opt_shardings(tx), self.f_shard, batch, self.replicated, teacher)

  def step_out_shardings(self, tx):
    return (self.t_shard, self.opt_shardings(tx), self.replicated)


def cache_shardings(cfg: model_lib.ModelConfig, cache, mesh: Mesh, rules) -> Any:
  return tree_shardings(model_lib.cache_axes(cfg), cache, rules, mesh)
