"""Orbax checkpoints: resumable training state, and a params-only export for decoding.

Training (``WORKDIR/checkpoints``): a ``CheckpointManager`` with two named items, ``state`` (the
trainable params, optimizer state and step) and ``data`` (the grain iterator position, JSON), so a
resumed run sees exactly the batches it would have seen. Frozen params are not saved: they come from
the model loader, and ``WORKDIR/run_meta.json`` records which model they belong to.

Saves are atomic: Orbax 0.12.8 writes step N into ``N.orbax-checkpoint-tmp/`` (each item into its
own ``state.orbax-checkpoint-tmp/`` there, renamed when written), then ``commit_success.txt``, and
renames the step directory last. A save killed at any point before that rename leaves only the tmp
directory, which Orbax does not list as a step; ``TrainCheckpoints`` warns about it, never loads
it, and removes it. A step directory without Orbax's commit files (a deletion of old steps
that was killed half-way) is skipped the same way. A complete checkpoint whose files are damaged
(a truncated file) is found only by reading it: ``restore_latest`` then moves it aside to
``checkpoints.unreadable/`` and resumes from the step before, saying so in one line; with no step
before, it is an error that names the step directory to delete.

Decoding (``WORKDIR/export``): the heads, plus the backbone when training changed it (Medusa-2),
with ``export_meta.json`` naming the model, its architecture and the heads' config. It is written
whole into ``WORKDIR/export.incomplete`` and renamed into place, so a reader sees the previous
export, no export, or the new one; never part of one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from medusa_jax import heads as heads_lib
from medusa_jax import model as model_lib
from medusa_jax.convert import WeightsError

_log = logging.getLogger("medusa_jax.checkpoint")


class CheckpointError(WeightsError):
  """A checkpoint that is partial, corrupt, or belongs to another model or run."""

  def __init__(self, message: str, reason: str | None = None):
    super().__init__(message)
    self.reason = reason or message  # the cause alone, for messages about several steps


def _quiet_orbax_read_failures() -> None:
  """Once a restore failed, Orbax's other reads of it fail later, outside any caller: their coroutines
  are collected unawaited and TensorStore's callbacks find the event loop closed. Python prints each
  as "Exception ignored", with the ~60-line TensorStore spec; the failure has been reported already,
  so those are dropped (every other unraisable exception still goes to the previous hook)."""
  previous = sys.unraisablehook
  if getattr(previous, "medusa_jax_orbax_filter", False):
    return

  def hook(u):
    code = getattr(u.object, "cr_code", None)
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
      return
    if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
      return
    previous(u)

  hook.medusa_jax_orbax_filter = True
  sys.unraisablehook = hook


def _reason(e: BaseException) -> str:
  """An Orbax/TensorStore error on one short line: its first sentence, not the store's spec dump."""
  text = " ".join(str(e).split("See full TensorStore details")[0].split())
  return f"{type(e).__name__}: {text[:160].rstrip(' .:')}" if text else type(e).__name__


def architecture(cfg: model_lib.ModelConfig) -> dict:
  """What must match for weights to be interchangeable (dtypes may differ)."""
  d = dataclasses.asdict(cfg)
  for k in ("dtype", "param_dtype", "name", "max_seq_len", "sliding_window", "bos_id", "eos_ids"):
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


def _gather_json(obj) -> list:
  """Every process's ``obj`` (JSON-serialisable), in process order; a collective, all must call it."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  # Equal shapes on every host: padded to the longest (JSON escapes NUL, so the padding is unambiguous).
  size = int(np.max(multihost_utils.process_allgather(np.int32(raw.size))))
  rows = multihost_utils.process_allgather(np.pad(raw, (0, size - raw.size)))
  return [json.loads(bytes(np.asarray(r)).rstrip(b"\0")) for r in rows]


# ----------------------------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------------------------

class TrainCheckpoints:
  """Saves every N steps and at the end, keeps the last few, restores the newest complete one."""

  # What Orbax leaves of a save that did not finish (see the module docstring), and the files it
  # writes last into a step before renaming it into place.
  _TMP = re.compile(r"(\d+)\.orbax-checkpoint-tmp.*")
  _COMMIT_FILES = ("commit_success.txt", "_CHECKPOINT_METADATA")

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
    unfinished = {int(m.group(1)): name for name in (os.listdir(self.dir) if os.path.isdir(self.dir) else ())
                  if (m := self._TMP.fullmatch(name))}
    self.manager = ocp.CheckpointManager(
        self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                                       create=True, enable_async_checkpointing=False),
        item_names=("state", "data"))
    steps = self.manager.all_steps()
    newest = self.latest_step()
    for s in sorted((set(unfinished) | set(steps)) - set(self._complete_steps())):
      if newest is not None and s < newest and s in steps:
        continue  # an old step whose deletion was interrupted: Orbax deletes it again in time
      _log.warning("Checkpoint step %d in %s is incomplete (its save was interrupted): ignoring it; %s.",
                   s, self.dir, f"the newest complete step is {newest}" if newest is not None else
                   "no step is complete")
      if s in steps:
        # Orbax lists it, so saving this step again would fail ("already exists"): delete it the
        # way Orbax deletes old steps.
        self.manager.delete(s)
      elif jax.process_index() == 0:
        shutil.rmtree(os.path.join(self.dir, unfinished[s]), ignore_errors=True)

  def _complete_steps(self) -> list[int]:
    return [s for s in self.manager.all_steps() if self.complete(s)]

  def complete(self, step: int) -> bool:
    """Whether step ``step`` was saved to the end (Orbax renamed it into place, commit files inside)."""
    path = os.path.join(self.dir, str(step))
    return step in self.manager.all_steps() and all(os.path.isfile(os.path.join(path, f))
                                                     for f in self._COMMIT_FILES)

  def latest_step(self) -> int | None:
    """The newest complete step (incomplete ones are never returned; see the module docstring)."""
    return max(self._complete_steps(), default=None)

  def reached_preemption(self, step: int) -> bool:
    """JAX's preemption sync point, through Orbax (False when jax.distributed is not initialised)."""
    return self.manager.reached_preemption(step)

  def should_save(self, step: int) -> bool:
    """Whether a periodic save is due (every N steps; the first step of a run with none)."""
    return self.manager.should_save(step)

  def save(self, step: int, state, data_state: dict | None, force: bool = False) -> bool:
    """Saves ``state`` and the data position at ``step``; every process calls it.

    Orbax writes a JSON item from process 0 alone, but each host's loader is at its own position
    (its own shard of the examples, its own packed rows): with several processes every host's
    ``data_state`` is gathered first and saved as ``{'processes': [...]}``, in process order
    (``loader.Batches.set_state`` picks its own, or translates them for another host count).
    """
    if jax.process_count() > 1:
      data_state = {"processes": _gather_json(data_state or {})}
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data_state or {})), force=force)

  def restore(self, step: int, target_state):
    """``(state, data_state)`` of step ``step``; a CheckpointError if it cannot be read."""
    if not self.complete(step):
      raise CheckpointError(f"Checkpoint step {step} in {self.dir} is incomplete (its save did not finish); "
                            f"restore the newest complete one ({self.latest_step()}).")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(target_state)), data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      _quiet_orbax_read_failures()
      raise CheckpointError(f"Checkpoint step {step} in {self.dir} cannot be restored ({_reason(e)}): if its "
                            f"files are damaged, delete {os.path.join(self.dir, str(step))}; if the config "
                            "changed since it was saved, use a fresh --workdir.", reason=_reason(e)) from None
    return out.state, (out.data or None)

  def restore_latest(self, target_state) -> tuple[int, Any, dict | None] | None:
    """``(step, state, data_state)`` of the newest complete step that can be read; None without steps.

    A step that cannot be read while an older one can has damaged files (a truncated file, a disk
    error; a config change would fail both): it is moved aside to ``checkpoints.unreadable/STEP``,
    nothing deleted, with a one-line warning, so the resumed run saves that step again. When no step
    can be read, the error names each one's reason and what to do.
    """
    failed = []
    for step in sorted(self._complete_steps(), reverse=True):
      try:
        state, data_state = self.restore(step, target_state)
      except CheckpointError as e:
        failed.append((step, e))
        continue
      for bad, e in failed:
        aside = self._move_aside(bad)
        _log.warning("Checkpoint step %d cannot be restored (%s): moved it to %s and resumed from step %d.",
                     bad, e.reason, aside, step)
      return step, state, data_state
    if len(failed) == 1:
      raise failed[0][1]
    if failed:
      (newest, e), steps = failed[0], ", ".join(str(s) for s, _ in failed)
      raise CheckpointError(f"No checkpoint in {self.dir} can be restored (steps {steps}; step {newest}: "
                            f"{e.reason}): if their files are damaged, delete those step directories to start "
                            "over; if the config changed since they were saved, use a fresh --workdir.")
    return None

  def _move_aside(self, step: int) -> str:
    """Moves step ``step`` out of Orbax's sight (into ``checkpoints.unreadable/``); returns where."""
    aside_dir = self.dir + ".unreadable"
    aside, n = os.path.join(aside_dir, str(step)), 1
    while os.path.exists(aside):  # the same step damaged before: keep both
      n += 1
      aside = os.path.join(aside_dir, f"{step}-{n}")
    if jax.process_index() == 0:
      os.makedirs(aside_dir, exist_ok=True)
      os.rename(os.path.join(self.dir, str(step)), aside)
    if jax.process_count() > 1:  # no host lists the step again before it is gone
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
    self.manager.reload()
    return aside

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# ----------------------------------------------------------------------------------------------
# Params-only export for decoding
# ----------------------------------------------------------------------------------------------

def save_export(path: str, cfg: model_lib.ModelConfig, hcfg: heads_lib.HeadsConfig, params: dict, *,
                include_base: bool, model: str) -> None:
  """Writes ``{'medusa': ...}`` (+ ``'base'`` if trained) and its metadata to ``path``, atomically.

  Everything goes to the sibling ``PATH.incomplete`` first (the same name on every host, and a
  leftover of a killed export is overwritten); host 0 then moves a previous export aside, renames
  the new one into place and deletes the old one. Killed in between, ``PATH`` is missing (never
  half-written) and rerunning the training command exports again.
  """
  path = os.path.abspath(path)
  tree = {"medusa": params["medusa"]}
  if include_base:
    tree["base"] = params["base"]
  tmp, old = path + ".incomplete", path + ".old"
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(tmp, "params"), tree, force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    _write_json(os.path.join(tmp, "export_meta.json"), {
        "architecture": architecture(cfg), "heads": dataclasses.asdict(hcfg), "includes_base": include_base,
        "model": model})
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
      os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
  if jax.process_count() > 1:
    # No host reports the export written before it is in place.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("save_export")


def check_export(path: str) -> str:
  """The absolute path of ``path`` if it looks like an export (its files are read by ``load_export``);
  cheap, so the CLIs call it before loading the model."""
  path = os.path.abspath(path)  # Orbax wants absolute paths; users type relative ones
  if not os.path.isfile(os.path.join(path, "export_meta.json")) or not os.path.isdir(os.path.join(path, "params")):
    raise CheckpointError(f"{path} is not a medusa_jax export (expected export_meta.json and params/); "
                          "train writes one to WORKDIR/export.")
  return path


def load_export(path: str, cfg: model_lib.ModelConfig, base) -> tuple[dict, heads_lib.HeadsConfig]:
  """Loads an export made by training; ``base`` is used when the export holds only the heads."""
  path = check_export(path)
  meta_path = os.path.join(path, "export_meta.json")
  with open(meta_path) as f:
    meta = json.load(f)
  check_architecture(meta["architecture"], cfg, f"The export {path}")
  hcfg = heads_lib.HeadsConfig(**meta["heads"])
  target = {"medusa": jax.eval_shape(lambda: heads_lib.init_params(hcfg, cfg, _shape_base(cfg)))}
  if meta["includes_base"]:
    target["base"] = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  # Whole, on this process's first device, whatever mesh wrote it: without a sharding Orbax would
  # restore the writer's (a pod slice's devices), which no other topology has. Decoding on a mesh
  # then places it from there (sharding.put_global).
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=local), target)
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
