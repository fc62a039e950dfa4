"""The heads' losses (medusa_jax/loss.py: ``heads_loss`` with kind ce / kl / mix) against NumPy.

A tiny untied model with random heads on a hand-made packed batch: every head's CE, KL to the
backbone's own distribution (at the right position, over the draft vocabulary when there is one,
at a temperature), their mix, and the accuracies over *all* targets are recomputed here in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax import heads as heads_lib
from medusa_jax import loss as loss_lib
from medusa_jax import model as model_lib
from medusa_jax import runtime
from medusa_jax.heads import HeadsConfig
from medusa_jax.model import ModelConfig

CFG = ModelConfig(vocab_size=64, dim=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32,
                  max_seq_len=64, bos_id=None, eos_ids=(), tie_embeddings=False)
L = 20


def _batch():
  rng = np.random.default_rng(0)
  seg = np.array([[1] * 11 + [2] * 7 + [0] * 2, [1] * 17 + [0] * 3], np.int32)
  pos = np.where(seg > 0, np.concatenate([np.arange(11), np.arange(7), [0, 0]])[None].repeat(2, 0), 0)
  pos[1] = np.where(seg[1] > 0, np.arange(L), 0)
  mask = ((rng.random((2, L)) < 0.75) & (seg > 0)).astype(np.int32)
  tok = np.where(seg > 0, rng.integers(0, CFG.vocab_size, (2, L)), 0).astype(np.int32)
  return {"tokens": tok, "loss_mask": mask, "segment_ids": seg, "positions": pos.astype(np.int32)}


def _setup(hcfg, seed=0):
  base = model_lib.init_params(CFG, jax.random.PRNGKey(seed))
  base = jax.tree.map(lambda x: x * 8.0 if x.ndim > 1 else x, base)  # peaked enough to matter
  med = runtime.random_heads(hcfg, CFG, base, seed=seed + 1, scale=0.4)
  if not hcfg.shared_lm_head:
    med["lm_head"] = med["lm_head"] + 0.3 * jax.random.normal(jax.random.PRNGKey(9), med["lm_head"].shape)
  if hcfg.draft_vocab:
    med["vocab_ids"] = jnp.asarray(np.sort(np.random.default_rng(3).choice(CFG.vocab_size, hcfg.draft_vocab,
                                                                            replace=False)).astype(np.int32))
  params = {"base": base, "medusa": med}
  batch = _batch()
  _, hidden, _ = model_lib.forward(CFG, base, batch["tokens"], batch["positions"],
                                   model_lib.segment_causal_mask(jnp.asarray(batch["segment_ids"])), None,
                                   logits=False)
  return params, batch, hidden


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_head(hcfg, params, hidden, batch, m, temperature):
  """Head m (1-based): (mean CE over in-vocabulary targets, mean KL, top-1 over all targets)."""
  base, med = params["base"], params["medusa"]
  x = np.asarray(hidden, np.float64)
  w, b = np.asarray(med["w"], np.float64), np.asarray(med["b"], np.float64)
  for j in range(hcfg.num_layers):
    y = x @ w[m - 1, j] + b[m - 1, j]
    x = x + y / (1.0 + np.exp(-y))
  backbone_lm = np.asarray(base["lm_head"], np.float64)
  lm = backbone_lm if hcfg.shared_lm_head else np.asarray(med["lm_head"][m - 1], np.float64)
  ids = np.asarray(med["vocab_ids"]) if hcfg.draft_vocab else np.arange(CFG.vocab_size)
  student = _log_softmax(x @ lm[:, ids])
  teacher_all = np.asarray(hidden, np.float64) @ backbone_lm[:, ids] / temperature
  tok, mask, seg = (np.asarray(batch[k]) for k in ("tokens", "loss_mask", "segment_ids"))
  where = {int(v): i for i, v in enumerate(ids)}
  ces, kls, hits = [], [], []
  for bi in range(tok.shape[0]):
    for t in range(L - m - 1):
      tgt = int(tok[bi, t + m + 1])
      if not (mask[bi, t + m + 1] and seg[bi, t] > 0 and seg[bi, t + m + 1] == seg[bi, t]):
        continue
      # The backbone predicts t+m+1 at position t+m: the teacher of head m at t.
      p = _log_softmax(teacher_all[bi, t + m])
      kls.append(np.sum(np.exp(p) * (p - student[bi, t])))
      if tgt in where:
        ces.append(-student[bi, t, where[tgt]])
        hits.append(student[bi, t].argmax() == where[tgt])
      else:
        hits.append(False)
  return float(np.mean(ces)), float(np.mean(kls)), float(np.mean(hits))


@pytest.mark.parametrize("hcfg,kind,temperature", [
    (HeadsConfig(num_heads=3, num_layers=2), "kl", 1.0),
    (HeadsConfig(num_heads=3, num_layers=1, draft_vocab=40), "kl", 2.0),
    (HeadsConfig(num_heads=2, num_layers=1, shared_lm_head=False, draft_vocab=40), "mix", 1.0),
    (HeadsConfig(num_heads=2, num_layers=1, draft_vocab=40), "ce", 1.0),
], ids=["kl", "kl_draft_vocab_T2", "mix_own_lm_heads", "ce_draft_vocab"])
def test_heads_loss_matches_numpy(hcfg, kind, temperature):
  params, batch, hidden = _setup(hcfg)
  total, metrics = loss_lib.heads_loss(hcfg, CFG, params, hidden, {k: jnp.asarray(v) for k, v in batch.items()},
                                       0.8, kind=kind, kl_mix=0.3, kl_temperature=temperature)
  want = 0.0
  for m in range(1, hcfg.num_heads + 1):
    ce, kl, top1 = _np_head(hcfg, params, hidden, batch, m, temperature)
    np.testing.assert_allclose(metrics[f"head{m}/ce"], ce, rtol=2e-5)
    np.testing.assert_allclose(metrics[f"head{m}/top1"], top1, rtol=1e-6)
    loss_m = {"ce": ce, "kl": kl, "mix": 0.7 * ce + 0.3 * kl}[kind]
    if kind != "ce":
      # At T != 1 only the target is softened: a KL from the softened backbone, named for it.
      name = f"head{m}/kl" if temperature == 1.0 else f"head{m}/kl_soft"
      assert {f"head{m}/kl", f"head{m}/kl_soft"} & set(metrics) == {name}
      np.testing.assert_allclose(metrics[name], kl, rtol=2e-5)
      assert kl > 0.05  # not a trivially zero KL: the heads differ from the backbone
    np.testing.assert_allclose(metrics[f"head{m}/loss"], loss_m, rtol=2e-5)
    want += 0.8 ** m * loss_m
  np.testing.assert_allclose(total, want, rtol=2e-5)
  if hcfg.draft_vocab:  # some targets fall outside the draft vocabulary and count as misses
    assert not set(np.asarray(batch["tokens"]).ravel()) <= set(np.asarray(params["medusa"]["vocab_ids"]).tolist())


def _copied_ahead(hidden, batch, m, shift):
  """``hidden`` with h[t] := h[t + shift] (latest t first, so copies chain) at every position t where
  head m (1-based) has a target (t+m+1: an assistant token of t's segment)."""
  h = np.array(hidden)
  tok, mask, seg = (np.asarray(batch[k]) for k in ("tokens", "loss_mask", "segment_ids"))
  for b in range(tok.shape[0]):
    for t in reversed(range(L - m - 1)):
      if mask[b, t + m + 1] and seg[b, t] > 0 and seg[b, t + m + 1] == seg[b, t]:
        h[b, t] = h[b, t + shift]
  return jnp.asarray(h)


def test_kl_is_zero_exactly_when_the_head_predicts_the_teacher():
  """Zero-initialised heads with the shared LM head are the identity: at t, head m predicts what
  the backbone predicts at t. Its teacher is the backbone at t+m, so with h[t] copied from h[t+m] at
  the positions where head m has a target, and only there, its KL is 0; copied from one position
  further, or on the real hidden states, it is not. A teacher at another position, or a mask that
  counts other positions, fails this."""
  hcfg = HeadsConfig(num_heads=2, num_layers=1)
  params, batch, hidden = _setup(hcfg)
  params = {**params, "medusa": heads_lib.init_params(hcfg, CFG)}
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  kl = lambda h, m: float(loss_lib.heads_loss(hcfg, CFG, params, h, jb, 0.8, kind="kl")[1][f"head{m}/kl"])
  for m in (1, 2):
    assert kl(hidden, m) > 0.05, m
    np.testing.assert_allclose(kl(_copied_ahead(hidden, batch, m, m), m), 0.0, atol=1e-6, err_msg=f"head {m}")
    assert kl(_copied_ahead(hidden, batch, m, m + 1), m) > 0.05, m


def test_kl_gradient_reaches_only_the_heads():
  """The teacher is held: with heads that have their own LM heads, the backbone's LM head (used only
  by the teacher) gets exactly zero gradient; the heads get some."""
  hcfg = HeadsConfig(num_heads=2, num_layers=1, shared_lm_head=False)
  params, batch, _ = _setup(hcfg)
  jb = {k: jnp.asarray(v) for k, v in batch.items()}

  def f(p):
    _, hidden, _ = model_lib.forward(CFG, p["base"], jb["tokens"], jb["positions"],
                                     model_lib.segment_causal_mask(jb["segment_ids"]), None, logits=False)
    return loss_lib.heads_loss(hcfg, CFG, p, hidden, jb, 0.8, kind="kl")[0]

  g = jax.grad(f)(params)
  assert float(jnp.abs(g["base"]["lm_head"]).max()) == 0.0
  assert float(jnp.abs(g["medusa"]["w"]).max()) > 0 and float(jnp.abs(g["medusa"]["lm_head"]).max()) > 0


def test_unknown_heads_loss():
  hcfg = HeadsConfig(num_heads=1)
  params, batch, hidden = _setup(hcfg)
  with pytest.raises(ValueError, match="heads loss must be one of"):
    loss_lib.heads_loss(hcfg, CFG, params, hidden, batch, 0.8, kind="kld")


def test_lm_kl_matches_numpy():
  """The backbone's KL to the original (Medusa-2 on distilled data), masked like its next-token CE."""
  params, batch, hidden = _setup(HeadsConfig(num_heads=1))
  base = params["base"]
  teacher = jax.random.normal(jax.random.PRNGKey(3), (2, L, CFG.vocab_size)) * 3.0
  kl, metrics = loss_lib.lm_loss(CFG, base, hidden, {k: jnp.asarray(v) for k, v in batch.items()}, teacher)
  student = _log_softmax(np.asarray(hidden, np.float64) @ np.asarray(base["lm_head"], np.float64))
  t = _log_softmax(np.asarray(teacher, np.float64))
  tok, mask, seg = (np.asarray(batch[k]) for k in ("tokens", "loss_mask", "segment_ids"))
  want = [np.sum(np.exp(t[b, i]) * (t[b, i] - student[b, i])) for b in range(2) for i in range(L - 1)
          if mask[b, i + 1] and seg[b, i] > 0 and seg[b, i + 1] == seg[b, i]]
  np.testing.assert_allclose(kl, np.mean(want), rtol=2e-5)
  assert metrics["lm/kl"] == kl and np.mean(want) > 0.1
