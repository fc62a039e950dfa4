"""Medusa-1 / Medusa-2 training: one jitted step over the one params pytree ``{base, medusa}``.

Which parameters train is configuration: ``config.train.trainable`` maps regexes over parameter
paths (``base/layers_0/wq``, ``medusa/w``) to an optimizer group or None (frozen). Only the trainable
part is differentiated and updated — frozen leaves are never touched, so Medusa-1 leaves ``base``
bit-identical and never runs the backbone's backward pass. Medusa-2 adds a ``backbone`` group (a
learning rate ``group_lr_mult`` times the heads'), the LM loss, and a heads-only first stage.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medusa_jax import checkpoint as ckpt_lib
from medusa_jax import config as config_lib
from medusa_jax import heads as heads_lib
from medusa_jax import loss as loss_lib
from medusa_jax import model as model_lib
from medusa_jax import preemption as preemption_lib


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


def merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = merge(out[k], v) if k in out and isinstance(v, dict) else v
  return out


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------

class StartState(NamedTuple):
  count: jax.Array
  inner: Any


def starting_at(tx: optax.GradientTransformation, start: int) -> optax.GradientTransformation:
  """``tx`` whose state begins at step ``start``: before it, updates are zero and the inner state
  (Adam's step count and moments included) stays as initialised, so step ``start`` is a fresh
  ``tx``'s first step. Medusa-2's backbone: one Adam state for the whole run would count the
  heads-only steps, and bias correction would then inflate its first joint updates (after 150
  heads-only steps, about 2.2-2.5x for the first ~100 joint steps at b1 0.9, b2 0.999)."""
  def init(params):
    return StartState(jnp.zeros((), jnp.int32), tx.init(params))

  def update(updates, state, params=None):
    new_updates, new_inner = tx.update(updates, state.inner, params)
    go = state.count >= start
    pick = lambda new, old: jnp.where(go, new, old)
    updates = jax.tree.map(lambda u: jnp.where(go, u, jnp.zeros_like(u)), new_updates)
    return updates, StartState(state.count + 1, jax.tree.map(pick, new_inner, state.inner))

  return optax.GradientTransformation(init, update)


def group_schedules(tc, total: int) -> dict[str, tuple[Callable, int]]:
  """Each optimizer group's learning rate as a function of its own step count, and the global step
  that count starts at: warm-up + cosine. ``group_lr_mult`` scales every group's peak (heads and
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
  """Per-group learning rates as functions of the global step (what the logs and TensorBoard show)."""
  def at_global(fn, start):
    return lambda s: jnp.where(s < start, 0.0, fn(jnp.maximum(s - start, 0)))
  return {g: at_global(fn, start) for g, (fn, start) in group_schedules(tc, total).items()}


def make_optimizer(tc, trainable_labels: dict, total: int):
  """AdamW per group, each clipping its own gradient norm (Medusa-2's heads and backbone see
  gradients of different losses, whose norms should not throttle each other), each group's state
  starting with its own stage (``starting_at``)."""
  groups = sorted({g for g in trainable_labels.values() if g is not None})
  per_group = group_schedules(tc, total)
  unknown = [g for g in groups if g not in per_group]
  if unknown:
    raise ValueError(f"Optimizer groups {unknown} have no schedule; known: {sorted(per_group)}")
  txs = {}
  for g in groups:
    fn, start = per_group[g]
    tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                     optax.adamw(fn, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay))
    txs[g] = starting_at(tx, start) if start > 0 else tx

  def label_fn(tparams):
    return jax.tree_util.tree_map_with_path(lambda p, _: trainable_labels[path_str(p)], tparams)

  return optax.multi_transform(txs, label_fn), schedules(tc, total)


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static part of a train step (hashable)."""
  model: model_lib.ModelConfig
  heads: heads_lib.HeadsConfig
  head_decay: float
  lm_weight: float
  lm_loss: str
  lambda0: float
  lambda0_schedule: str
  lambda0_ramp_steps: int
  remat_heads: bool = True
  heads_loss: str = "ce"          # ce | kl | mix (loss.heads_loss)
  heads_kl_mix: float = 0.5
  heads_kl_temperature: float = 1.0
  # Medusa-2: the global step its joint stage starts at (the lambda0 ramp counts from there).
  joint_start: int = 0
  lora: Any = None                # lora.LoraConfig: the backbone trains through adapters
  # Medusa-2's heads-only stage: the backbone is held (stop_gradient) and its LM loss skipped, so a
  # step costs what a Medusa-1 step costs instead of a full backbone backward plus a teacher forward
  # whose updates the zero backbone learning rate would throw away.
  heads_only: bool = False
  # Sharding of activations' rows (``TrainPlacement.rows``): with it the embedding table is gathered
  # whole and the backbone's output pinned to it, so that XLA keeps the batch split across devices
  # and gathers weights (FSDP) instead of replicating the batch; None: one device, nothing pinned.
  rows: Any = None
  # Tests only (tests/test_faults.py): the loss of these steps (the ``step`` argument) is multiplied
  # by NaN, so their loss and gradients are not finite; empty, the step is the same program.
  inject_nonfinite_at: tuple[int, ...] = ()


def _pin_rows(sc: StepConfig, x):
  return x if sc.rows is None else jax.lax.with_sharding_constraint(x, sc.rows)


def _whole_embedding(sc: StepConfig, base):
  """The embedding table gathered whole (V x D, small) before the lookup: looked up in a table
  split over ``embed``, the activations would inherit that split and XLA would replicate the
  batch instead — every device then runs the whole batch."""
  if sc.rows is None or "embed" not in base:
    return base
  whole = jax.sharding.NamedSharding(sc.rows.mesh, jax.sharding.PartitionSpec())
  return {**base, "embed": jax.lax.with_sharding_constraint(base["embed"], whole)}


def lambda0_at(sc: StepConfig, step):
  """λ0 at a global step: a sine ramp counts from the joint stage's first step (0 there)."""
  if sc.lambda0_schedule == "sine" and sc.lambda0_ramp_steps > 0:
    s = jnp.maximum(step - sc.joint_start, 0)
    return sc.lambda0 * jnp.sin(0.5 * jnp.pi * jnp.minimum(1.0, s / sc.lambda0_ramp_steps))
  return jnp.asarray(sc.lambda0, jnp.float32)


@jax.custom_vjp
def scale_grad(x, scale):
  """The identity whose gradient is multiplied by ``scale`` (a traced scalar)."""
  return x


scale_grad.defvjp(lambda x, scale: (x, scale), lambda scale, g: (g * scale.astype(g.dtype), jnp.zeros_like(scale)))


def backbone(sc: StepConfig, params):
  """The backbone the step runs: ``params['base']`` with its LoRA adapters merged when it has them."""
  if sc.lora is None:
    return params["base"]
  from medusa_jax import lora as lora_lib  # pylint: disable=g-import-not-at-top
  return lora_lib.merge(sc.lora, params["base"], params["lora"])


def loss_fn(sc: StepConfig, tparams, frozen, batch, step, teacher_base=None):
  """(the value differentiated, metrics); ``metrics['loss']`` is the objective itself.

  Medusa-1 (no LM loss): λ0 · heads_loss. Medusa-2's heads-only stage: heads_loss alone, the
  backbone held. Its joint stage: ``lm_weight · L_LM + λ0 · heads_loss``, where the backbone gets
  exactly that gradient but the heads get the gradient of heads_loss itself: λ0 scales only the
  heads loss's gradient into the backbone (``scale_grad``). The heads' loss is the only one they
  see, so for them λ0 would just rescale every gradient, and Adam's moments from the heads-only
  stage (at scale 1) would then shrink their updates ~1/λ0-fold (100x at λ0 = 0.01) for thousands
  of steps.
  """
  params = merge(frozen, tparams)
  base = backbone(sc, params)
  if sc.heads_only:
    base = jax.lax.stop_gradient(base)
  params = {**params, "base": base}
  cfg = sc.model
  mask = model_lib.segment_causal_mask(batch["segment_ids"])
  if "hidden" in batch:  # Medusa-1 with config.train.cache_hidden: the frozen backbone's, looked up
    hidden = batch["hidden"].astype(cfg.compute_dtype)
  else:
    _, hidden, _ = model_lib.forward(cfg, _whole_embedding(sc, base), batch["tokens"], batch["positions"], mask,
                                     None, logits=False)
  hidden = _pin_rows(sc, hidden)
  joint = sc.lm_weight > 0 and not sc.heads_only
  lam = lambda0_at(sc, step) if not sc.heads_only else jnp.ones((), jnp.float32)
  h_loss, metrics = loss_lib.heads_loss(sc.heads, cfg, params, scale_grad(hidden, lam) if joint else hidden, batch,
                                        sc.head_decay, remat=sc.remat_heads, kind=sc.heads_loss,
                                        kl_mix=sc.heads_kl_mix, kl_temperature=sc.heads_kl_temperature)
  metrics["heads_loss"] = h_loss
  objective = lam * h_loss
  differentiated = h_loss if joint else objective
  if joint:
    teacher = None
    if sc.lm_loss == "kl":
      # The original backbone: a frozen copy, or with LoRA the base weights themselves.
      t_base = teacher_base if teacher_base is not None else params_base_frozen(sc, frozen, tparams)
      _, t_hidden, _ = model_lib.forward(cfg, _whole_embedding(sc, t_base), batch["tokens"], batch["positions"],
                                         mask, None, logits=False)
      teacher = jax.lax.stop_gradient(model_lib.project_logits(cfg, t_base, t_hidden))
    lm, lm_metrics = loss_lib.lm_loss(cfg, base, hidden, batch, teacher)
    objective = objective + sc.lm_weight * lm
    differentiated = differentiated + sc.lm_weight * lm
    metrics.update(lm_metrics)
  metrics["lambda0"] = lam
  metrics["loss"] = objective
  return differentiated, metrics


def params_base_frozen(sc: StepConfig, frozen, tparams):
  """The untouched base weights (LoRA: they are frozen; the adapters carry the training)."""
  if sc.lora is None:
    raise ValueError("A KL backbone loss without LoRA needs the original backbone (teacher_base).")
  return merge(frozen, tparams)["base"]


def needs_teacher_copy(sc: StepConfig) -> bool:
  """Whether the KL backbone loss needs a frozen copy of the original backbone (not with LoRA)."""
  return sc.lm_weight > 0 and sc.lm_loss == "kl" and sc.lora is None


def _injected_nonfinite(sc: StepConfig, loss):
  def poisoned(tparams, frozen, batch, step, teacher_base):
    total, metrics = loss(tparams, frozen, batch, step, teacher_base)
    total = total * jnp.where(jnp.any(step == jnp.asarray(sc.inject_nonfinite_at)), jnp.nan, 1.0)
    return total, {**metrics, "loss": total}
  return poisoned


def train_step(sc: StepConfig, tx, tparams, opt_state, frozen, batch, step, teacher_base=None):
  """One optimizer step; one whose loss or global gradient norm is not finite changes nothing.

  The update is computed either way and then selected leaf by leaf on the scalar ``finite``
  (``jnp.where``: an elementwise select that XLA can fuse into the update itself), so a skipped step
  returns params and the whole optimizer state, Adam's count included, bit-identical, and nothing
  waits for the host; ``metrics['skipped']`` (0 or 1) tells the loop when it next fetches metrics.
  """
  loss = functools.partial(loss_fn, sc)
  if sc.inject_nonfinite_at:
    loss = _injected_nonfinite(sc, loss)
  grads, metrics = jax.grad(loss, has_aux=True)(tparams, frozen, batch, step, teacher_base)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  updates, new_opt_state = tx.update(grads, opt_state, tparams)
  new_tparams = optax.apply_updates(tparams, updates)
  keep_if_finite = lambda new, old: jnp.where(finite, new, old)
  tparams = jax.tree.map(keep_if_finite, new_tparams, tparams)
  opt_state = jax.tree.map(keep_if_finite, new_opt_state, opt_state)
  metrics["grad_norm"] = grad_norm
  metrics["skipped"] = jnp.logical_not(finite).astype(jnp.int32)
  return tparams, opt_state, metrics


def eval_step(sc: StepConfig, tparams, frozen, batch, step, teacher_base=None):
  return loss_fn(sc, tparams, frozen, batch, step, teacher_base)[1]


def jit_train_step(sc: StepConfig, tx, placement, with_teacher: bool, cached_hidden: bool = False):
  """``train_step`` jitted for ``placement``'s mesh (``sharding.TrainPlacement``).

  Explicit in/out shardings (see TrainPlacement for why each is what it is) fix the layout once, so
  XLA neither guesses nor reshards between steps; params and optimizer state (args 0 and 1) are
  donated, so their buffers are reused for the updated values instead of doubling the memory.
  ``medusa_jax.fit`` lowers this same function ahead of time.
  """
  return jax.jit(functools.partial(train_step, sc, tx), donate_argnums=(0, 1),
                 in_shardings=placement.step_in_shardings(tx, with_teacher, cached_hidden),
                 out_shardings=placement.step_out_shardings(tx))


def step_config(config, cfg, hcfg) -> StepConfig:
  tc = config.train
  if tc.lm_loss not in ("ce", "kl"):
    raise ValueError(f"config.train.lm_loss must be 'ce' or 'kl', got {tc.lm_loss!r}")
  if tc.heads_loss not in loss_lib.HEADS_LOSSES:
    raise ValueError(f"config.train.heads_loss must be one of {loss_lib.HEADS_LOSSES}, got {tc.heads_loss!r}")
  if int(tc.seq_len) > cfg.max_seq_len:
    raise ValueError(f"config.train.seq_len={tc.seq_len} exceeds the model's context of {cfg.max_seq_len}"
                     + (f" (its {cfg.sliding_window}-token sliding window: sliding-window attention is not "
                        "implemented)" if cfg.sliding_window else "") + ".")
  return StepConfig(model=cfg, heads=hcfg, head_decay=float(tc.head_decay), lm_weight=float(tc.lm_weight),
                    lm_loss=tc.lm_loss, lambda0=float(tc.lambda0), lambda0_schedule=tc.lambda0_schedule,
                    lambda0_ramp_steps=int(tc.lambda0_ramp_steps), remat_heads=bool(tc.remat_heads),
                    heads_loss=tc.heads_loss, heads_kl_mix=float(tc.heads_kl_mix),
                    heads_kl_temperature=float(tc.heads_kl_temperature),
                    joint_start=int(tc.heads_only_steps) if tc.lm_weight > 0 else 0,
                    lora=config_lib.lora_config(config))


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def dataset_name(config) -> str:
  """The TFDS dataset a config trains on (built by medusa_jax.distill or from ShareGPT)."""
  if config.data.source == "distilled":
    from medusa_jax import distill  # pylint: disable=g-import-not-at-top
    return distill.dataset_name(config)
  if config.data.source == "sharegpt":
    n = config.data.max_examples
    return f"sharegpt_l{config.data.max_len}" + (f"_n{n}" if n else "")
  raise ValueError(f"config.data.source must be 'distilled' or 'sharegpt', got {config.data.source!r}")


def _data_sources(config, tokenizer):
  from medusa_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  name = dataset_name(config)
  d = config.data
  if d.source == "sharegpt":
    # Host 0 builds the dataset first; then the others find it (a shared data_dir) or build their
    # own identical copy (host-local disks). The build is deterministic, so all hosts agree.
    for turn in (0, 1):
      if (jax.process_index() == 0) == (turn == 0):
        data_lib.prepare_sharegpt(d.data_dir, tokenizer, max_len=d.max_len,
                                  max_examples=d.max_examples or None, heldout_fraction=d.heldout_fraction,
                                  name=name)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices(f"prepare_sharegpt_{turn}")
  try:
    train = data_lib.load_split(d.data_dir, name, "train")
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f"Training data {name!r} not found under {d.data_dir} ({type(e).__name__}). For "
        "data.source='distilled' run `python -m medusa_jax.distill --config <same config>` first.") from None
  try:
    heldout = data_lib.load_split(d.data_dir, name, "heldout")
  except Exception:  # pylint: disable=broad-except
    heldout = None
  return data_lib, train, heldout


def target_counts(source, vocab_size: int, max_examples: int = 20000):
  """How often each token is an assistant (loss) target in the first examples of a split."""
  counts = np.zeros(vocab_size, np.int64)
  for i in range(min(len(source), max_examples)):
    ex = source[i]
    counts += np.bincount(np.asarray(ex["tokens"])[np.asarray(ex["loss_mask"]) > 0], minlength=vocab_size)
  return counts


class _Writer:
  """Metrics to stdout (every log step) and to TensorBoard event files."""

  def __init__(self, workdir):
    self.tb = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: dict, prefix: str = "train"):
    if self.tb is None:
      return
    for k, v in metrics.items():
      self.tb.add_scalar(f"{prefix}/{k}", float(v), step)
    self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def say(msg: str) -> None:
  """Progress lines on stdout (host 0), above the progress bar. Library INFO logs (Orbax logs every
  file it writes) stay off unless --verbosity asks for them."""
  if jax.process_index() == 0:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    tqdm.write(msg)


def _summary(metrics: dict, keys=("loss", "heads_loss", "head1/top1", "head2/top1", "head3/top1",
                                  "lm/loss", "lm/kl", "grad_norm", "steps_per_s")) -> str:
  return " ".join(f"{k}={float(metrics[k]):.4g}" for k in keys if k in metrics)


class NonFiniteError(RuntimeError):
  """Too many train steps in a row had a non-finite loss or gradient norm; the message is one line."""


class _NonFiniteSteps:
  """Skipped steps (``metrics['skipped']``), read only when the loop syncs with the device anyway.

  The loop hands over every step's flag as a device array; ``check`` fetches the flags gathered
  since its last call (at log steps and before each save), logs each skipped step with the data
  position of its batch, and raises ``NonFiniteError`` once ``limit`` steps in a row were skipped,
  so a save never follows such a streak: the newest checkpoint is the last good state.
  """

  def __init__(self, limit: int):
    self.limit = limit
    self.streak = 0
    self.total = 0
    self._pending = []

  def add(self, step: int, position, metrics: dict) -> None:
    self._pending.append((step, position, metrics))

  def check(self, newest_checkpoint: Callable[[], int | None]) -> int:
    """Logs the pending skipped steps and returns how many there were; raises on a streak."""
    pending, self._pending = self._pending, []
    flags = jax.device_get([m["skipped"] for _, _, m in pending])
    skipped = 0
    for (step, position, m), flag in zip(pending, flags):
      if not flag:
        self.streak = 0
        continue
      skipped += 1
      self.total += 1
      self.streak += 1
      loss, grad_norm = jax.device_get((m["loss"], m["grad_norm"]))
      say(f"step {step}: skipped (loss={float(loss):.4g}, grad_norm={float(grad_norm):.4g} not finite); params "
          f"and optimizer state unchanged. Its batch: number {step - 1} of the data stream, read from data "
          f"position {json.dumps(position)}; {self.streak} skipped in a row.")
      if self.limit and self.streak >= self.limit:
        newest = newest_checkpoint()
        kept = f"the newest checkpoint (step {newest}) is the last good state" if newest is not None else (
            "no checkpoint was saved")
        raise NonFiniteError(
            f"Training stopped at step {step}: {self.streak} steps in a row had a non-finite loss or gradient "
            f"norm (config.train.max_nonfinite_steps={self.limit}); {kept}. Check the data at the logged "
            "positions, or lower config.train.lr.")
    return skipped


def _hidden_caches(config, cfg, base, train_src, heldout_src, trains_base: bool, sc: StepConfig):
  """{'train', 'heldout'} hidden-state caches with ``config.train.cache_hidden`` (else None)."""
  if not config.train.cache_hidden:
    return None
  if trains_base or sc.lm_weight > 0:
    raise ValueError("config.train.cache_hidden needs a frozen backbone and no LM loss (Medusa-1): the "
                     "hidden states of a backbone that trains change every step.")
  if jax.process_count() > 1:
    raise ValueError("config.train.cache_hidden works on one process (each would need every example's "
                     "hidden states); turn it off for multi-host runs.")
  from medusa_jax import hidden_cache  # pylint: disable=g-import-not-at-top
  name, seq_len, data_dir = dataset_name(config), int(config.train.seq_len), config.data.data_dir
  caches = {"train": hidden_cache.for_split(cfg, base, train_src, seq_len, data_dir, name, "train")}
  if heldout_src is not None:
    caches["heldout"] = hidden_cache.for_split(cfg, base, heldout_src, seq_len, data_dir, name, "heldout")
  return caches


def with_adapters(config, cfg, params: dict) -> dict:
  """``params`` with fresh LoRA adapters (``params['lora']``) when ``config.train.lora.rank`` > 0."""
  lcfg = config_lib.lora_config(config)
  if lcfg is None:
    return params
  from medusa_jax import lora as lora_lib  # pylint: disable=g-import-not-at-top
  return {**params, "lora": lora_lib.init(lcfg, cfg, jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))}


def export_params(sc: StepConfig, params: dict) -> dict:
  """What decoding loads: LoRA adapters merged into the backbone (stored in its dtype), so a
  LoRA-trained model decodes at no extra cost."""
  if sc.lora is None:
    return params
  from medusa_jax import lora as lora_lib  # pylint: disable=g-import-not-at-top
  base = lora_lib.merge(sc.lora, params["base"], params["lora"], dtype=sc.model.param_dtype)
  return {"base": base, "medusa": params["medusa"]}


def train_and_evaluate(config, workdir: str, *, stop_after: int | None = None) -> dict:
  """Trains heads (and, for Medusa-2, the backbone) and exports params for decoding.

  Resumes from the newest complete checkpoint in ``workdir``. ``stop_after`` ends the run early
  after that many steps of this invocation without the final export (used by tests to simulate a
  kill). Returns the last train and eval metrics, the step reached, why it stopped early
  (``'stopped'``: a signal's name, 'preemption notice', or None) and how many steps it skipped.

  SIGTERM / SIGINT (``preemption.TrainStop``): the step in progress finishes, a checkpoint of it
  (train state and data position) is saved, and this returns; on several hosts, every host stops
  and saves at the same step, agreed through JAX's preemption service. A step whose loss or
  gradient norm is not finite is skipped (``train_step``); ``config.train.max_nonfinite_steps``
  of them in a row raise ``NonFiniteError`` before anything else is saved.
  """
  from medusa_jax import runtime  # pylint: disable=g-import-not-at-top
  from medusa_jax import sharding  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  tc = config.train
  sharding.maybe_initialize_distributed(config)
  # heads_dir (optional): start from heads in the original release's format or from an export's.
  heads_dir = config.get("heads_dir", None) or None
  loaded = runtime.load(config, heads=heads_dir)
  cfg, hcfg = loaded.cfg, loaded.heads
  params = loaded.params
  data_lib, train_src, heldout_src = _data_sources(config, loaded.tokenizer)
  if hcfg.draft_vocab and heads_dir is None:  # heads loaded from an export keep their own vocabulary
    params["medusa"]["vocab_ids"] = heads_lib.draft_vocab_from_counts(hcfg, target_counts(train_src, cfg.vocab_size))
  params = with_adapters(config, cfg, params)
  split = split_for_training(tc, params)
  label_map, tparams, frozen, tx, sched = split.label_map, split.tparams, split.frozen, split.tx, split.schedules
  sc = step_config(config, cfg, hcfg)
  teacher = None
  if needs_teacher_copy(sc):
    teacher = jax.tree.map(jnp.copy, params["base"])  # the original backbone, frozen

  mesh = sharding.make_mesh(config)
  placement = sharding.TrainPlacement(config, mesh, cfg, hcfg, tparams, frozen)
  placement.check_batch(tc.batch_size)
  sc = dataclasses.replace(sc, rows=placement.rows)
  tparams, frozen = placement.put(tparams, frozen)
  teacher = placement.put_frozen_like(teacher) if teacher is not None else None
  opt_state = jax.jit(tx.init, out_shardings=placement.opt_shardings(tx))(tparams)
  trains_base = any(g is not None for p, g in label_map.items() if p.startswith(("base/", "lora/")))
  caches = _hidden_caches(config, cfg, params["base"], train_src, heldout_src, trains_base, sc)
  cached = caches is not None
  step_fn = jit_train_step(sc, tx, placement, teacher is not None, cached)
  heads_only_fn = (jit_train_step(dataclasses.replace(sc, heads_only=True), tx, placement, teacher is not None,
                                  cached) if trains_base and tc.heads_only_steps > 0 else step_fn)
  eval_fn = jax.jit(functools.partial(eval_step, sc))

  # Hosts whose devices share batch rows (replicas) read the same examples; see sharding.process_shard.
  shard_index, shard_count = placement.data_shard()
  per_host = tc.batch_size // shard_count
  loader = data_lib.make_loader(train_src, batch_size=per_host, seq_len=tc.seq_len, seed=config.seed,
                                shard_index=shard_index, shard_count=shard_count, pack=config.data.pack,
                                token_offsets=caches["train"].offsets if cached else None)
  it = iter(loader)

  def put(batch, split):
    if cached:  # the frozen backbone's hidden states instead of its forward
      batch = dict(batch)
      batch["hidden"] = caches[split].gather(batch.pop("token_index"))
    return placement.put_batch(batch)

  trainable_rules = [[rx, g] for rx, g in tc.trainable]
  ckpts = ckpt_lib.TrainCheckpoints(workdir, every=tc.checkpoint_every, keep=tc.keep_checkpoints, meta={
      "cfg": cfg, "trainable": trainable_rules, "heads": dataclasses.asdict(hcfg), "model": config.model})
  start = 0
  latest = ckpts.latest_step()
  if latest is not None:
    state, data_state = ckpts.restore(latest, {"params": tparams, "opt_state": opt_state})
    tparams, opt_state = state["params"], state["opt_state"]
    if data_state:
      it.set_state(data_state)
    start = latest
    say(f"Resumed from step {latest} in {ckpts.dir}")

  writer = _Writer(workdir)
  last_train, last_eval = {}, {}

  def evaluate(step):
    if heldout_src is None or not tc.eval_batches:
      return {}
    ev = data_lib.make_loader(heldout_src, batch_size=per_host, seq_len=tc.seq_len, seed=0, shuffle=False,
                              num_epochs=1, shard_index=shard_index, shard_count=shard_count,
                              pack=config.data.pack, token_offsets=caches["heldout"].offsets if cached else None)
    acc, n = {}, 0
    for i, b in enumerate(ev):
      if i >= tc.eval_batches:
        break
      m = eval_fn(tparams, frozen, put(b, "heldout"), jnp.asarray(step), teacher)
      for k, v in m.items():
        acc[k] = acc.get(k, 0.0) + float(v)
      n += 1
    return {k: v / max(n, 1) for k, v in acc.items()}

  end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
  bar = tqdm(range(start, end), initial=start, total=tc.steps, desc="train", unit="step",
             disable=jax.process_index() != 0)
  nonfinite = _NonFiniteSteps(int(tc.max_nonfinite_steps))
  done, stopped = start, None
  position = it.get_state()  # of the next batch; a checkpoint saves the one after its step's batch
  t0 = time.perf_counter()
  try:
    with preemption_lib.TrainStop(ckpts.reached_preemption, jax.process_count()) as stop:
      for step in bar:
        batch = put(next(it), "train")
        fn = heads_only_fn if step < tc.heads_only_steps else step_fn
        tparams, opt_state, metrics = fn(tparams, opt_state, frozen, batch, jnp.asarray(step), teacher)
        done = step + 1
        nonfinite.add(done, position, metrics)
        position = it.get_state()
        # Every host asks at every step (JAX's preemption sync point needs it); all get the same answer.
        stopped = stop.reached(done)
        save = stopped is not None or done == tc.steps or ckpts.should_save(done)
        log = done % tc.log_every == 0 or done == end or stopped is not None
        if log or save:
          skipped = nonfinite.check(ckpts.latest_step)
        if log:
          metrics = {k: float(v) for k, v in metrics.items() if k != "skipped"}
          metrics["skipped_steps"] = skipped  # since the previous log line
          metrics.update({f"lr/{g}": float(s(step)) for g, s in sched.items()
                          if g in set(label_map.values())})
          metrics["steps_per_s"] = (done - start) / (time.perf_counter() - t0)
          writer.write(done, metrics)
          last_train = metrics
          bar.set_postfix_str(_summary(metrics, ("loss", "head1/top1")))
          say(f"step {done}: {_summary(metrics)}")
        # A stopping host saves first: the time between SIGTERM and the end of the VM is short.
        if stopped is None and tc.eval_every and (done % tc.eval_every == 0 or done == tc.steps):
          last_eval = evaluate(done)
          if last_eval:
            writer.write(done, last_eval, "eval")
            say(f"eval step {done}: {_summary(last_eval)}")
        if save:
          ckpts.save(done, {"params": tparams, "opt_state": opt_state}, position, force=True)
        if stopped is not None:
          say(f"Stopped by {stopped} after step {done}: saved its checkpoint (train state and data position) "
              f"in {ckpts.dir}. Run the same command again to resume.")
          break
    if stopped is None and done == tc.steps:
      params = export_params(sc, merge(frozen, tparams))
      ckpt_lib.save_export(os.path.join(workdir, "export"), cfg, hcfg, params, include_base=trains_base,
                           model=config.model)
      say(f"Exported params for decoding to {os.path.join(workdir, 'export')}")
  finally:
    bar.close()
    ckpts.close()
    writer.close()
  return {"train": last_train, "eval": last_eval, "step": done, "stopped": stopped,
          "skipped_steps": nonfinite.total}
