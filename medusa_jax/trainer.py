"""Medusa-1 / Medusa-2 training: one jitted step over the one params pytree ``{base, medusa}``.

Which parameters train is configuration (``optim.split_for_training``): ``config.train.trainable``
maps regexes over parameter paths to an optimizer group or None (frozen). Only the trainable part is
differentiated and updated — frozen leaves are never touched, so Medusa-1 leaves ``base``
bit-identical and never runs the backbone's backward pass. Medusa-2 adds a ``backbone`` group (a
learning rate ``group_lr_mult`` times the heads'), the LM loss, and a heads-only first stage.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

from medusa_jax import checkpoint as ckpt_lib
from medusa_jax import heads as heads_lib
from medusa_jax import lora as lora_lib
from medusa_jax import loss as loss_lib
from medusa_jax import model as model_lib
from medusa_jax import optim
from medusa_jax import preemption as preemption_lib
from medusa_jax import runtime
from medusa_jax import sharding
from medusa_jax import train_data
from medusa_jax import train_log
from medusa_jax.optim import TrainState


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
  """The backbone the step runs: ``params['base']`` with its LoRA adapters merged when it has them;
  held (stop_gradient) in the heads-only stage.

  The heads-only stage skips the merge: its adapters have not trained yet (B starts at zero and the
  backbone group's optimizer holds them until the joint stage), so the merged weights equal the base
  ones (W + 0, cast to the compute dtype as the forward does either way)."""
  if sc.heads_only:
    return jax.lax.stop_gradient(params["base"])
  if sc.lora is None:
    return params["base"]
  return lora_lib.merge(sc.lora, params["base"], params["lora"])


def loss_fn(sc: StepConfig, tparams, frozen, batch, step, teacher_base=None):
  """(the value differentiated, metrics); ``metrics['loss']`` is the objective itself.

  Medusa-1 (no LM loss): λ0 · heads_loss. Medusa-2's heads-only stage: heads_loss alone, the
  backbone held. Its joint stage: ``lm_weight · L_LM + λ0 · heads_loss``, where the backbone gets
  exactly that gradient but the heads get the gradient of heads_loss itself: λ0 scales only the
  heads loss's gradient into the backbone (``scale_grad``), through every path — the hidden states
  and the backbone weights the heads read directly (the tied embedding or LM head as their
  projection, the embedding rows of the tokens they are fed). The heads' loss is the only one they
  see, so for them λ0 would just rescale every gradient, and Adam's moments from the heads-only
  stage (at scale 1) would then shrink their updates ~1/λ0-fold (100x at λ0 = 0.01) for thousands
  of steps.
  """
  params = optim.merge(frozen, tparams)
  base = backbone(sc, params)
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
  heads_base, heads_hidden = base, hidden
  if joint:
    heads_base, heads_hidden = jax.tree.map(lambda x: scale_grad(x, lam), (base, hidden))
  h_loss, metrics = loss_lib.heads_loss(sc.heads, cfg, {**params, "base": heads_base}, heads_hidden, batch,
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
  return optim.merge(frozen, tparams)["base"]


def needs_teacher_copy(sc: StepConfig) -> bool:
  """Whether the KL backbone loss needs a frozen copy of the original backbone (not with LoRA)."""
  return sc.lm_weight > 0 and sc.lm_loss == "kl" and sc.lora is None


def train_step(sc: StepConfig, tx, state: TrainState, frozen, batch, teacher_base=None):
  """One optimizer step: (the next state, metrics). One whose loss or global gradient norm is not
  finite changes nothing but ``state.step``.

  The update is computed either way and then selected leaf by leaf on the scalar ``finite``
  (``jnp.where``: an elementwise select that XLA can fuse into the update itself), so a skipped step
  returns params and the whole optimizer state, Adam's count included, bit-identical, and nothing
  waits for the host; ``metrics['skipped']`` (0 or 1) tells the loop when it next fetches metrics.
  The step counter advances regardless: schedules and stage starts are global steps.
  """
  grads, metrics = jax.grad(functools.partial(loss_fn, sc), has_aux=True)(
      state.params, frozen, batch, state.step, teacher_base)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params, step=state.step)
  params = optax.apply_updates(state.params, updates)
  keep_if_finite = lambda new, old: jnp.where(finite, new, old)
  state = state.replace(step=state.step + 1, params=jax.tree.map(keep_if_finite, params, state.params),
                        opt_state=jax.tree.map(keep_if_finite, opt_state, state.opt_state))
  metrics["grad_norm"] = grad_norm
  metrics["skipped"] = jnp.logical_not(finite).astype(jnp.int32)
  return state, metrics


def eval_step(sc: StepConfig, tparams, frozen, batch, step, teacher_base=None):
  return loss_fn(sc, tparams, frozen, batch, step, teacher_base)[1]


def jit_train_step(sc: StepConfig, tx, placement, with_teacher: bool, cached_hidden: bool = False):
  """``train_step`` jitted for ``placement``'s mesh (``sharding.TrainPlacement``).

  Explicit in/out shardings (see TrainPlacement for why each is what it is) fix the layout once, so
  XLA neither guesses nor reshards between steps; the state (arg 0) is donated, so its buffers are
  reused for the updated values instead of doubling the memory. ``medusa_jax.fit`` lowers this same
  function ahead of time.
  """
  return jax.jit(functools.partial(train_step, sc, tx), donate_argnums=(0,),
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
                    lora=lora_lib.config_from(config))


def export_params(sc: StepConfig, params: dict) -> dict:
  """What decoding loads: LoRA adapters merged into the backbone (stored in its dtype), so a
  LoRA-trained model decodes at no extra cost."""
  if sc.lora is None:
    return params
  base = lora_lib.merge(sc.lora, params["base"], params["lora"], dtype=sc.model.param_dtype)
  return {"base": base, "medusa": params["medusa"]}


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------

def with_adapters(config, cfg, params: dict) -> dict:
  """``params`` with fresh LoRA adapters (``params['lora']``) when ``config.train.lora.rank`` > 0."""
  lcfg = lora_lib.config_from(config)
  if lcfg is None:
    return params
  return {**params, "lora": lora_lib.init(lcfg, cfg, jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))}


@dataclasses.dataclass
class _Run:
  """What ``train_and_evaluate`` wires once and its helpers share: the model, the split of the
  params and its placement, the jitted steps of each stage (False: joint or Medusa-1, True: the
  heads-only stage), the data and the checkpoints."""
  config: Any
  cfg: model_lib.ModelConfig
  hcfg: heads_lib.HeadsConfig
  sc: StepConfig
  split: optim.Split
  placement: Any
  frozen: dict
  teacher: Any
  trains_base: bool
  feed: train_data.Feed
  train_fns: dict
  eval_fns: dict
  ckpts: ckpt_lib.TrainCheckpoints

  def heads_only(self, step: int) -> bool:
    """Whether the 0-based ``step`` belongs to Medusa-2's heads-only stage."""
    return self.trains_base and step < self.config.train.heads_only_steps


def _setup(config, workdir: str) -> tuple[_Run, TrainState]:
  """Loads the model, heads and data, splits and places the params; (the run, a fresh state)."""
  tc = config.train
  sharding.maybe_initialize_distributed(config)
  # heads_dir (optional): start from heads in the original release's format or from an export's.
  heads_dir = config.get("heads_dir", None) or None
  loaded = runtime.load(config, heads=heads_dir)
  cfg, hcfg, params = loaded.cfg, loaded.heads, loaded.params
  train_src, heldout_src = train_data.sources(config, loaded.tokenizer)
  if tc.get("epochs", 0):
    tc.steps = train_data.steps_for_epochs(config, train_src)
  if hcfg.draft_vocab and heads_dir is None:  # heads loaded from an export keep their own vocabulary
    counts = train_data.target_counts(train_src, cfg.vocab_size)
    params["medusa"]["vocab_ids"] = heads_lib.draft_vocab_from_counts(hcfg, counts)
  params = with_adapters(config, cfg, params)
  split = optim.split_for_training(tc, params)
  placement = sharding.TrainPlacement(config, sharding.make_mesh(config), cfg, hcfg, split.tparams, split.frozen)
  placement.check_batch(tc.batch_size)
  sc = dataclasses.replace(step_config(config, cfg, hcfg), rows=placement.rows)
  tparams, frozen = placement.put(split.tparams, split.frozen)
  # The KL backbone loss's teacher: the original backbone, copied and frozen.
  teacher = placement.put_frozen_like(jax.tree.map(jnp.copy, params["base"])) if needs_teacher_copy(sc) else None
  trains_base = any(g is not None for p, g in split.label_map.items() if p.startswith(("base/", "lora/")))
  caches = train_data.hidden_caches(config, cfg, params["base"], train_src, heldout_src,
                                    not trains_base and sc.lm_weight == 0)
  stages = {False: sc, True: dataclasses.replace(sc, heads_only=True)}
  train_fns = {k: jit_train_step(s, split.tx, placement, teacher is not None, caches is not None)
               for k, s in stages.items()}
  eval_fns = {k: jax.jit(functools.partial(eval_step, s)) for k, s in stages.items()}
  ckpts = ckpt_lib.TrainCheckpoints(workdir, every=tc.checkpoint_every, keep=tc.keep_checkpoints, meta={
      "cfg": cfg, "trainable": [[rx, g] for rx, g in tc.trainable], "heads": dataclasses.asdict(hcfg),
      "model": config.model})
  feed = train_data.Feed(config, placement, {"train": train_src, "heldout": heldout_src}, caches)
  run = _Run(config, cfg, hcfg, sc, split, placement, frozen, teacher, trains_base, feed, train_fns, eval_fns, ckpts)
  return run, optim.init_state(split.tx, placement, tparams)


def _resume(run: _Run, state: TrainState, it) -> tuple[TrainState, int]:
  """The newest readable checkpoint's state and data position, if there is one: (state, its step)."""
  restored = run.ckpts.restore_latest({"params": state.params, "opt_state": state.opt_state})
  if restored is None:
    return state, 0
  latest, saved, data_state = restored
  if data_state:
    it.set_state(data_state)
  train_log.say(f"Resumed from step {latest} in {run.ckpts.dir}")
  return TrainState(step=optim.global_step(latest, run.placement.replicated), params=saved["params"],
                    opt_state=saved["opt_state"]), latest


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def _evaluate(run: _Run, state: TrainState, done: int) -> dict:
  """Mean metrics over ``eval_batches`` held-out batches after ``done`` steps, under the objective
  of the stage whose step just ran (the one the train metrics logged at ``done`` report)."""
  tc = run.config.train
  if run.feed.splits["heldout"] is None or not tc.eval_batches:
    return {}
  fn = run.eval_fns[run.heads_only(done - 1)]
  acc, n = {}, 0
  for i, b in enumerate(run.feed.loader("heldout", seed=0, shuffle=False, num_epochs=1)):
    if i >= tc.eval_batches:
      break
    m = fn(state.params, run.frozen, run.feed.put(b, "heldout"), jnp.asarray(done), run.teacher)
    for k, v in m.items():
      acc[k] = acc.get(k, 0.0) + float(v)
    n += 1
  return {k: v / max(n, 1) for k, v in acc.items()}


def _train_metrics(run: _Run, metrics: dict, step: int, skipped: int, steps_per_s: float) -> dict:
  """A log step's metrics as floats, with the learning rates the optimizer applied at ``step``."""
  out = {k: float(v) for k, v in metrics.items() if k != "skipped"}
  out["skipped_steps"] = skipped  # since the previous log line
  groups = set(run.split.label_map.values())
  out.update({f"lr/{g}": float(s(step)) for g, s in run.split.schedules.items() if g in groups})
  out["steps_per_s"] = steps_per_s
  return out


def _export(run: _Run, state: TrainState, workdir: str) -> None:
  params = export_params(run.sc, optim.merge(run.frozen, state.params))
  path = os.path.join(workdir, "export")
  ckpt_lib.save_export(path, run.cfg, run.hcfg, params, include_base=run.trains_base, model=run.config.model)
  train_log.say(f"Exported params for decoding to {path}")


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
  tc = config.train
  run, state = _setup(config, workdir)
  it = iter(run.feed.loader("train", seed=config.seed))
  state, start = _resume(run, state, it)
  writer = train_log.Writer(workdir)
  end = tc.steps if stop_after is None else min(tc.steps, start + stop_after)
  bar = tqdm(range(start, end), initial=start, total=tc.steps, desc="train", unit="step",
             disable=jax.process_index() != 0)
  nonfinite = train_log.NonFiniteSteps(int(tc.max_nonfinite_steps))
  last_train, last_eval, done, stopped = {}, {}, start, None
  position = it.get_state()  # of the next batch; a checkpoint saves the one after its step's batch
  t0 = time.perf_counter()
  try:
    with preemption_lib.TrainStop(run.ckpts.reached_preemption, jax.process_count()) as stop:
      for step in bar:
        state, metrics = run.train_fns[run.heads_only(step)](state, run.frozen, run.feed.put(next(it), "train"),
                                                             run.teacher)
        done = step + 1
        nonfinite.add(done, position, metrics)
        position = it.get_state()
        # Every host asks at every step (JAX's preemption sync point needs it); all get the same answer.
        stopped = stop.reached(done)
        save = stopped is not None or done == tc.steps or run.ckpts.should_save(done)
        log = done % tc.log_every == 0 or done == end or stopped is not None
        if log or save:
          skipped = nonfinite.check(run.ckpts.latest_step)
        if log:
          last_train = _train_metrics(run, metrics, step, skipped, (done - start) / (time.perf_counter() - t0))
          writer.write(done, last_train)
          bar.set_postfix_str(train_log.summary(last_train, ("loss", "head1/top1")))
          train_log.say(f"step {done}: {train_log.summary(last_train)}")
        # A stopping host saves first: the time between SIGTERM and the end of the VM is short.
        if stopped is None and tc.eval_every and (done % tc.eval_every == 0 or done == tc.steps):
          last_eval = _evaluate(run, state, done)
          if last_eval:
            writer.write(done, last_eval, "eval")
            train_log.say(f"eval step {done}: {train_log.summary(last_eval)}")
        if save:
          run.ckpts.save(done, {"params": state.params, "opt_state": state.opt_state}, position, force=True)
        if stopped is not None:
          train_log.say(f"Stopped by {stopped} after step {done}: saved its checkpoint (train state and data "
                        f"position) in {run.ckpts.dir}. Run the same command again to resume.")
          break
    if stopped is None and done == tc.steps:
      _export(run, state, workdir)
  finally:
    bar.close()
    run.ckpts.close()
    writer.close()
  return {"train": last_train, "eval": last_eval, "step": done, "stopped": stopped,
          "skipped_steps": nonfinite.total}
