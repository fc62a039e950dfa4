"""What trains and how: the parameter partition by regex, per-group AdamW, and the train state.

``config.train.trainable`` maps regexes over parameter paths (``base/layers_0/wq``, ``medusa/w``)
to an optimizer group or None (frozen); ``split_for_training`` applies them and builds the
optimizer over the trainable half. Every group's learning rate, and the step a group starts at
(Medusa-2's backbone after the heads-only stage), are functions of the *global* train step, which
the optimizer reads from ``TrainState.step`` (``tx.update(..., step=state.step)``): a skipped
(non-finite) step advances that step but no group's Adam state, so it delays nothing.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """What one train step reads and returns: the global step (0-based index of the next step; it
  counts skipped steps too), the trainable params and the optimizer state."""
  step: jax.Array
  params: Any
  opt_state: Any


def global_step(n: int, replicated) -> jax.Array:
  """The step counter ``n`` under the ``replicated`` sharding. Made by a jitted function, not put from
  the host: on several hosts that is one array over every host's devices."""
  return jax.jit(lambda: jnp.asarray(n, jnp.int32), out_shardings=replicated)()


def init_state(tx, placement, tparams) -> TrainState:
  """Step 0's state on the mesh of ``placement`` (a ``sharding.TrainPlacement``; ``tparams`` already
  placed): the optimizer state is created in its shardings."""
  opt_state = jax.jit(tx.init, out_shardings=placement.opt_shardings(tx))(tparams)
  return TrainState(step=global_step(0, placement.replicated), params=tparams, opt_state=opt_state)


# ----------------------------------------------------------------------------------------------
# Parameter partition by regex
# ----------------------------------------------------------------------------------------------

def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def labels(params, rules) -> dict:
  """{path: group or None} for every leaf; the first matching regex wins, unmatched is an error."""
  out = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    p = path_str(path)
    for rx, group in rules:
      if re.fullmatch(rx, p):
        out[p] = group
        break
    else:
      raise ValueError(f"No rule in config.train.trainable matches parameter {p!r}; add one "
                       "(use None to freeze).")
  return out


def partition(params, label_map: dict):
  """Splits params into (trainable, frozen) nested dicts holding only their own leaves."""
  trainable, frozen = {}, {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    p = path_str(path)
    dst = trainable if label_map[p] is not None else frozen
    keys = p.split("/")
    for k in keys[:-1]:
      dst = dst.setdefault(k, {})
    dst[keys[-1]] = leaf
  return trainable, frozen


def merge(a: dict, b: dict) -> dict:
  """The nested dicts ``a`` and ``b`` as one (``partition``'s inverse); ``b`` wins on a clash."""
  out = dict(a)
  for k, v in b.items():
    out[k] = merge(out[k], v) if k in out and isinstance(v, dict) else v
  return out


@dataclasses.dataclass
class Split:
  """What trains and how: ``label_map`` {path: group or None}, the trainable and frozen halves of
  the params, the optimizer over the trainable half and its per-group learning-rate schedules."""
  label_map: dict
  tparams: dict
  frozen: dict
  tx: Any
  schedules: dict


def split_for_training(tc, params) -> Split:
  """``config.train``'s rules applied to ``params`` (concrete or abstract): the one wiring of
  labels -> partition -> optimizer that training, the fit check and the tests share."""
  label_map = labels(params, tc.trainable)
  tparams, frozen = partition(params, label_map)
  if not tparams:
    raise ValueError("config.train.trainable freezes every parameter: nothing to train.")
  tx, sched = make_optimizer(tc, {k: v for k, v in label_map.items() if v is not None}, tc.steps)
  return Split(label_map, tparams, frozen, tx, sched)


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------

def starting_at(tx: optax.GradientTransformation, start: int) -> optax.GradientTransformationExtraArgs:
  """``tx`` held until the global step ``start`` (the ``step`` keyword of ``update``): before it,
  updates are zero and the inner state (Adam's count and moments included) stays as initialised,
  so step ``start`` is a fresh ``tx``'s first step. Medusa-2's backbone: one Adam state for the
  whole run would count the heads-only steps, and bias correction would then inflate its first
  joint updates (after 150 heads-only steps, about 2.2-2.5x for the first ~100 joint steps at b1
  0.9, b2 0.999). Keyed on the global step, not on an update count: a skipped step before the joint
  stage must not delay it."""
  tx = optax.with_extra_args_support(tx)

  def update(updates, state, params=None, *, step, **extra):
    new_updates, new_state = tx.update(updates, state, params, step=step, **extra)
    go = step >= start
    new_updates = jax.tree.map(lambda u: jnp.where(go, u, jnp.zeros_like(u)), new_updates)
    return new_updates, jax.tree.map(lambda new, old: jnp.where(go, new, old), new_state, state)

  return optax.GradientTransformationExtraArgs(tx.init, update)


def scale_by_global_schedule(lr_fn: Callable) -> optax.GradientTransformationExtraArgs:
  """Multiplies updates by ``-lr_fn(step)`` at the global ``step`` passed to ``update`` (optax's
  own schedules read a count of updates, which a skipped step does not advance)."""
  def update(updates, state, params=None, *, step, **extra):
    del params, extra
    m = -lr_fn(step)
    return jax.tree.map(lambda g: jnp.array(m, dtype=g.dtype) * g, updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def group_schedules(tc, total: int) -> dict[str, tuple[Callable, int]]:
  """Each optimizer group's learning rate as a function of the steps since its start, and the
  global step it starts at: warm-up + cosine. ``group_lr_mult`` scales every group's peak (heads and
  backbone included); the backbone starts when the heads-only stage ends, with its own warm-up."""
  warm = tc.warmup_steps or max(1, int(tc.warmup_frac * total))
  mult = dict(tc.group_lr_mult)
  peak = lambda g: tc.lr * float(mult.get(g, 1.0))
  heads = optax.warmup_cosine_decay_schedule(0.0, peak("heads"), warm, max(total, warm + 1), 0.0)
  start = int(tc.heads_only_steps)
  out = {"heads": (heads, 0),
         "backbone": (optax.warmup_cosine_decay_schedule(0.0, peak("backbone"), tc.backbone_warmup_steps,
                                                         max(total - start, tc.backbone_warmup_steps + 1), 0.0),
                      start)}
  base_heads = optax.warmup_cosine_decay_schedule(0.0, tc.lr, warm, max(total, warm + 1), 0.0)
  for g, m in mult.items():
    if g not in out:
      out[g] = (lambda s, m=float(m): base_heads(s) * m, 0)
  return out


def schedules(tc, total: int) -> dict[str, Callable]:
  """Per-group learning rates as functions of the global step: what the optimizer applies and what
  the logs and TensorBoard show (0 before a group's start)."""
  def at_global(fn, start):
    return lambda s: jnp.where(s < start, 0.0, fn(jnp.maximum(s - start, 0)))
  return {g: at_global(fn, start) for g, (fn, start) in group_schedules(tc, total).items()}


def make_optimizer(tc, trainable_labels: dict, total: int):
  """(tx, ``schedules``): AdamW per group, each clipping its own gradient norm (Medusa-2's heads and
  backbone see gradients of different losses, whose norms should not throttle each other), each
  group's state starting with its own stage (``starting_at``). ``tx.update`` needs the global step:
  ``tx.update(grads, opt_state, params, step=state.step)``."""
  groups = sorted({g for g in trainable_labels.values() if g is not None})
  per_group = group_schedules(tc, total)
  unknown = [g for g in groups if g not in per_group]
  if unknown:
    raise ValueError(f"Optimizer groups {unknown} have no schedule; known: {sorted(per_group)}")
  lr_at = schedules(tc, total)
  txs = {}
  for g in groups:
    # optax.adamw's chain, with the learning rate read at the global step.
    tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip), optax.scale_by_adam(b1=tc.b1, b2=tc.b2),
                     optax.add_decayed_weights(tc.weight_decay), scale_by_global_schedule(lr_at[g]))
    start = per_group[g][1]
    txs[g] = starting_at(tx, start) if start > 0 else tx

  def label_fn(tparams):
    return jax.tree_util.tree_map_with_path(lambda p, _: trainable_labels[path_str(p)], tparams)

  return optax.multi_transform(txs, label_fn), lr_at
