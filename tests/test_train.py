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

import functools
import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from medusa_jax import benchmark
from medusa_jax import checkpoint as ckpt_lib
from medusa_jax import config as config_lib
from medusa_jax import convert
from medusa_jax import data as data_lib
from medusa_jax import model as model_lib
from medusa_jax import runtime
from medusa_jax import trainer

# The shared tiny run and its helpers (conftest.py): tests/test_faults.py interrupts the same run.
from conftest import DRAFT_VOCAB, TRAIN_STEPS, load_config, tb_scalars, train_config, without_timing

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
  hcfg = config_lib.heads_config(c)
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

  label_map = trainer.labels(params, c.train.trainable)
  tparams, frozen = trainer.partition(params, label_map)
  tx, _ = trainer.make_optimizer(c.train, {k: v for k, v in label_map.items() if v is not None}, c.train.steps)
  sc = trainer.step_config(c, cfg, hcfg)
  _, _, metrics = jax.jit(lambda t, o, f, b: trainer.train_step(sc, tx, t, o, f, b, jnp.asarray(0)))(
      tparams, tx.init(tparams), frozen, {k: jnp.asarray(v) for k, v in batch.items()})

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


def test_medusa1_leaves_the_backbone_bit_identical(data_dir, run_a):
  """The trainer's own labels -> partition -> train_step x 3 -> merge on a batch of the data."""
  c = train_config(data_dir)
  cfg, base, _ = convert.load_model(c.model)
  hcfg = config_lib.heads_config(c)
  base = jax.tree.map(jnp.asarray, base)
  params = {"base": base, "medusa": runtime.random_heads(hcfg, cfg, base)}
  label_map = trainer.labels(params, c.train.trainable)
  assert all(g is None for p, g in label_map.items() if p.startswith("base/"))
  tparams, frozen = trainer.partition(params, label_map)
  assert set(tparams) == {"medusa"} and "vocab_ids" not in tparams["medusa"]
  tx, _ = trainer.make_optimizer(c.train, {k: v for k, v in label_map.items() if v is not None}, c.train.steps)
  sc = trainer.step_config(c, cfg, hcfg)
  step_fn = jax.jit(lambda t, o, f, b, s: trainer.train_step(sc, tx, t, o, f, b, s))
  src = data_lib.load_split(data_dir, trainer.dataset_name(c), "train")
  batch = next(data_lib.make_loader(src, batch_size=2, seq_len=c.train.seq_len, seed=0))
  batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "id"}
  before = jax.tree.map(np.asarray, params)
  opt_state = tx.init(tparams)
  for step in range(3):
    tparams, opt_state, _ = step_fn(tparams, opt_state, frozen, batch, jnp.asarray(step))
  after = jax.tree.map(np.asarray, trainer.merge(frozen, tparams))
  assert _same(before["base"], after["base"])
  assert np.array_equal(before["medusa"]["vocab_ids"], after["medusa"]["vocab_ids"])
  assert not np.array_equal(before["medusa"]["w"], after["medusa"]["w"])
  # End to end: the export holds only the heads.
  with open(os.path.join(run_a[1], "export", "export_meta.json")) as f:
    assert json.load(f)["includes_base"] is False


def test_medusa2_trains_the_backbone_after_the_heads_only_stage(data_dir, run_a, tmp_path):
  """Medusa-2 through train_and_evaluate, killed and resumed (its optimizer state has one masked
  state per group). Its checkpoints hold the backbone: unchanged through the heads-only stage,
  trained after it; the export holds the trained backbone, and decoding loads it from there."""
  c = train_config(data_dir, "smollm2_medusa2", steps=5, eval_every=0, checkpoint_every=1, keep_checkpoints=10)
  heads_only = c.train.heads_only_steps
  assert heads_only == 2
  workdir = str(tmp_path / "wd")
  assert trainer.train_and_evaluate(c, workdir, stop_after=3)["step"] == 3
  out = trainer.train_and_evaluate(c, workdir)
  assert out["step"] == 5 and np.isfinite(out["train"]["loss"]) and out["train"]["lm/kl"] >= -1e-6

  _, original, _ = convert.load_model(c.model)
  saved = {s: jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(s), "state"))["params"]) for s in (1, heads_only, 5)}
  for s in (1, heads_only):
    assert _same(saved[s]["base"], original), f"the backbone changed in heads-only step {s}"
  assert not np.array_equal(saved[1]["medusa"]["w"], saved[heads_only]["medusa"]["w"])
  unchanged = jax.tree.map(np.array_equal, saved[5]["base"], original)
  assert not any(jax.tree.leaves(unchanged)), f"every backbone tensor must train: {unchanged}"

  export = os.path.join(workdir, "export")
  with open(os.path.join(export, "export_meta.json")) as f:
    assert json.load(f)["includes_base"] is True
  loaded = runtime.load(c, checkpoint=export)
  assert _same(jax.tree.map(np.asarray, loaded.params["base"]), saved[5]["base"])
  # The draft vocabulary comes from the same data as run A's and is not trained.
  pa, _ = ckpt_lib.load_export(os.path.join(run_a[1], "export"), loaded.cfg, original)
  assert np.array_equal(loaded.params["medusa"]["vocab_ids"], pa["medusa"]["vocab_ids"])


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
  assert loaded.heads == config_lib.heads_config(c)
  res = benchmark.run(c, prompts=[{"question_id": 1, "text": "hi"}, {"question_id": 2, "text": "Name a color."}],
                      modes=["vanilla", "medusa"], loaded=loaded)
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
  for ex in data_lib.load_split(data_dir, trainer.dataset_name(c), "train"):
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
  with pytest.raises(ckpt_lib.CheckpointError, match=r"(?s)Checkpoint step 4 in .* cannot be restored.*partial"):
    trainer.train_and_evaluate(train_config(data_dir), workdir)


def test_workdir_of_another_trainable_config_is_refused(data_dir, run_a, tmp_path):
  workdir = str(tmp_path / "wd")
  shutil.copytree(run_a[1], workdir)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"trained .*medusa/\.\*.*; this config trains .*backbone.*"
                                                    r"fresh --workdir"):
    trainer.train_and_evaluate(train_config(data_dir, "smollm2_medusa2"), workdir)
