"""Tests of training (medusa_jax/trainer.py, loss.py, checkpoint.py) on the 2-layer 'random-tiny' model.

One uninterrupted Medusa-1 run (``run_a``, in conftest.py: ``configs/smollm2_medusa1.py:tiny`` on
64 ShareGPT conversations, a 256-token draft vocabulary, metrics every step) is shared by the tests
of the loss going down, the export and its loading in the benchmark, the draft vocabulary and the
checkpoint errors; a second run of the same config is killed and resumed and must reproduce it exactly. The
loss definition is pinned by a NumPy computation of one step; Medusa-1's frozen backbone by the
trainer's own partition / step / merge functions, Medusa-2's heads-only stage by the backbone in
the checkpoints of a short (killed and resumed) Medusa-2 run.

Run time: about a minute of CPU on 2 cores (most of it XLA compiling the steps and decoders).
"""

import dataclasses
import functools
import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from medusa_jax import benchmark
from medusa_jax import checkpoint as ckpt_lib
from medusa_jax import convert
from medusa_jax import data as data_lib
from medusa_jax import loader as loader_lib
from medusa_jax import heads as heads_lib
from medusa_jax import lora as lora_lib
from medusa_jax import loss as loss_lib
from medusa_jax import model as model_lib
from medusa_jax import optim
from medusa_jax import runtime
from medusa_jax import train_data
from medusa_jax import trainer

# The shared tiny run and its helpers (conftest.py): tests/test_faults.py interrupts the same run.
from conftest import (DRAFT_VOCAB, TRAIN_STEPS, load_config, tb_scalars, tiny_train_parts, train_config,
                      without_timing)

KILL_AFTER = 6    # the killed run stops here; its newest checkpoint is step 4 (checkpoint_every=4)


@pytest.fixture(scope="module")
def killed_run(data_dir, tmp_path_factory):
  """The same command killed after KILL_AFTER steps: (workdir, an untouched copy of it)."""
  c = train_config(data_dir)
  workdir = str(tmp_path_factory.mktemp("run_b") / "wd")
  out = trainer.train_and_evaluate(c, workdir, stop_after=KILL_AFTER)
  assert out["step"] == KILL_AFTER
  copy = str(tmp_path_factory.mktemp("run_b_copy") / "wd")
  shutil.copytree(workdir, copy)
  return workdir, copy


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------

def _np_heads_ce(hcfg, cfg, base, medusa, hidden, batch, m):
  """NumPy: head m's (1-based) masked mean CE and top-1 accuracy on its targets t+m+1."""
  x = hidden.astype(np.float64)
  if hcfg.next_token_input:  # + the next token's embedding, projected by the head's own matrix
    tok = np.asarray(batch["tokens"])
    nxt = np.concatenate([tok[:, 1:], np.zeros_like(tok[:, :1])], axis=1)
    x = x + np.asarray(base["embed"], np.float64)[nxt] @ np.asarray(medusa["tok_w"][m - 1], np.float64)
  w, b = np.asarray(medusa["w"], np.float64), np.asarray(medusa["b"], np.float64)
  for j in range(hcfg.num_layers):
    y = x @ w[m - 1, j] + b[m - 1, j]
    x = x + y / (1.0 + np.exp(-y))
  lm = (np.asarray(base["embed"], np.float64).T if cfg.tie_embeddings else np.asarray(base["lm_head"], np.float64))
  if not hcfg.shared_lm_head:
    lm = np.asarray(medusa["lm_head"][m - 1], np.float64)
  ids = np.asarray(medusa["vocab_ids"]) if hcfg.draft_vocab else np.arange(cfg.vocab_size)
  return _np_ce(x @ lm[:, ids], ids, batch, m + 1)


def _np_ce(logits_BxLxV, ids_V, batch, shift):
  """Mean CE over positions t whose target t+shift is an assistant token of t's segment and, for a
  draft vocabulary ``ids_V``, one of its tokens; top-1 over all those targets, one outside the draft
  vocabulary counted as a miss (no head can propose it)."""
  tok, mask, seg = (np.asarray(batch[k]) for k in ("tokens", "loss_mask", "segment_ids"))
  where = {int(v): i for i, v in enumerate(ids_V)}
  ces, hits = [], []
  for bi in range(tok.shape[0]):
    for t in range(tok.shape[1] - shift):
      tgt = int(tok[bi, t + shift])
      if not (mask[bi, t + shift] and seg[bi, t] > 0 and seg[bi, t + shift] == seg[bi, t]):
        continue
      if tgt not in where:
        hits.append(False)
        continue
      row = logits_BxLxV[bi, t]
      mx = row.max()
      ces.append(mx + np.log(np.exp(row - mx).sum()) - row[where[tgt]])
      hits.append(row.argmax() == where[tgt])
  assert ces, "the golden batch must have targets for every shift"
  return float(np.mean(ces)), float(np.mean(hits))


def _golden_batch(vocab_ids=None):
  """Two rows, the first packed with two conversations, the second padded; loss masks with gaps."""
  rng = np.random.default_rng(0)
  L = 24
  seg = np.array([[1] * 13 + [2] * 9 + [0] * 2, [1] * 20 + [0] * 4], np.int32)
  pos = np.where(seg > 0, np.concatenate([np.arange(13), np.arange(9), [0, 0]])[None].repeat(2, 0), 0)
  pos[1] = np.where(seg[1] > 0, np.arange(L), 0)
  mask = ((rng.random((2, L)) < 0.7) & (seg > 0)).astype(np.int32)
  pool = np.arange(3, 49152) if vocab_ids is None else np.asarray(vocab_ids)
  tok = rng.choice(pool, size=(2, L)).astype(np.int32)
  if vocab_ids is not None:  # some targets outside the draft vocabulary
    tok[:, ::5] = rng.integers(3, 49152, size=tok[:, ::5].shape)
  tok[seg == 0] = 0
  return {"tokens": tok, "loss_mask": mask, "segment_ids": seg, "positions": pos.astype(np.int32)}


@pytest.mark.parametrize("recipe", ["medusa1", "lm_ce_own_lm_heads_draft_vocab", "next_token_input"])
def test_one_step_metrics_match_numpy(recipe):
  """The first step's loss is λ0 Σ_k 0.8^k CE_k (+ the backbone's CE), computed here in NumPy.

  The second case has Medusa-2's loss (λ0 = 0.2 and the backbone's next-token CE), heads with their
  own LM projections and a draft vocabulary; the backbone stays frozen there only to keep the step
  cheap to compile (what trains does not change the loss).
  """
  c = load_config("smollm2_medusa1")
  c.heads.update(dict(num_heads=3, num_layers=2, draft_vocab=0))
  if recipe == "next_token_input":
    c.heads.update(dict(next_token_input=True, draft_vocab=512))
  elif recipe != "medusa1":
    c.heads.update(dict(shared_lm_head=False, draft_vocab=512))
    c.train.update(dict(lm_weight=1.0, lm_loss="ce", lambda0=0.2, lambda0_schedule="constant"))
  cfg, base, _ = convert.load_model(c.model)
  hcfg = heads_lib.config_from(c)
  base = jax.tree.map(jnp.asarray, base)
  medusa = runtime.random_heads(hcfg, cfg, base, seed=1, scale=0.3)
  if hcfg.draft_vocab:
    medusa["vocab_ids"] = jnp.asarray(np.sort(np.random.default_rng(2).choice(
        np.arange(3, cfg.vocab_size), hcfg.draft_vocab, replace=False)).astype(np.int32))
  if hcfg.next_token_input:
    medusa["tok_w"] = 0.05 * jax.random.normal(jax.random.PRNGKey(4), medusa["tok_w"].shape)
  if not hcfg.shared_lm_head:  # the heads' own LM projections, not copies of the backbone's
    medusa["lm_head"] = medusa["lm_head"] + 0.05 * jax.random.normal(jax.random.PRNGKey(3), medusa["lm_head"].shape)
  params = {"base": base, "medusa": medusa}
  batch = _golden_batch(medusa.get("vocab_ids"))

  split = optim.split_for_training(c.train, params)
  tparams, frozen, tx = split.tparams, split.frozen, split.tx
  sc = trainer.step_config(c, cfg, hcfg)
  _, metrics = jax.jit(functools.partial(trainer.train_step, sc, tx))(
      _state(tx, tparams), frozen, {k: jnp.asarray(v) for k, v in batch.items()})

  _, hidden, _ = model_lib.forward(cfg, base, batch["tokens"], batch["positions"],
                                   model_lib.segment_causal_mask(jnp.asarray(batch["segment_ids"])), None,
                                   logits=False)
  hidden = np.asarray(hidden, np.float64)
  heads_loss = 0.0
  for m in range(1, hcfg.num_heads + 1):
    ce, top1 = _np_heads_ce(hcfg, cfg, base, medusa, hidden, batch, m)
    np.testing.assert_allclose(metrics[f"head{m}/loss"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics[f"head{m}/top1"], top1, rtol=1e-6)
    heads_loss += 0.8 ** m * ce
  np.testing.assert_allclose(metrics["heads_loss"], heads_loss, rtol=1e-5)
  expected = c.train.lambda0 * heads_loss
  if c.train.lm_weight:
    lm_ce, lm_top1 = _np_ce(hidden @ np.asarray(base["embed"], np.float64).T, np.arange(cfg.vocab_size), batch, 1)
    np.testing.assert_allclose(metrics["lm/loss"], lm_ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["lm/top1"], lm_top1, rtol=1e-6)
    expected += c.train.lm_weight * lm_ce
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)


def test_tiny_run_lowers_the_heads_loss(run_a):
  _, _, out, scalars = run_a
  assert out["step"] == TRAIN_STEPS
  assert sorted(s for t, s in scalars if t == "train/loss") == list(range(1, TRAIN_STEPS + 1))
  # Held-out loss, on the same batch at every step: after the first step vs at the end.
  first, last = scalars[("eval/heads_loss", 1)], scalars[("eval/heads_loss", TRAIN_STEPS)]
  assert last < first - 0.3, (first, last)
  assert out["eval"]["heads_loss"] == pytest.approx(last, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Medusa-1 vs Medusa-2: what trains
# ----------------------------------------------------------------------------------------------

def _same(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def _state(tx, tparams) -> optim.TrainState:
  return optim.TrainState(step=jnp.asarray(0), params=tparams, opt_state=tx.init(tparams))


def test_medusa1_leaves_the_backbone_bit_identical(data_dir, run_a):
  """The trainer's own labels -> partition -> train_step x 3 -> merge on a batch of the data."""
  c, _, _, params, split, sc = tiny_train_parts(data_dir)
  assert all(g is None for p, g in split.label_map.items() if p.startswith("base/"))
  tparams, frozen, tx = split.tparams, split.frozen, split.tx
  assert set(tparams) == {"medusa"} and "vocab_ids" not in tparams["medusa"]
  step_fn = jax.jit(functools.partial(trainer.train_step, sc, tx))
  src = data_lib.load_split(data_dir, train_data.dataset_name(c), "train")
  batch = next(loader_lib.make_loader(src, batch_size=2, seq_len=c.train.seq_len, seed=0))
  batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "id"}
  before = jax.tree.map(np.asarray, params)
  state = _state(tx, tparams)
  for _ in range(3):
    state, _ = step_fn(state, frozen, batch)
  after = jax.tree.map(np.asarray, optim.merge(frozen, state.params))
  assert _same(before["base"], after["base"])
  assert np.array_equal(before["medusa"]["vocab_ids"], after["medusa"]["vocab_ids"])
  assert not np.array_equal(before["medusa"]["w"], after["medusa"]["w"])
  # End to end: the export holds only the heads.
  with open(os.path.join(run_a[1], "export", "export_meta.json")) as f:
    assert json.load(f)["includes_base"] is False


def _medusa2_config(data_dir, lora: bool, **train):
  c = train_config(data_dir, "smollm2_medusa2", steps=5, eval_every=0, checkpoint_every=1, keep_checkpoints=10,
                   **train)
  if not lora:  # configs/smollm2_medusa2.py:full_backbone
    c.train.trainable = (("medusa/vocab_ids", None), ("medusa/.*", "heads"), ("base/.*", "backbone"))
    c.train.lora.rank = 0
  return c


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full_backbone"])
def test_medusa2_stages(data_dir, run_a, tmp_path, lora):
  """Medusa-2 through train_and_evaluate, killed after 3 steps and resumed: the backbone (its LoRA
  adapters, or every weight) is untouched through the 2 heads-only steps and trained after them;
  lambda0 ramps from 0 at the first joint step; the export holds the backbone decoding runs on
  (adapters merged); and the resumed run's losses are an uninterrupted run's."""
  c = _medusa2_config(data_dir, lora)
  heads_only = c.train.heads_only_steps
  assert heads_only == 2 and c.train.lambda0_ramp_steps == 2 and c.train.lambda0 == 0.01
  workdir = str(tmp_path / "wd")
  assert trainer.train_and_evaluate(c, workdir, stop_after=3)["step"] == 3
  out = trainer.train_and_evaluate(c, workdir)
  assert out["step"] == 5 and np.isfinite(out["train"]["loss"])

  _, original, _ = convert.load_model(c.model)
  saved = {s: jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(s), "state"))["params"]) for s in (1, heads_only, 5)}
  assert not np.array_equal(saved[1]["medusa"]["w"], saved[heads_only]["medusa"]["w"])
  if lora:
    assert "base" not in saved[5]  # frozen under the adapters: never saved, never changed
    for s in (1, heads_only):
      assert not any(np.any(ad["b"]) for mats in saved[s]["lora"].values() for ad in mats.values()), s
    assert all(np.any(ad["b"]) for mats in saved[5]["lora"].values() for ad in mats.values())
    from medusa_jax import lora as lora_lib  # pylint: disable=g-import-not-at-top
    trained = lora_lib.merge(lora_lib.config_from(c), jax.tree.map(jnp.asarray, original), saved[5]["lora"],
                             dtype=jnp.float32)
  else:
    for s in (1, heads_only):
      assert _same(saved[s]["base"], original), f"the backbone changed in heads-only step {s}"
    unchanged = jax.tree.map(np.array_equal, saved[5]["base"], original)
    assert not any(jax.tree.leaves(unchanged)), f"every backbone tensor must train: {unchanged}"
    trained = saved[5]["base"]

  export = os.path.join(workdir, "export")
  with open(os.path.join(export, "export_meta.json")) as f:
    assert json.load(f)["includes_base"] is True
  loaded = runtime.load(c, checkpoint=export)
  assert _same(jax.tree.map(np.asarray, loaded.params["base"]), jax.tree.map(np.asarray, trained))
  # The draft vocabulary comes from the same data as run A's and is not trained.
  pa, _ = ckpt_lib.load_export(os.path.join(run_a[1], "export"), loaded.cfg, original)
  assert np.array_equal(loaded.params["medusa"]["vocab_ids"], pa["medusa"]["vocab_ids"])

  # lambda0: 1 (the heads loss alone) in the heads-only stage, then 0.01 sin(pi/2 min(1, s/2)) with s
  # counted from the first joint step; the KL to the original backbone is 0 until the backbone moves
  # (to rounding: with LoRA the student runs W + A B with B = 0, a different XLA program).
  killed, resumed = tb_scalars(workdir)
  logged = {**killed, **resumed}
  lam = [logged[("train/lambda0", n)] for n in range(1, 6)]
  np.testing.assert_allclose(lam, [1.0, 1.0, 0.0, 0.01 * np.sin(np.pi / 4), 0.01], rtol=1e-6)
  assert abs(logged[("train/lm/kl", 3)]) < 1e-6 and logged[("train/lm/kl", 5)] > 1e-4
  # Resume: the same scalars as one uninterrupted run of the same config (pinned once, with LoRA:
  # the resume path is the same code for both backbones).
  if not lora:
    return
  straight = str(tmp_path / "straight")
  trainer.train_and_evaluate(c, straight)
  (expected,) = tb_scalars(straight)
  assert without_timing(logged) == without_timing(expected)


# A tiny tied model (the embedding is the LM head): the heads read the backbone's weights directly.
TIED = model_lib.ModelConfig(vocab_size=64, dim=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
                             mlp_dim=32, max_seq_len=64, bos_id=None, eos_ids=(), tie_embeddings=True)


def _tiny_batch(L=20):
  rng = np.random.default_rng(0)
  seg = np.array([[1] * 11 + [2] * 7 + [0] * 2, [1] * 17 + [0] * 3], np.int32)
  pos = np.where(seg > 0, np.concatenate([np.arange(11), np.arange(7), [0, 0]])[None].repeat(2, 0), 0)
  pos[1] = np.where(seg[1] > 0, np.arange(L), 0)
  mask = ((rng.random((2, L)) < 0.75) & (seg > 0)).astype(np.int32)
  tok = np.where(seg > 0, rng.integers(0, TIED.vocab_size, (2, L)), 0).astype(np.int32)
  return {k: jnp.asarray(v) for k, v in
          {"tokens": tok, "loss_mask": mask, "segment_ids": seg, "positions": pos.astype(np.int32)}.items()}


@pytest.mark.parametrize("lam", [0.0, 0.2])
def test_medusa2_gradients_are_the_hand_combined_ones(lam):
  """``:full_backbone`` Medusa-2 on a tied model with next-token-input heads (which read the
  embedding for their projection and for the tokens they are fed): the joint stage's backbone gets
  λ0 ∇heads_loss + ∇L_LM through every path, the heads get ∇heads_loss itself, and the heads-only
  stage sends the backbone nothing; λ0 = 0 (where the sine ramp starts) sends it the LM's alone."""
  c = load_config("smollm2_medusa2", "tiny,full_backbone")
  c.train.update(dict(lm_loss="ce", lambda0=lam, lambda0_schedule="constant", heads_only_steps=0, seq_len=20))
  hcfg = heads_lib.HeadsConfig(num_heads=2, num_layers=1, next_token_input=True)
  base = jax.tree.map(lambda x: x * 8.0 if x.ndim > 1 else x, model_lib.init_params(TIED, jax.random.PRNGKey(0)))
  medusa = runtime.random_heads(hcfg, TIED, base, seed=1, scale=0.3)
  medusa["tok_w"] = 0.3 * jax.random.normal(jax.random.PRNGKey(4), medusa["tok_w"].shape)
  split = optim.split_for_training(c.train, {"base": base, "medusa": medusa})
  tparams, frozen = split.tparams, split.frozen
  assert set(tparams) == {"base", "medusa"} and "embed" in tparams["base"]
  sc = trainer.step_config(c, TIED, hcfg)
  batch = _tiny_batch()
  mask = model_lib.segment_causal_mask(batch["segment_ids"])

  def by_hand(which):
    def f(t):
      p = optim.merge(frozen, t)
      _, hidden, _ = model_lib.forward(TIED, p["base"], batch["tokens"], batch["positions"], mask, None, logits=False)
      if which == "heads":
        return loss_lib.heads_loss(hcfg, TIED, p, hidden, batch, sc.head_decay, kind=sc.heads_loss)[0]
      return loss_lib.lm_loss(TIED, p["base"], hidden, batch)[0]
    return jax.grad(f)(tparams)

  def trainer_grads(step_config):
    return jax.grad(lambda t: trainer.loss_fn(step_config, t, frozen, batch, jnp.asarray(0))[0])(tparams)

  g_heads, g_lm = by_hand("heads"), by_hand("lm")
  assert float(jnp.abs(g_heads["base"]["embed"]).max()) > 1e-3  # the heads do reach the embedding

  def close(got, want):
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(want))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale), got, want)

  joint = trainer_grads(sc)
  close(joint["base"], jax.tree.map(lambda h, m: lam * h + c.train.lm_weight * m, g_heads["base"], g_lm["base"]))
  close(joint["medusa"], g_heads["medusa"])
  heads_only = trainer_grads(dataclasses.replace(sc, heads_only=True))
  assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(heads_only["base"]))
  close(heads_only["medusa"], g_heads["medusa"])


def test_lora_heads_only_stage_runs_the_unmerged_backbone():
  """The heads-only stage skips merging the adapters: fresh ones (B = 0) merge to the base weights
  exactly, so the backbone it runs is the merged one."""
  lcfg = lora_lib.LoraConfig(rank=4)
  base = model_lib.init_params(TIED, jax.random.PRNGKey(0))
  params = {"base": base, "lora": lora_lib.init(lcfg, TIED, jax.random.PRNGKey(1))}
  assert _same(lora_lib.merge(lcfg, base, params["lora"]), base)
  sc = trainer.StepConfig(model=TIED, heads=heads_lib.HeadsConfig(1), head_decay=0.8, lm_weight=1.0, lm_loss="ce",
                          lambda0=0.2, lambda0_schedule="constant", lambda0_ramp_steps=0, lora=lcfg)
  assert _same(trainer.backbone(dataclasses.replace(sc, heads_only=True), params), base)


# ----------------------------------------------------------------------------------------------
# The optimizer: schedules, stages, groups
# ----------------------------------------------------------------------------------------------

def _cosine(peak, warm, total, s):
  """optax's warm-up + cosine decay to 0, by hand."""
  if s < warm:
    return peak * s / warm
  return peak * 0.5 * (1 + np.cos(np.pi * min(s - warm, total - warm) / (total - warm)))


def test_learning_rate_schedules_by_hand():
  c = load_config("smollm2_medusa2")
  tc = c.train
  tc.update(dict(steps=100, lr=2e-3, warmup_frac=0.1, warmup_steps=0, heads_only_steps=30, backbone_warmup_steps=10,
                 group_lr_mult=(("heads", 2.0), ("backbone", 0.25), ("extra", 0.5))))
  sched = optim.schedules(tc, tc.steps)
  for s in (0, 5, 10, 31, 64, 99):
    assert float(sched["heads"](s)) == pytest.approx(_cosine(4e-3, 10, 100, s), rel=1e-4, abs=1e-12), s
    assert float(sched["extra"](s)) == pytest.approx(_cosine(1e-3, 10, 100, s), rel=1e-4, abs=1e-12), s
  # The backbone: nothing before step 30, then its own 10-step warm-up and a cosine over 70 steps.
  for s, want in ((0, 0.0), (29, 0.0), (30, 0.0), (35, 5e-4 * 5 / 10), (40, 5e-4), (65, _cosine(5e-4, 10, 70, 35))):
    assert float(sched["backbone"](s)) == pytest.approx(want, rel=1e-4, abs=1e-12), s


def test_backbone_optimizer_state_begins_with_the_joint_stage():
  """The first joint step's backbone update equals a fresh AdamW's first update on the same
  gradient: the heads-only steps before it neither moved the backbone nor advanced its state, and
  a skipped one among them did not delay it (the start is a global step, not an update count)."""
  tc = load_config("smollm2_medusa2").train
  tc.update(dict(steps=50, heads_only_steps=6, backbone_warmup_steps=4))
  labels = {"medusa/w": "heads", "base/x": "backbone"}
  tx, _ = optim.make_optimizer(tc, labels, tc.steps)
  rng = np.random.default_rng(0)
  params = {"medusa": {"w": jnp.ones((3, 4))}, "base": {"x": jnp.ones((5,))}}
  state = tx.init(params)
  # Heads-only steps (the backbone's gradient is zero, being held, or anything); the first is
  # skipped (non-finite: no update at all), which must not delay the backbone's start.
  for step in range(1, tc.heads_only_steps):
    g = {"medusa": {"w": jnp.asarray(rng.normal(size=(3, 4)))}, "base": {"x": jnp.asarray(rng.normal(size=5))}}
    updates, state = tx.update(g, state, params, step=jnp.asarray(step))
    assert not np.any(np.asarray(updates["base"]["x"]))
  fn, start = optim.group_schedules(tc, tc.steps)["backbone"]
  assert start == 6
  fresh = optax.chain(optax.clip_by_global_norm(tc.grad_clip), optax.adamw(fn, b1=tc.b1, b2=tc.b2,
                                                                           weight_decay=tc.weight_decay))
  fresh_state = fresh.init({"x": params["base"]["x"]})
  # Two joint steps with different gradients: the second is where a stale step count would show
  # (bias correction and the warm-up position), and it moves the backbone by about the lr.
  for k in range(2):
    g_bb = jnp.asarray(rng.normal(size=5) * 0.1)
    updates, state = tx.update({"medusa": {"w": jnp.zeros((3, 4))}, "base": {"x": g_bb}}, state, params,
                               step=jnp.asarray(start + k))
    want, fresh_state = fresh.update({"x": g_bb}, fresh_state, {"x": params["base"]["x"]})
    np.testing.assert_allclose(updates["base"]["x"], want["x"], rtol=1e-6, atol=1e-12)
  assert float(fn(1)) > 0 and np.abs(np.asarray(updates["base"]["x"])).max() > 0.3 * float(fn(1))


# ----------------------------------------------------------------------------------------------
# Kill and resume
# ----------------------------------------------------------------------------------------------

def test_killed_and_resumed_run_reproduces_the_uninterrupted_run(data_dir, run_a, killed_run):
  c, workdir_a, out_a, scalars_a = run_a
  workdir, _ = killed_run
  assert not os.path.exists(os.path.join(workdir, "export"))
  assert max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == 4
  out = trainer.train_and_evaluate(train_config(data_dir), workdir)  # the same command again
  assert out["step"] == TRAIN_STEPS
  killed, resumed = tb_scalars(workdir)
  expected = without_timing(scalars_a)
  # Steps 1-6 before the kill, 5-12 after resuming from the step-4 checkpoint: every logged
  # metric (train and eval) equal to the uninterrupted run's, bit for bit (same data, same XLA program).
  assert sorted({s for _, s in killed}) == list(range(1, KILL_AFTER + 1))
  assert sorted({s for _, s in resumed}) == list(range(5, TRAIN_STEPS + 1))
  assert without_timing(killed) == {k: expected[k] for k in without_timing(killed)}
  assert without_timing(resumed) == {k: expected[k] for k in without_timing(resumed)}
  assert without_timing({**killed, **resumed}) == expected
  assert out["eval"] == out_a["eval"]
  cfg, base, _ = convert.load_model(c.model)
  pa, _ = ckpt_lib.load_export(os.path.join(workdir_a, "export"), cfg, base)
  pb, _ = ckpt_lib.load_export(os.path.join(workdir, "export"), cfg, base)
  assert _same(pa, pb)


def _meta(workdir):
  with open(os.path.join(workdir, "run_meta.json")) as f:
    saved = json.load(f)
  cfg, _, _ = convert.load_model("random-tiny")
  return {"cfg": cfg, "trainable": saved["trainable"], "heads": saved["heads"], "model": saved["model"]}


# ----------------------------------------------------------------------------------------------
# Checkpoints and the export
# ----------------------------------------------------------------------------------------------

def test_export_loads_in_the_benchmark_and_greedy_medusa_equals_vanilla(run_a, monkeypatch):
  c, workdir, _, _ = run_a
  c = c.copy_and_resolve_references()
  c.decode.max_new_tokens = 12
  # A relative --checkpoint, as users type it (Orbax itself accepts only absolute paths).
  monkeypatch.chdir(workdir)
  loaded = runtime.load(c, checkpoint="export")
  assert loaded.heads == heads_lib.config_from(c)
  res = benchmark.run(c, prompts=[{"question_id": 1, "text": "hi"}, {"question_id": 2, "text": "Name a color."}],
                      modes=["vanilla", "medusa"], loaded=loaded, compare_original=True)
  # Medusa-1 leaves the backbone alone: decoding with the original one gives the same outputs.
  drift = res["backbone_drift"]
  assert drift["identical_fraction"] == 1.0 and drift["shared_prefix_tokens"] == [12, 12]
  assert benchmark.shared_prefix([1, 2, 3, 4], [1, 2, 5]) == 2 and benchmark.shared_prefix([1, 2], [1, 2, 3]) == 2
  van, med = res["modes"]["vanilla"], res["modes"]["medusa"]
  assert [r["tokens"] for r in med["per_prompt"]] == [r["tokens"] for r in van["per_prompt"]]
  assert all(len(r["tokens"]) == 12 for r in van["per_prompt"])
  assert med["identical_fraction"] == 1.0 and med["divergences"] == []


def test_draft_vocab_is_the_most_frequent_targets_and_is_not_trained(data_dir, run_a):
  c, workdir, _, _ = run_a
  cfg, base, _ = convert.load_model(c.model)
  params, hcfg = ckpt_lib.load_export(os.path.join(workdir, "export"), cfg, base)
  ids = np.asarray(params["medusa"]["vocab_ids"])
  assert hcfg.draft_vocab == DRAFT_VOCAB and ids.shape == (DRAFT_VOCAB,)
  assert np.all(np.diff(ids) > 0)
  # Counted independently: assistant tokens of the train split (not the held-out one).
  counts = np.zeros(cfg.vocab_size, np.int64)
  for ex in data_lib.load_split(data_dir, train_data.dataset_name(c), "train"):
    np.add.at(counts, np.asarray(ex["tokens"])[np.asarray(ex["loss_mask"]) > 0], 1)
  inside = np.zeros(cfg.vocab_size, bool)
  inside[ids] = True
  assert counts[inside].min() >= counts[~inside].max()
  # Ties at the boundary go to the smaller id.
  ranked = sorted(range(cfg.vocab_size), key=lambda i: (-counts[i], i))
  assert set(ids.tolist()) == set(ranked[:DRAFT_VOCAB])


def test_export_of_another_model_is_a_clear_error(run_a, tmp_path):
  c, workdir, _, _ = run_a
  cfg, _, _ = convert.load_model(c.model)
  other = cfg.replace(dim=32, head_dim=8, mlp_dim=64)
  rng = np.random.default_rng(0)
  convert.save_hf(str(tmp_path / "other"), other, jax.tree.map(
      lambda a: rng.normal(0, 0.02, a.shape).astype(np.float32),
      jax.eval_shape(functools.partial(model_lib.init_params, other), jax.random.PRNGKey(0))))
  c = c.copy_and_resolve_references()
  c.model = str(tmp_path / "other")
  with pytest.raises(ckpt_lib.CheckpointError, match=r"another model \(.*dim: saved 64 vs now 32"):
    runtime.load(c, checkpoint=os.path.join(workdir, "export"))
  # Resuming training in that run's workdir with the other model.
  with pytest.raises(ckpt_lib.CheckpointError, match=r"The run in .* another model .*dim: saved 64 vs now 32"):
    ckpt_lib.TrainCheckpoints(workdir, every=4, keep=3, meta={**_meta(workdir), "cfg": other})


# Orbax's failed restore leaves tensorstore callbacks aimed at an asyncio loop it has closed.
@pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate_arrays", "drop_data_position"])
def test_partial_checkpoint_is_a_clear_error_on_resume(data_dir, killed_run, tmp_path, damage):
  _, pristine = killed_run
  workdir = str(tmp_path / "wd")
  shutil.copytree(pristine, workdir)
  newest = os.path.join(workdir, "checkpoints", "4")
  if damage == "truncate_arrays":
    files = glob.glob(os.path.join(newest, "state", "d", "*"))
    assert files
    for path in files:
      with open(path, "r+b") as f:
        f.truncate(16)
  else:
    os.remove(os.path.join(newest, "data", "metadata"))
  for step in os.listdir(os.path.join(workdir, "checkpoints")):
    if step != "4":  # none left to fall back to (tests/test_checkpoint.py tests the fallback)
      shutil.rmtree(os.path.join(workdir, "checkpoints", step))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"(?s)Checkpoint step 4 in .* cannot be restored.*delete .*4"):
    trainer.train_and_evaluate(train_config(data_dir), workdir)


def test_workdir_of_another_trainable_config_is_refused(data_dir, run_a, tmp_path):
  workdir = str(tmp_path / "wd")
  shutil.copytree(run_a[1], workdir)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"trained .*medusa/\.\*.*; this config trains .*backbone.*"
                                                    r"fresh --workdir"):
    trainer.train_and_evaluate(train_config(data_dir, "smollm2_medusa2"), workdir)


# ----------------------------------------------------------------------------------------------
# Medusa-1 on cached hidden states
# ----------------------------------------------------------------------------------------------

def test_cached_hidden_states_train_as_the_forward_does(data_dir, run_a, tmp_path):
  """config.train.cache_hidden: the same run as run A (the backbone's forward every step), to float
  rounding: hidden states of an example alone equal its segment's in a packed row. The cache is
  built once per split and read back by the next run."""
  from medusa_jax import hidden_cache  # pylint: disable=g-import-not-at-top
  # 30 steps of 2 rows: past the end of the first epoch (51 examples), where a repeated dataset's
  # indices run on (run A, the reference, has the first 12 of them).
  c = train_config(data_dir, cache_hidden=True, cache_dtype="float32", steps=30)
  out = trainer.train_and_evaluate(c, str(tmp_path / "a"))
  assert out["step"] == 30
  # Train and heldout, each a directory of shards named by this backbone's fingerprint (other tests
  # that share data_dir may have cached other backbones' states beside them).
  cfg, base, _ = convert.load_model(c.model)
  dirs = {split: hidden_cache.cache_dir(cfg, base, data_dir, train_data.dataset_name(c), split, c.train.seq_len,
                                        "float32") for split in ("train", "heldout")}
  files = sorted(glob.glob(os.path.join(dirs["train"], "*.npy")) + glob.glob(os.path.join(dirs["heldout"], "*.npy")))
  assert files and all(os.listdir(d) for d in dirs.values()), dirs
  (got,) = tb_scalars(str(tmp_path / "a"))
  _, _, _, want = run_a
  for key in (("train/loss", 1), ("train/loss", 2), ("train/grad_norm", 1), ("eval/heads_loss", 1)):
    assert got[key] == pytest.approx(want[key], rel=2e-5), key
  # The cached states are the forward's, example by example.
  src = data_lib.load_split(data_dir, train_data.dataset_name(c), "train")
  cache = hidden_cache.for_split(cfg, base, src, c.train.seq_len, data_dir, train_data.dataset_name(c), "train",
                                 dtype="float32")
  for i in (0, 7):
    toks = np.asarray(src[i]["tokens"][:c.train.seq_len])[None]
    L = toks.shape[1]
    _, h, _ = model_lib.forward(cfg, base, toks, np.arange(L)[None], model_lib.causal_mask(jnp.array([L]), L),
                                logits=False)
    np.testing.assert_allclose(cache.gather(np.arange(cache.offsets[i], cache.offsets[i + 1])), h[0], atol=2e-5)
  # A second run reads the files instead of building them again.
  mtimes = [os.path.getmtime(f) for f in files]
  trainer.train_and_evaluate(train_config(data_dir, steps=1, cache_hidden=True, cache_dtype="float32"),
                             str(tmp_path / "b"))
  assert [os.path.getmtime(f) for f in files] == mtimes


def test_cached_hidden_states_refuse_a_training_backbone(data_dir, tmp_path):
  c = train_config(data_dir, "smollm2_medusa2", steps=1, cache_hidden=True)
  with pytest.raises(ValueError, match="cache_hidden needs a frozen backbone"):
    trainer.train_and_evaluate(c, str(tmp_path / "wd"))
