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


HEADS_LOSSES = ("ce", "kl", "mix")


def teacher_logits(hcfg: heads_lib.HeadsConfig, cfg: model_lib.ModelConfig, params, hidden_BxLxD):
  """The backbone's own next-token logits at each position, over the heads' vocabulary: the draft
  vocabulary when there is one (the LM head's rows of those tokens only), else all of it."""
  base, dt = params["base"], cfg.compute_dtype
  acc = model_lib.accum_dtype(dt)
  h = hidden_BxLxD.astype(dt)
  if not hcfg.draft_vocab:
    return model_lib.project_logits(cfg, base, hidden_BxLxD).astype(jnp.float32)
  ids = params["medusa"]["vocab_ids"]
  if cfg.tie_embeddings:
    return jnp.einsum("bld,vd->blv", h, base["embed"][ids].astype(dt), preferred_element_type=acc)
  return jnp.einsum("bld,dv->blv", h, jnp.take(base["lm_head"], ids, axis=1).astype(dt), preferred_element_type=acc)


def _shift(x_BxLx_, m: int):
  """x[:, t + m] at position t (zero past the end)."""
  if m == 0:
    return x_BxLx_
  pad = [(0, 0), (0, m)] + [(0, 0)] * (x_BxLx_.ndim - 2)
  return jnp.pad(x_BxLx_[:, m:], pad)


def heads_loss(hcfg: heads_lib.HeadsConfig, cfg: model_lib.ModelConfig, params, hidden_BxLxD, batch,
               decay: float, topk: int = 5, remat: bool = True, kind: str = "ce", kl_mix: float = 0.5,
               kl_temperature: float = 1.0):
  """Σ_m decay^m · L_m and per-head metrics (loss, ce, kl or kl_soft, top-1..topk accuracy).

  ``kind`` chooses each head's loss L_m:
    * ``ce``: cross-entropy to the token at t+m+1 (the paper's Medusa-1 loss);
    * ``kl``: KL(backbone ‖ head m), where the backbone's distribution is its own prediction of
      token t+m+1, made at position t+m (softmax of its logits / ``kl_temperature``); the head
      learns that whole distribution instead of one sampled token. It costs no extra backbone
      forward: the hidden state at t+m comes from the forward the loss already runs (held with
      stop_gradient, so in Medusa-2 the KL term does not pull the backbone towards the heads);
    * ``mix``: (1 - kl_mix) · CE + kl_mix · KL.
  At ``kl_temperature`` 1 the KL term is logged as ``head{m}/kl``, the KL from the backbone's
  distribution; at another temperature only the target is softened (the head's logits are not
  divided), so it is the KL from a softened backbone, logged as ``head{m}/kl_soft``.
  With a draft vocabulary V' both distributions live on V': the teacher is the backbone's softmax
  over the V' logits (renormalised), and CE leaves out targets outside V' (no head can propose
  them). The accuracies count *every* target, a target outside V' as a miss, so they are the
  acceptance rates decoding sees.

  The heads run one at a time; with ``remat`` each under ``jax.checkpoint`` so only one [B, L, V']
  logits tensor is live in the backward pass, at the price of recomputing each head's projection.
  With KL the teacher's [B, L, V'] log-probabilities are computed once and shared by the heads
  (one projection instead of one per head; they are constants, so no gradient flows through them).
  """
  if kind not in HEADS_LOSSES:
    raise ValueError(f"heads loss must be one of {HEADS_LOSSES}, got {kind!r}")
  M = hcfg.num_heads
  med = params["medusa"]
  single = dataclasses.replace(hcfg, num_heads=1)
  index_V = heads_lib.subset_index(hcfg, cfg, params)
  w_ce, w_kl = {"ce": (1.0, 0.0), "kl": (0.0, 1.0), "mix": (1.0 - kl_mix, kl_mix)}[kind]
  # The tokens after each position, t+1 .. t+K (teacher forcing), for heads that read them (next-token
  # and sequential heads); past the end they are padding, where no head has a target.
  path_BxLxK = jnp.stack([_shift(batch["tokens"], j + 1) for j in range(max(1, hcfg.path_tokens))], axis=-1)
  teacher_hidden = jax.lax.stop_gradient(hidden_BxLxD)
  # With the prefix layer the heads read its output (causal within each packed segment, at the
  # segments' own positions, as the backbone's forward ran); the teacher stays the backbone's.
  heads_in_BxLxD = hidden_BxLxD
  if hcfg.prefix_layer:
    positions_BxL = batch.get("positions")
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(hidden_BxLxD.shape[1], dtype=jnp.int32), hidden_BxLxD.shape[:2])
    heads_in_BxLxD = heads_lib.heads_input(hcfg, cfg, params, hidden_BxLxD, positions_BxL,
                                           model_lib.segment_causal_mask(batch["segment_ids"]))

  # The teacher's log-probabilities once for all heads: head m reads them m + 1 positions on.
  teacher_logp_BxLxV = None
  if w_kl:
    teacher_logp_BxLxV = jax.nn.log_softmax(
        jax.lax.stop_gradient(teacher_logits(hcfg, cfg, params, teacher_hidden)) / kl_temperature, axis=-1)

  def one_head(m, p_m, tgt_BxL, ok_BxL, in_vocab_BxL, t_logp_BxLxV):
    logits = heads_lib.subset_logits(single, cfg, {"base": params["base"], "medusa": p_m}, heads_in_BxLxD,
                                     path_BxLxK, first_head=m)[:, :, 0].astype(jnp.float32)
    ce, rank = _ce_and_rank(logits, tgt_BxL)
    ce_mean = _masked_mean(ce, ok_BxL & in_vocab_BxL)
    kl_mean = jnp.zeros((), jnp.float32)
    if w_kl:
      kl = jnp.sum(jnp.exp(t_logp_BxLxV) * (t_logp_BxLxV - jax.nn.log_softmax(logits, axis=-1)), axis=-1)
      kl_mean = _masked_mean(kl, ok_BxL)
    hits = [_masked_mean(((rank < k) & in_vocab_BxL).astype(jnp.float32), ok_BxL) for k in range(1, topk + 1)]
    return w_ce * ce_mean + w_kl * kl_mean, ce_mean, kl_mean, jnp.stack(hits)

  if remat:
    one_head = jax.checkpoint(one_head, static_argnums=(0,))
  total = 0.0
  metrics = {}
  for m in range(M):
    tgt, ok = shifted_targets(batch["tokens"], batch["loss_mask"], batch["segment_ids"], m + 2)
    sub_tgt = index_V[tgt]
    # Head m at t predicts t+m+1, which the backbone predicts at t+m.
    t_logp = _shift(teacher_logp_BxLxV, m + 1) if w_kl else teacher_hidden[:, :0]
    loss_m, ce, kl, acc = one_head(m, heads_lib.per_head(med, m), jnp.maximum(sub_tgt, 0), ok, sub_tgt >= 0,
                                   t_logp)
    total = total + decay ** (m + 1) * loss_m
    metrics[f"head{m + 1}/loss"] = loss_m
    metrics[f"head{m + 1}/ce"] = ce
    if w_kl:
      metrics[f"head{m + 1}/kl" if kl_temperature == 1.0 else f"head{m + 1}/kl_soft"] = kl
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
