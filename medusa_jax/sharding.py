"""Device mesh and shardings from the config: JAX SPMD is the distributed engine.

Every host runs the same command (``medusa_jax.launch`` runs it as several processes of one
machine, to try a multi-host run there).

``config.mesh.shape`` names the mesh axes and their sizes (-1 = the rest of the devices, over all
hosts); ``config.mesh.decode_shape`` (optional, default ``shape``) is the mesh for decoding;
``config.mesh.rules`` maps the logical axis names carried by every parameter, cache and batch array
to mesh axes. A dimension that a mesh axis does not divide evenly is replicated instead (e.g.
SmolLM2's 9 attention heads on a 2-way tensor axis), so any config runs on any mesh.

Why the shardings are what they are:
- params: FSDP over ``fsdp`` (the ``embed`` dimension), tensor parallelism over ``tensor`` (attention
  heads, MLP width, vocabulary); replicated over ``data``. Optimizer moments follow their params.
- batch: split over (``data``, ``fsdp``): FSDP is data parallelism whose weights are gathered per layer.
- KV cache: batch over the data axes, kv heads over ``tensor`` — it follows the attention it feeds.
- Training wants FSDP + data parallelism (memory of params + optimizer, big batches); decoding wants
  tensor parallelism (a step at batch 1 reads every weight once: splitting the weights over the
  devices splits that read, whereas FSDP would gather every weight on every device every step).
  Hence the two mesh shapes over the same rules.

Parameters are created abstractly first (``abstract_params``: ``jax.eval_shape``, no memory), their
shardings derived from the logical axes (``param_shardings``), then materialised already sharded
(``init_params``: ``jax.jit(init, out_shardings=...)``); the same abstract tree, carrying the target
shardings (``with_shardings``), is the Orbax restore target — so a checkpoint written under one mesh
restores under another.

Multi-host: every host runs the same program. Host data goes in with ``put_global`` (identical
values on every host, e.g. weights read from the same files) or ``TrainPlacement.put_batch`` (each
host's own rows, see ``process_shard``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medusa_jax import heads as heads_lib
from medusa_jax import lora
from medusa_jax import model as model_lib
from medusa_jax import optim


def maybe_initialize_distributed(config) -> None:
  """Calls ``jax.distributed.initialize`` when asked, or when the environment is a multi-host job.

  On a TPU VM pod slice and under SLURM, ``initialize()`` finds the coordinator, the process count
  and this process's index by itself. Elsewhere (``medusa_jax.launch``, a hand-written job) set
  ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``: JAX 0.10.2 reads only
  the first of them, so the other two are read here and passed on. Must run before anything
  touches the devices; a second call does nothing.
  """
  mode = config.mesh.get("distributed_init", "auto")
  if mode == "never" or jax.distributed.is_initialized():
    return
  multi_host_env = any(os.environ.get(k) for k in (
      "JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")) or (
          "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")) or (
              int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ)
  if mode == "always" or multi_host_env:
    explicit = {k: int(os.environ[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"),
                                                   ("process_id", "JAX_PROCESS_ID")) if os.environ.get(v)}
    jax.distributed.initialize(**explicit)
    logging.info("jax.distributed initialised: process %d of %d, %d devices",
                 jax.process_index(), jax.process_count(), jax.device_count())


# ----------------------------------------------------------------------------------------------
# The mesh
# ----------------------------------------------------------------------------------------------

def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
  """``'data=2,fsdp=4,tensor=1'`` -> ``(('data', 2), ('fsdp', 4), ('tensor', 1))`` (-1 allowed once)."""
  out = []
  for part in text.split(","):
    name, eq, size = part.strip().partition("=")
    try:
      out.append((name.strip(), int(size)))
    except ValueError:
      raise ValueError(f"Mesh {text!r}: expected comma-separated axis=size, e.g. data=2,fsdp=4,tensor=1") from None
    if not eq or not name.strip() or (out[-1][1] < 1 and out[-1][1] != -1):
      raise ValueError(f"Mesh {text!r}: bad entry {part!r} (axis=size, size >= 1 or -1).")
  return tuple(out)


def _shape_of(config, shape):
  if shape is None:
    shape = config.mesh.shape
  return parse_mesh(shape) if isinstance(shape, str) else tuple((str(a), int(s)) for a, s in shape)


def mesh_shape(config, num_devices: int | None = None, *, shape=None) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Axis names and sizes, the -1 axis resolved to the remaining devices.

  ``shape`` overrides ``config.mesh.shape`` (a sequence of (name, size) pairs or 'data=2,...').
  """
  shape = _shape_of(config, shape)
  n = num_devices or jax.device_count()
  names = tuple(a for a, _ in shape)
  sizes = [s for _, s in shape]
  if sizes.count(-1) > 1:
    raise ValueError(f"Mesh shape {shape}: at most one axis may be -1.")
  known = int(np.prod([s for s in sizes if s != -1]))
  if n % known:
    raise ValueError(f"Mesh shape {dict(shape)} does not divide the {n} devices.")
  sizes = [n // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != n:
    raise ValueError(f"Mesh shape {dict(zip(names, sizes))} uses {int(np.prod(sizes))} devices, "
                     f"but there are {n}. Use -1 for one axis to take the rest.")
  return names, tuple(sizes)


def make_mesh(config, devices=None, *, shape=None) -> Mesh:
  """The training mesh (``config.mesh.shape``, or ``shape``) over ``devices`` (default: all, all hosts)."""
  devices = devices if devices is not None else jax.devices()
  names, sizes = mesh_shape(config, len(devices), shape=shape)
  try:
    # Physical-topology aware on TPU/GPU (the last axes get the fastest links) and host-contiguous.
    arr = mesh_utils.create_device_mesh(sizes, devices=devices, allow_split_physical_axes=True)
  except Exception:  # pylint: disable=broad-except  # CPU / unusual topologies
    arr = np.asarray(devices).reshape(sizes)
  return Mesh(arr, names)


def decode_mesh(config, devices=None, *, shape=None) -> Mesh:
  """The decoding mesh: ``config.mesh.decode_shape`` when the config has one, else the training mesh."""
  return make_mesh(config, devices, shape=shape or config.mesh.get("decode_shape", None) or config.mesh.shape)


def rules_of(config) -> tuple:
  return tuple((str(k), v if v is None or isinstance(v, str) else tuple(v)) for k, v in config.mesh.rules)


def describe(mesh: Mesh) -> str:
  return ",".join(f"{a}={s}" for a, s in mesh.shape.items())


# ----------------------------------------------------------------------------------------------
# Logical axes -> shardings
# ----------------------------------------------------------------------------------------------

def spec_for(axes: tuple, shape: tuple, rules, mesh) -> P:
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


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def tree_shardings(axes_tree, abstract_tree, rules, mesh: Mesh):
  """NamedShardings for a pytree, from its parallel tree of logical axis names."""
  flat_axes = jax.tree.leaves(axes_tree, is_leaf=_is_axes)
  flat_vals, treedef = jax.tree.flatten(abstract_tree)
  if len(flat_axes) != len(flat_vals):
    raise ValueError("axis-name tree and value tree differ in structure")
  return jax.tree.unflatten(treedef, [NamedSharding(mesh, spec_for(a, v.shape, rules, mesh))
                                      for a, v in zip(flat_axes, flat_vals)])


def params_axes(cfg: model_lib.ModelConfig, hcfg: heads_lib.HeadsConfig, lcfg=None) -> dict:
  """Logical axes of ``{'base', 'medusa'}`` (and ``'lora'``: adapters shard like their matrices)."""
  axes = {"base": model_lib.param_axes(cfg), "medusa": heads_lib.param_axes(hcfg, cfg)}
  if lcfg is not None:
    axes["lora"] = lora.axes(lcfg, cfg)
  return axes


def subtree_like(full: dict, part: dict) -> dict:
  """The entries of ``full`` at the paths present in the nested dict ``part``."""
  return {k: subtree_like(full[k], v) if isinstance(v, dict) else full[k] for k, v in part.items()}


def param_shardings(cfg, hcfg, params, mesh: Mesh, rules):
  """Shardings of a params tree ``{'base'?, 'medusa'?}`` (concrete or abstract; any subset of keys)."""
  return tree_shardings(subtree_like(params_axes(cfg, hcfg), params), params, rules, mesh)


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs carrying their target shardings: an AOT-lowering input and an Orbax restore target."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _init_fn(cfg, hcfg, base_dtype=None):
  def init(rng):
    base = model_lib.init_params(cfg, rng)
    medusa = heads_lib.init_params(hcfg, cfg, base)
    if base_dtype is not None:  # weights as the loader stores them (see convert.load_model's dtype)
      base = jax.tree.map(lambda x: x.astype(base_dtype), base)
    return {"base": base, "medusa": medusa}
  return init


def abstract_params(cfg, hcfg, base_dtype=None) -> dict:
  """ShapeDtypeStructs of ``{'base', 'medusa'}``: shapes without memory (``jax.eval_shape``)."""
  return jax.eval_shape(_init_fn(cfg, hcfg, base_dtype), jax.ShapeDtypeStruct((2,), jnp.uint32))


def init_params(cfg, hcfg, rng, mesh: Mesh, rules, base_dtype=None) -> dict:
  """Random params created directly in their shards: no device ever holds the whole model."""
  init = _init_fn(cfg, hcfg, base_dtype)
  shardings = param_shardings(cfg, hcfg, abstract_params(cfg, hcfg, base_dtype), mesh, rules)
  # rng replicated: every device draws the same numbers and keeps its own slice of them.
  return jax.jit(init, in_shardings=NamedSharding(mesh, P()), out_shardings=shardings)(rng)


def put_global(tree, shardings):
  """Host values (the same on every host: weights read from files, a seeded init) -> global arrays.

  One process: ``device_put``. Several: each host builds only its own devices' shards from its
  copy (``make_array_from_callback``), which works for any sharding and never gathers an array.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def put(x, s):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])
  return jax.tree.map(put, tree, shardings)


def shard_bytes(abstract, shardings) -> int:
  """Bytes one device holds of a tree with these shardings (the largest shard, per leaf)."""
  total = 0
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    total += int(np.prod(s.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
  return total


def process_shard(sharding: NamedSharding, dim: int = 0, *, process_of=None, me: int | None = None
                  ) -> tuple[int, int]:
  """(index, count) of this process's share of an array's dimension ``dim`` under ``sharding``.

  Processes whose devices hold the same rows (replicas, e.g. across ``tensor``) get the same index
  and must load the same data; ``count`` distinct shares make up the global dimension. The data
  loader shards examples with exactly these numbers, so ``make_array_from_process_local_data``
  receives, on every host, the rows its devices own. (``process_of(device)`` and ``me`` default to
  the devices' and this process's indices; tests pretend to be several hosts with them.)
  """
  process_of = process_of or (lambda d: d.process_index)
  me = jax.process_index() if me is None else me
  spec = tuple(sharding.spec) + (None,) * (dim + 1 - len(sharding.spec))
  axes = spec[dim]
  axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  n = int(np.prod([sharding.mesh.shape[a] for a in axes])) if axes else 1
  shape = tuple(n if i == dim else 1 for i in range(max(dim + 1, len(spec))))
  rows: dict[int, set] = {}
  for dev, idx in sharding.devices_indices_map(shape).items():
    rows.setdefault(process_of(dev), set()).add(idx[dim].indices(n)[0])
  groups = sorted({tuple(sorted(r)) for r in rows.values()})
  flat = [r for g in groups for r in g]
  if len(flat) != len(set(flat)) or len({len(g) for g in groups}) != 1:
    raise ValueError(f"The {describe(sharding.mesh)} mesh gives processes overlapping or uneven shares of "
                     f"the batch ({groups}); order the mesh so that each host's devices hold whole rows.")
  return groups.index(tuple(sorted(rows[me]))), len(groups)


def _batch_axes(mesh, rules):
  target = dict(rules).get("batch")
  cand = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
  cand = tuple(a for a in cand if a in mesh.shape and mesh.shape[a] > 1)
  return None if not cand else (cand[0] if len(cand) == 1 else cand)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

class TrainPlacement:
  """Shardings of the train step's inputs and outputs, derived from logical axes and the mesh.

  - trainable params and frozen params: by their logical axes (FSDP over ``embed``, tensor over
    heads/MLP/vocab), so each device keeps 1/(fsdp*tensor) of every weight;
  - optimizer state: the moments mirror their params (the update is elementwise, so it runs on the
    shards without any communication); step counters are replicated;
  - batch: rows over the ``batch`` rule's axes (data x fsdp), replicated over ``tensor``;
  - the step number and the metrics: replicated scalars.
  """

  def __init__(self, config, mesh: Mesh, cfg, hcfg, tparams: dict, frozen: dict):
    self.mesh, self.rules = mesh, rules_of(config)
    axes = params_axes(cfg, hcfg, lora.config_from(config))
    self.t_shard = tree_shardings(subtree_like(axes, tparams), tparams, self.rules, mesh)
    self.f_shard = tree_shardings(subtree_like(axes, frozen), frozen, self.rules, mesh) if frozen else {}
    self._base_axes = axes["base"]
    self._opt = None
    self._teacher = None
    self._abstract_t = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tparams)
    self.replicated = NamedSharding(mesh, P())
    self.batch_axes = _batch_axes(mesh, self.rules)
    self.batch = NamedSharding(mesh, P(self.batch_axes, None))
    # Activations [B, L, ...]: rows split like the batch, the rest whole (the weights are gathered).
    self.rows = NamedSharding(mesh, P(self.batch_axes))
    self._data_shard = None

  @property
  def batch_divisor(self) -> int:
    """The global batch must be a multiple of this (the devices the rows are split over)."""
    axes = () if self.batch_axes is None else (
        (self.batch_axes,) if isinstance(self.batch_axes, str) else self.batch_axes)
    return int(np.prod([self.mesh.shape[a] for a in axes])) if axes else 1

  def check_batch(self, global_batch: int) -> None:
    if global_batch % self.batch_divisor:
      raise ValueError(f"train.batch_size={global_batch} does not split over the {self.batch_divisor} "
                       f"devices the batch is sharded over (mesh {describe(self.mesh)}, rule "
                       f"batch -> {self.batch_axes}); use a multiple of {self.batch_divisor}.")

  def data_shard(self) -> tuple[int, int]:
    """(shard_index, shard_count) for this host's data loader; see ``process_shard``."""
    if self._data_shard is None:
      self._data_shard = process_shard(self.batch, 0)
    return self._data_shard

  def put(self, tparams, frozen):
    return put_global(tparams, self.t_shard), (put_global(frozen, self.f_shard) if frozen else frozen)

  def teacher_shardings(self, base):
    """The frozen teacher backbone (Medusa-2 with KL) is sharded like the backbone it copies."""
    self._teacher = tree_shardings(self._base_axes, base, self.rules, self.mesh)
    return self._teacher

  def put_frozen_like(self, base):
    return put_global(base, self.teacher_shardings(base))

  def put_batch(self, batch: dict):
    # Each host holds its own rows (``data_shard``); together they form the global batch split over
    # the data axes. The global shape is given explicitly: rows per host x distinct host shares.
    _, count = self.data_shard()
    return {k: jax.make_array_from_process_local_data(
        self.batch, np.asarray(v), (np.shape(v)[0] * count,) + tuple(np.shape(v)[1:]))
            for k, v in batch.items() if k != "id"}

  def opt_shardings(self, tx):
    # Optimizer moments mirror their params' shardings; counters and other scalars are replicated.
    # With several groups (Medusa-2), each group's state holds MaskedNode (no array) at the other
    # groups' params: those stay MaskedNode.
    if self._opt is None:
      abstract = jax.eval_shape(tx.init, self._abstract_t)
      masked = lambda x: isinstance(x, optax.MaskedNode)
      self._opt = optax.tree_map_params(tx, lambda v, sh: v if masked(v) else sh, abstract, self.t_shard,
                                        transform_non_params=lambda _: self.replicated, is_leaf=masked)
    return self._opt

  def step_in_shardings(self, tx, with_teacher: bool, cached_hidden: bool = False):
    batch = {k: self.batch for k in ("tokens", "loss_mask", "segment_ids", "positions")}
    if cached_hidden:  # [B, L, D] hidden states (trainer's cache_hidden): rows like the batch's
      batch["hidden"] = NamedSharding(self.mesh, P(self.batch_axes, None, None))
    teacher = self._teacher if with_teacher else None
    if with_teacher and teacher is None:
      raise ValueError("call teacher_shardings (or put_frozen_like) before jitting a step with a teacher")
    # (state, frozen, batch, teacher): the state's step counter is a replicated scalar.
    state = optim.TrainState(step=self.replicated, params=self.t_shard, opt_state=self.opt_shardings(tx))
    return (state, self.f_shard, batch, teacher)

  def step_out_shardings(self, tx):
    # The state comes back exactly as it went in, so the donated input buffers are reused in place;
    # metrics are replicated scalars.
    return (optim.TrainState(step=self.replicated, params=self.t_shard, opt_state=self.opt_shardings(tx)),
            self.replicated)


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------

def cache_shardings(cfg: model_lib.ModelConfig, cache, mesh: Mesh, rules) -> Any:
  return tree_shardings(model_lib.cache_axes(cfg), cache, rules, mesh)


class DecodePlacement:
  """Shardings for ``decode.Decoder``'s prefill / step / loop on a (decoding) mesh.

  - params: by their logical axes; on a decoding mesh (``tensor`` > 1) attention heads, MLP width and
    vocabulary are split, so each device reads 1/tensor of the weights per step and the attention
    and MLP outputs are summed across ``tensor`` (Megatron-style);
  - KV cache: batch over the data axes, kv heads over ``tensor`` (each device keeps the K/V of the
    heads it computes, so attention needs no communication);
  - per-sequence state (emitted tokens, counts, flags, Medusa candidates): batch over the data axes,
    replicated over ``tensor`` — every device needs them to run the same control flow;
  - the rng key and the step counter: replicated.
  A batch the data axes do not divide (e.g. batch 1) is replicated.
  """

  def __init__(self, cfg, hcfg, mesh: Mesh, rules):
    self.cfg, self.hcfg, self.mesh, self.rules = cfg, hcfg, mesh, tuple(rules)
    self.replicated = NamedSharding(mesh, P())

  @classmethod
  def from_config(cls, config, cfg, hcfg, devices=None, *, shape=None) -> "DecodePlacement":
    return cls(cfg, hcfg, decode_mesh(config, devices, shape=shape), rules_of(config))

  def params(self, params):
    return param_shardings(self.cfg, self.hcfg, params, self.mesh, self.rules)

  def decode_params(self, dp):
    """Shardings of a ``decode.DecodeParams``: the params by their logical axes; the heads'
    loop-invariant weights (a [V', D] projection at most, small) replicated. No projection backend's
    copy exists on a mesh (``decode.Decoder.prepare`` makes none with a placement)."""
    rep = jax.tree.map(lambda _: self.replicated, dp.heads)
    return dp.replace(params=self.params(dp.params), prepared=None, heads=rep)

  def batch(self, shape) -> NamedSharding:
    """Sharding of a per-sequence array of ``shape`` ([B] or [B, ...])."""
    return NamedSharding(self.mesh, spec_for(("batch",) + (None,) * (len(shape) - 1), shape, self.rules, self.mesh))

  def state(self, state):
    """Shardings of a ``decode.DecodeState`` (concrete or from ``jax.eval_shape``)."""
    per_seq = lambda x: ("batch",) + (None,) * (len(x.shape) - 1)
    draft = None if state.draft is None else state.draft.replace(
        hidden_BxD=per_seq(state.draft.hidden_BxD),
        # The heads' prefix layer's cache (heads.prefix_layer) shards as the backbone's does.
        prefix=None if state.draft.prefix is None else heads_lib.prefix_cache_axes(self.cfg))
    axes = state.replace(
        cache=model_lib.cache_axes(self.cfg), tokens_BxT=per_seq(state.tokens_BxT), num_B=per_seq(state.num_B),
        done_B=per_seq(state.done_B), last_B=per_seq(state.last_B), rng=(None,) * len(state.rng.shape),
        steps=(None,) * len(state.steps.shape), draft=draft)
    return tree_shardings(axes, state, self.rules, self.mesh)

  def put(self, tree, shardings):
    return put_global(tree, shardings)
