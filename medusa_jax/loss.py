"""Training losses: the Medusa heads' loss (Medusa-1), plus the backbone's LM/KL loss (Medusa-2).

Head m (1-based) at position t predicts the token at t+m+1; the backbone's LM head predicts t+1.
A target counts only if it is an assistant token (``loss_mask``) in the same packed segment.
Shapes: B batch, L length, D model, M heads, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from medusa_jax import heads as heads_lib
from medusa_jax import model as model_lib


def shifted_targets(tokens_BxL, loss_mask_BxL, segment_ids_BxL, shift: int):
  """Targets ``shift`` positions ahead and whether each counts: ([B, L], [B, L] bool)."""
  pad = lambda x: jnp.pad(x[:, shift:], ((0, 0), (0, shift)))
  tgt = pad(tokens_BxL)
  ok = (pad(loss_mask_BxL) > 0) & (pad(segment_ids_BxL) == segment_ids_BxL) & (segment_ids_BxL > 0)
  return tgt, ok


def _ce_and_rank(logits_BxLxV, tgt_BxL):
  """Per-position cross-entropy and the target's rank (0 = top-1) under the logits."""
  logits = logits_BxLxV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tl = jnp.take_along_axis(logits, tgt_BxL[..., None], axis=-1)[..., 0]
  rank = jnp.sum(logits > tl[..., None], axis=-1)
  return lse - tl, rank


def _masked_mean(x, ok):
  return jnp.sum(jnp.where(ok, x, 0.0)) / jnp.maximum(jnp.sum(ok), 1)


def heads_loss(hcfg: heads_lib.HeadsConfig, cfg: model_lib.ModelConfig, params, hidden_BxLxD, batch,
               decay: float, topk: int = 5, remat: bool = True):
  """Σ_m decay^m · CE_m and per-head metrics (loss, top-1..topk accuracy).

  The heads run one at a time; with ``remat`` each under ``jax.checkpoint`` so only one [B, L, V]
  logits tensor is live in the backward pass (all M would be M × B × L × V floats, GBs for a large
  batch), at the price of recomputing each head's projection. With a draft vocabulary
  (``HeadsConfig.draft_vocab``) V is that smaller set.
  """
  M = hcfg.num_heads
  med = params["medusa"]
  single = dataclasses.replace(hcfg, num_heads=1)
  index_V = heads_lib.subset_index(hcfg, cfg, params)
  # The token after each position (teacher forcing), for heads with next_token_input; the last
  # position's is padding, and no head has a target there.
  tokens = batch["tokens"]
  next_BxL = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)

  def one_head(p_m, tgt, ok):
    logits = heads_lib.subset_logits(single, cfg, {"base": params["base"], "medusa": p_m}, hidden_BxLxD, next_BxL)
    ce, rank = _ce_and_rank(logits[:, :, 0], tgt)
    return _masked_mean(ce, ok), jnp.stack([_masked_mean((rank < k).astype(jnp.float32), ok)
                                            for k in range(1, topk + 1)])

  if remat:
    one_head = jax.checkpoint(one_head)
  total = 0.0
  metrics = {}
  for m in range(M):
    tgt, ok = shifted_targets(batch["tokens"], batch["loss_mask"], batch["segment_ids"], m + 2)
    # With a draft vocabulary, targets outside it cannot be proposed: they are left out of the loss
    # (and the accuracies are over the targets inside it).
    sub_tgt = index_V[tgt]
    ok = ok & (sub_tgt >= 0)
    ce, acc = one_head(heads_lib.per_head(med, m), jnp.maximum(sub_tgt, 0), ok)
    total = total + decay ** (m + 1) * ce
    metrics[f"head{m + 1}/loss"] = ce
    for k in range(topk):
      metrics[f"head{m + 1}/top{k + 1}"] = acc[k]
  return total, metrics


def lm_loss(cfg, base, hidden_BxLxD, batch, teacher_logits_BxLxV=None):
  """The backbone's own loss: next-token CE, or KL(teacher ‖ student) when teacher logits are given."""
  logits = model_lib.project_logits(cfg, base, hidden_BxLxD)
  tgt, ok = shifted_targets(batch["tokens"], batch["loss_mask"], batch["segment_ids"], 1)
  if teacher_logits_BxLxV is None:
    ce, rank = _ce_and_rank(logits, tgt)
    return _masked_mean(ce, ok), {"lm/loss": _masked_mean(ce, ok),
                                  "lm/top1": _masked_mean((rank < 1).astype(jnp.float32), ok)}
  # The teacher's distribution at t predicts t+1, so the positions that count are the same as CE's.
  t_logp = jax.nn.log_softmax(teacher_logits_BxLxV.astype(jnp.float32), axis=-1)
  s_logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
  return _masked_mean(kl, ok), {"lm/kl": _masked_mean(kl, ok)}
