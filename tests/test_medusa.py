"""Tests of Medusa decoding (medusa_jax/medusa.py: MedusaSpec, medusa_step and its acceptance rules).

What is pinned, each on a tiny random model (compiles in about a second):
  * tree attention: a node's logits depend on its ancestors and the prefix and on nothing else
    (gradients), and equal a plain causal forward along every root-to-leaf path;
  * greedy Medusa emits exactly plain greedy decoding's tokens (float64, so no argmax near-tie can
    flip), for chain, dense and the release's 64-node tree, batched with ragged prompts and an EOS;
  * typical acceptance equals a direct NumPy computation, for the threshold and for the whole
    selection of one step;
  * lossless sampling: the first three tokens are distributed as plain sampling's, nucleus (top-p)
    included (chi-square over all 8^3 continuations, the exact reference computed from the model),
    and a deliberately wrong rule fails the same test.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from medusa_jax import decode
from medusa_jax import heads as heads_lib
from medusa_jax import medusa
from medusa_jax import model as model_lib
from medusa_jax import tree as tree_lib
from medusa_jax.heads import HeadsConfig
from medusa_jax.model import ModelConfig


def _scaled_params(cfg, seed, scale):
  """Random backbone params with the matrices scaled up from init's 0.02, so that attention and
  the MLP matter (at 0.02 the residual stream is almost only the token embedding)."""
  base = model_lib.init_params(cfg, jax.random.PRNGKey(seed))
  return jax.tree.map(lambda x: np.asarray(x * scale if x.ndim > 1 else x), base)


# ----------------------------------------------------------------------------------------------
# Tree attention on a tiny fp32 model
# ----------------------------------------------------------------------------------------------

# Vocabulary 160: room for a unique id per prefix token and per node of two 64-node trees.
TINY = ModelConfig(vocab_size=160, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                   max_seq_len=256, bos_id=None, eos_ids=())
MC = "mc_sim_7b_63"


@functools.partial(jax.jit, static_argnums=(0,))
def _causal_forward(cfg, base, tokens_BxL, length_B):
  """(logits, hidden) of a plain causal forward without a cache over right-padded rows."""
  B, L = tokens_BxL.shape
  logits, hidden, _ = model_lib.forward(cfg, base, tokens_BxL, jnp.broadcast_to(jnp.arange(L), (B, L)),
                                        model_lib.causal_mask(length_B, L))
  return logits, hidden


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _prefill_then_tree(cfg, base, prefix_BxP, lengths_B, tree_tokens_BxN, tree, S):
  """The prompt into the cache, then one tree-verify forward exactly as medusa_step feeds it."""
  B, P = prefix_BxP.shape
  cache = model_lib.init_cache(cfg, B, S)
  positions = jnp.broadcast_to(jnp.arange(P), (B, P))
  mask = model_lib.cache_causal_mask(cache["index"], P, S)
  _, _, cache = model_lib.forward(cfg, base, prefix_BxP, positions, mask, cache, logits=False)
  idx = lengths_B.astype(jnp.int32)
  cache = {**cache, "index": idx}
  positions = idx[:, None] + jnp.asarray(tree.depths)[None, :]
  mask = model_lib.cache_tree_mask(idx, tree.attn_mask, S)
  logits, hidden, _ = model_lib.forward(cfg, base, tree_tokens_BxN, positions, mask, cache)
  return logits, hidden


def test_tree_mask_by_gradients():
  """d(node i's logits)/d(input of token j) is zero exactly for non-ancestors j, non-zero otherwise.

  Every token of the batch (prefix, padding and tree nodes of both sequences) gets its own id and
  the embeddings are untied, so the gradient w.r.t. embedding row j is the sensitivity to input j.
  """
  cfg, tree = TINY, tree_lib.resolve(MC)
  base = _scaled_params(cfg, 0, 10.0)
  N, P, S = tree.num_nodes, 8, 96
  lengths = np.array([8, 5])
  prefix = np.arange(16).reshape(2, P)               # sequence 1's ids 13..15 are padding
  nodes = 16 + np.arange(2 * N).reshape(2, N)
  probe = jnp.asarray(np.random.default_rng(0).normal(size=cfg.vocab_size), jnp.float32)

  def outputs(embed):
    logits, _ = _prefill_then_tree(cfg, {**base, "embed": embed}, jnp.asarray(prefix), jnp.asarray(lengths),
                                   jnp.asarray(nodes), tree, S)
    return jnp.einsum("bnv,v->bn", logits, probe)

  # One jitted gradient per output rather than jit(jacrev): XLA:CPU (jaxlib 0.10.2) miscompiles
  # the batched VJP of an RMS norm once 64+ cotangents are stacked (rows leak into each other).
  grad = jax.jit(jax.grad(lambda e, onehot: jnp.sum(outputs(e) * onehot)))
  embed = jnp.asarray(base["embed"])
  sens = np.stack([np.abs(np.asarray(grad(embed, jnp.asarray(onehot)))).max(-1)
                   for onehot in np.eye(2 * N, dtype=np.float32).reshape(2 * N, 2, N)]).reshape(2, N, -1)
  for b in range(2):
    expect = np.zeros((N, cfg.vocab_size), bool)
    expect[:, prefix[b, :lengths[b]]] = True
    expect[:, nodes[b]] = tree.attn_mask                              # self and ancestors
    assert np.all(sens[b][~expect] == 0.0), "a node sees a non-ancestor, padding or the other sequence"
    assert np.all(sens[b][expect] > 1e-6 * sens.max()), "a node does not see an ancestor or the prefix"
  assert tree.attn_mask.sum() < N * N / 4  # the check above is not vacuous: most pairs must be cut


def test_tree_logits_equal_causal_forward_along_each_path():
  cfg, tree = TINY.replace(vocab_size=16), tree_lib.resolve(MC)
  base = _scaled_params(cfg, 1, 10.0)
  rng = np.random.default_rng(1)
  lengths = np.array([7, 4])
  prefix = rng.integers(0, cfg.vocab_size, (2, 8))
  nodes = rng.integers(0, cfg.vocab_size, (2, tree.num_nodes))
  logits, hidden = _prefill_then_tree(cfg, base, jnp.asarray(prefix), jnp.asarray(lengths), jnp.asarray(nodes),
                                      tree, 96)

  # Every (sequence, path) as its own row of a plain causal forward, right-padded.
  rows, where = [], []
  for b in range(2):
    for c in range(tree.num_paths):
      path = tree.paths[c][tree.path_valid[c]]
      rows.append(list(prefix[b, :lengths[b]]) + list(nodes[b, path]))
      where.append((b, path))
  L = max(map(len, rows))
  toks = np.zeros((len(rows), L), np.int32)
  for r, row in enumerate(rows):
    toks[r, :len(row)] = row
  ref_logits, ref_hidden = _causal_forward(cfg, base, jnp.asarray(toks), jnp.asarray([len(r) for r in rows]))
  for r, (b, path) in enumerate(where):
    pos = lengths[b] + np.arange(len(path))
    np.testing.assert_allclose(logits[b, path], ref_logits[r, pos], atol=1e-5, rtol=0)
    np.testing.assert_allclose(hidden[b, path], ref_hidden[r, pos], atol=1e-5, rtol=0)
  assert np.abs(np.asarray(logits)).max() > 1.0  # logits of a useful size for an absolute tolerance


# ----------------------------------------------------------------------------------------------
# Greedy Medusa == greedy, in float64
# ----------------------------------------------------------------------------------------------

X64 = ModelConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                  max_seq_len=512, bos_id=None, eos_ids=(), dtype="float64", param_dtype="float64")
X64_HEADS = HeadsConfig(num_heads=4, num_layers=1, shared_lm_head=False)
PROMPTS = [np.random.default_rng(7).integers(0, 64, n).tolist() for n in (5, 9, 3, 12)]
MAX_NEW = 29  # odd on purpose: multi-token steps must be cut to it
X64_SCALE = 5.0
X64_NOISE = 0.5


@functools.lru_cache(maxsize=None)
def _x64_params():
  """Backbone + heads that are right often but not always (NumPy float64; call it under x64).

  Untrained heads of a random model would almost never be accepted and the test would be vacuous.
  Instead each head's LM head is fitted by least squares, on the greedy continuations of PROMPTS,
  to the token it should predict (head m at position t: the token at t+m+2). 32 features cannot
  fit every target, so the heads are also wrong at times, and rejection is exercised too.
  """
  cfg, hcfg, V = X64, X64_HEADS, X64.vocab_size
  M = hcfg.num_heads
  base = _scaled_params(cfg, 0, X64_SCALE)
  rng = np.random.default_rng(0)
  med = {"w": rng.normal(0, 0.1, (M, 1, cfg.dim, cfg.dim)), "b": rng.normal(0, 0.1, (M, 1, cfg.dim))}
  outs, _ = _decoder(cfg, decode.Sampling(max_new_tokens=MAX_NEW)).generate({"base": base}, PROMPTS)
  feats, targets = [[] for _ in range(M)], [[] for _ in range(M)]
  for prompt, out in zip(PROMPTS, outs):
    seq = prompt + out
    L = len(seq)
    _, hidden = _causal_forward(cfg, base, jnp.asarray([seq]), jnp.asarray([L]))
    states = np.asarray(heads_lib.head_states(hcfg, cfg, {"medusa": med}, hidden))[0]  # [L, M, D]
    for t in range(len(prompt) - 1, L):
      for m in range(M):
        if t + m + 2 < L:
          feats[m].append(states[t, m])
          targets[m].append(seq[t + m + 2])
  lm_head = np.stack([np.linalg.lstsq(np.array(x), np.eye(V)[y], rcond=None)[0]
                      for x, y in zip(feats, targets)])  # [M, D, V]
  # Noise, so that the heads are also wrong at times and rejection is exercised too.
  med["lm_head"] = lm_head + X64_NOISE * lm_head.std() * rng.normal(size=lm_head.shape)
  return {"base": base, "medusa": med}


@functools.lru_cache(maxsize=None)
def _decoder(cfg, sampling, spec=None):
  """One compiled decoder per (config, sampling, mode), shared by the tests that need it."""
  return medusa.make_decoder(cfg, sampling, spec)


def _spec(tree_name, heads=X64_HEADS, vocab=64, **kw):
  tree = tree_lib.resolve(tree_name, num_heads=heads.num_heads, max_topk=vocab)
  return medusa.MedusaSpec(heads=heads, tree=tree, **kw)


@functools.lru_cache(maxsize=None)
def _eos_for_batch():
  """An EOS that plain greedy emits mid-way in prompt 0 and never in some other prompt."""
  out, _ = _decoder(X64, decode.Sampling(max_new_tokens=MAX_NEW)).generate(_x64_params(), PROMPTS)
  for i in range(3, MAX_NEW // 2):
    tok = out[0][i]
    if tok not in out[0][:i] and any(tok not in o for o in out[1:]):
      return tok
  raise AssertionError(f"no usable EOS in {out}")


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("tree_name", ["chain:3", "dense:2,3", MC])
def test_greedy_medusa_equals_greedy(tree_name, batch):
  with jax.enable_x64(True):
    params = _x64_params()
    sampling = decode.Sampling(max_new_tokens=MAX_NEW)
    if batch == 1:
      cfg, prompts = X64, PROMPTS[:1]
    else:
      eos = _eos_for_batch()
      cfg, prompts = X64.replace(eos_ids=(eos,)), PROMPTS
    want, vstate = _decoder(cfg, sampling).generate(params, prompts)
    got, mstate = _decoder(cfg, sampling, _spec(tree_name)).generate(params, prompts)
    assert got == want
    assert vstate.tokens_BxT.dtype == jnp.int32 and mstate.cache["index"].dtype == jnp.int32

  steps = int(mstate.steps)
  assert steps <= int(vstate.steps)
  if batch == 1:
    assert len(got[0]) == MAX_NEW
    # Not vacuous: candidates were accepted (the prefill emits 1 token, each step 1 + accepted)...
    assert len(got[0]) / (steps + 1) > 2, (tree_name, steps)
    # ... and rejected: fewer than the most a step can take.
    depth = tree_lib.resolve(tree_name).depth
    assert steps > -(-(MAX_NEW - 1) // (depth + 1)), (tree_name, steps)
  else:
    # One sequence stops at the EOS mid-way, another runs to exactly max_new_tokens.
    assert got[0][-1] == eos and len(got[0]) < MAX_NEW // 2
    assert any(len(o) == MAX_NEW and eos not in o for o in got[1:])
    assert all(len(o) <= MAX_NEW for o in got)


@pytest.mark.parametrize("max_new_tokens", [1, 6])
def test_max_new_tokens_is_exact(max_new_tokens):
  """Medusa may accept up to depth + 1 tokens a step; never more than asked may come out."""
  with jax.enable_x64(True):
    params = _x64_params()
    sampling = decode.Sampling(max_new_tokens=max_new_tokens)
    want, _ = _decoder(X64, sampling).generate(params, PROMPTS)
    got, _ = _decoder(X64, sampling, _spec(MC)).generate(params, PROMPTS)
  assert got == want
  assert [len(o) for o in got] == [max_new_tokens] * len(PROMPTS)


def test_stream_matches_generate():
  with jax.enable_x64(True):
    params = _x64_params()
    cfg = X64.replace(eos_ids=(_eos_for_batch(),))
    dec = _decoder(cfg, decode.Sampling(max_new_tokens=MAX_NEW), _spec("dense:2,3"))
    want, state = dec.generate(params, PROMPTS)
    chunks = list(dec.stream(params, PROMPTS))
  assert len(chunks) == int(state.steps) + 1  # the prefill, then one chunk per step
  assert [sum((c[b] for c in chunks), []) for b in range(len(PROMPTS))] == want
  assert max(len(c[b]) for c in chunks for b in range(len(PROMPTS))) > 1  # multi-token chunks


def test_greedy_medusa_equals_greedy_smollm2(smollm2, projection_backend):
  """The real backbone, fp32, zero-initialised shared heads (each guesses a repeat of its input);
  with XLA's dots, and with the CPU kernel on the backbone's and the heads' projections."""
  cfg, params, tok = smollm2
  hcfg = HeadsConfig(num_heads=3, num_layers=1, shared_lm_head=True)
  params = {**params, "medusa": heads_lib.init_params(hcfg, cfg)}
  prompts = [tok.encode(t, add_special_tokens=False) for t in
             ("The capital of France is", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18,")]
  sampling = decode.Sampling(max_new_tokens=32)
  vanilla = medusa.make_decoder(cfg, sampling)
  dp = vanilla.prepare(params)
  want, vstate = vanilla.generate(dp, prompts)
  tree = tree_lib.resolve("chain:3", num_heads=3)
  dec = medusa.make_decoder(cfg, sampling, medusa.MedusaSpec(hcfg, tree))
  mdp = dec.prepare(dp)
  assert (mdp.prepared is not None) == ("proj" in mdp.heads) == (projection_backend == "cpu_kernel")
  got, mstate = dec.generate(mdp, prompts)
  assert got == want
  assert int(mstate.steps) < int(vstate.steps)


@pytest.mark.parametrize("tie,draft_vocab,shared,nxt", [(True, 0, True, False), (True, 24, True, False),
                                                         (False, 24, True, False), (False, 0, True, False),
                                                         (True, 24, False, False), (True, 24, True, True),
                                                         (False, 0, False, True)])
def test_head_candidates_match_subset_logits(tie, draft_vocab, shared, nxt, projection_backend):
  """head_candidates' vocabulary-major projection picks what top-k of heads.subset_logits picks,
  with the projection gathered on the fly or once (heads.decoding_weights), and then through the
  backend; heads that read the next token read the one given."""
  cfg = TINY.replace(tie_embeddings=tie)
  base = _scaled_params(cfg, 3, 20.0)
  hcfg = HeadsConfig(num_heads=3, shared_lm_head=shared, draft_vocab=draft_vocab, next_token_input=nxt)
  med = heads_lib.init_params(hcfg, cfg, base)
  med["w"] = jax.random.normal(jax.random.PRNGKey(4), med["w"].shape) * 0.3
  if nxt:
    med["tok_w"] = jax.random.normal(jax.random.PRNGKey(7), med["tok_w"].shape) * 0.3
  next_B = jnp.array([3, 7], jnp.int32)
  if draft_vocab:
    med["vocab_ids"] = jnp.asarray(np.sort(np.random.default_rng(5).choice(cfg.vocab_size, draft_vocab, False)),
                                      jnp.int32)
  params = {"base": base, "medusa": med}
  spec = medusa.MedusaSpec(heads=hcfg, tree=tree_lib.resolve("dense:3,2", 3))
  hidden = jax.random.normal(jax.random.PRNGKey(6), (2, 1, cfg.dim))
  sub = heads_lib.subset_logits(HeadsConfig(num_heads=2, shared_lm_head=shared, draft_vocab=draft_vocab,
                                            next_token_input=nxt), cfg,
                                {"base": base, "medusa": {k: (v if k == "vocab_ids" else v[:2])
                                                          for k, v in med.items()}}, hidden, next_B[:, None])[:, 0]
  want = jnp.concatenate([jax.lax.top_k(sub[:, m], k)[1] for m, k in enumerate(spec.tree.segment_topk)], -1)
  if draft_vocab:
    want = med["vocab_ids"][want]
  prepared = heads_lib.decoding_weights(hcfg, cfg, params, backend=True)
  assert ("proj" in prepared) == ("proj_VxD" in prepared and projection_backend == "cpu_kernel")
  for weights in (None, prepared):
    np.testing.assert_array_equal(np.asarray(medusa.head_candidates(spec, cfg, params, hidden[:, 0], next_B, weights)),
                                  np.asarray(want))
  if nxt:  # the next token matters
    other = medusa.head_candidates(spec, cfg, params, hidden[:, 0], next_B + 1)
    assert not np.array_equal(np.asarray(other), np.asarray(want))


# ----------------------------------------------------------------------------------------------
# Typical acceptance against NumPy
# ----------------------------------------------------------------------------------------------


def _np_typical(logits, tokens, T, eps, delta):
  z = logits.astype(np.float64) / T
  z = z - z.max(-1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  entropy = -np.sum(p * np.log(p), axis=-1)
  px = np.take_along_axis(p, tokens[..., None], -1)[..., 0]
  return px > np.minimum(eps, delta * np.exp(-entropy)), np.log(px)


def test_typical_ok_matches_numpy():
  rng = np.random.default_rng(3)
  V = 12
  # Peaked, flat and in-between distributions, so both branches of min(eps, delta e^-H) occur.
  scale = np.array([0.1, 1.0, 3.0, 8.0])[:, None, None, None]
  logits = (scale * rng.normal(size=(4, 5, 3, V))).astype(np.float32)
  tokens = rng.integers(0, V, (4, 5, 3))
  for T in (0.5, 1.0, 1.7):
    ok, logp = medusa.typical_ok(jnp.asarray(logits), jnp.asarray(tokens), T, 0.09, 0.3)
    want_ok, want_logp = _np_typical(logits, tokens, T, 0.09, 0.3)
    np.testing.assert_array_equal(np.asarray(ok), want_ok)
    np.testing.assert_allclose(np.asarray(logp), want_logp, atol=1e-5)
    assert 0 < want_ok.mean() < 1
  p = np.exp(logits / 1.0) / np.exp(logits).sum(-1, keepdims=True)
  h = -(p * np.log(p)).sum(-1)
  assert (0.3 * np.exp(-h) < 0.09).any() and (0.3 * np.exp(-h) > 0.09).any()


@pytest.mark.parametrize("bonus", ["greedy", "sample"])
def test_typical_step_selection_matches_numpy(monkeypatch, bonus):
  """One whole typical step on hand-made verification logits: path, tie-break, commit, bonus token
  (greedy by default, as in the paper; sampled at T with typical_bonus='sample'), next draft.

  The backbone forward is replaced by a stub that returns fixed logits for the tree nodes and
  writes a node-specific value into each node's K/V row, so where rows end up is visible.
  """
  cfg = ModelConfig(vocab_size=10, dim=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, mlp_dim=8,
                    max_seq_len=64, bos_id=None, eos_ids=())
  hcfg = HeadsConfig(num_heads=2, num_layers=1, shared_lm_head=True)
  spec = _spec("dense:3,2", heads=hcfg, vocab=10, acceptance="typical", typical_bonus=bonus)
  tree = spec.tree
  N, V, B, S, T = tree.num_nodes, cfg.vocab_size, 4, 40, 0.8
  rng = np.random.default_rng(5)
  base = _scaled_params(cfg, 0, 10.0)
  med = {"w": rng.normal(0, 0.5, (2, 1, 8, 8)), "b": rng.normal(0, 0.5, (2, 1, 8))}
  params = jax.tree.map(jnp.asarray, {"base": base, "medusa": med})

  # Candidates: root token, then head 1's top-3 and head 2's top-3 (distinct within a head).
  flat = np.stack([np.concatenate([[rng.integers(V)], rng.permutation(V)[:3], rng.permutation(V)[:3]])
                   for _ in range(B)]).astype(np.int32)
  tokens = flat[:, tree.tree_indices]
  # Logits, with V = 10: flat rows accept almost anything (p ~ 0.1 > delta e^-H ~ 0.03), peaked
  # rows only their top tokens (threshold eps = 0.09).
  children = lambda i: tree.children[i][tree.children_valid[i]]
  logits = 3.0 * rng.normal(size=(B, N, V))
  # 0: random rows, flat and peaked, and candidates often boosted: whatever the rule makes of it.
  logits[0] *= rng.choice([0.1, 1.0], size=(N, 1))
  for i in range(1, N):
    if rng.random() < 0.5:
      logits[0, tree.parent[i], tokens[0, i]] += 4.0
  # 1: every child of the root is improbable: nothing accepted.
  logits[1, 0, tokens[1, children(0)]] = -10.0
  # 2: the root's second child (rank 1) is accepted, none of its children is.
  logits[2, 0, tokens[2, children(0)]] = -10.0
  logits[2, 0, tokens[2, children(0)[1]]] = 8.0
  logits[2, children(0)[1], tokens[2, children(children(0)[1])]] = -10.0
  # 3: a tie between all nine full-length paths, to be broken by the larger sum of log p.
  logits[3] = -5.0
  for i in range(1, N):
    logits[3, tree.parent[i], tokens[3, i]] = 1.0 + 0.1 * i
  logits = logits.astype(np.float32)
  hidden = rng.normal(size=(B, N, cfg.dim)).astype(np.float32)
  idx = np.array([3, 11, 7, 20], np.int32)

  def fake_forward(cfg_, base_, tokens_BxN, positions, mask, cache, **_):
    del cfg_, base_, tokens_BxN, positions, mask  # the tree's inputs are pinned by the tests above
    stamp = jnp.broadcast_to((100.0 + jnp.arange(N, dtype=jnp.float32))[None, None, :, None],
                             (B, cfg.num_kv_heads, N, cfg.head_dim))
    layers = [{"k": model_lib.write_cache_rows(l["k"], stamp, cache["index"]),
               "v": model_lib.write_cache_rows(l["v"], -stamp, cache["index"])} for l in cache["layers"]]
    return jnp.asarray(logits), jnp.asarray(hidden), {"layers": layers, "index": cache["index"]}

  monkeypatch.setattr(medusa.model_lib, "forward", fake_forward)
  # The draft: the heads' candidates are pinned too (head_candidates has tests of its own).
  monkeypatch.setattr(medusa, "head_candidates", lambda *a, **k: jnp.asarray(flat[:, 1:]))
  cache = model_lib.init_cache(cfg, B, S)
  cache = {**cache, "index": jnp.asarray(idx)}
  state = decode.DecodeState(
      cache=cache, tokens_BxT=jnp.zeros((B, 20), jnp.int32), num_B=jnp.ones((B,), jnp.int32),
      done_B=jnp.zeros((B,), bool), last_B=jnp.asarray(flat[:, 0]), rng=jax.random.PRNGKey(0),
      steps=jnp.zeros((), jnp.int32), draft=decode.DraftCarry(jnp.zeros((B, cfg.dim))))
  sampling = decode.Sampling(temperature=T, max_new_tokens=19)
  step = jax.jit(functools.partial(medusa.medusa_step, cfg, sampling=sampling, spec=spec))
  new = step(decode.DecodeParams(params), state)

  counts, last_nodes = [], []
  for b in range(B):
    # NumPy: accepted prefix of each path, the longest, ties to the larger sum of log p, then
    # to the first in the tree's path order.
    best = None
    for c in range(tree.num_paths):
      path = tree.paths[c][tree.path_valid[c]]
      ok, logp = _np_typical(logits[b, path[:-1]], tokens[b, path[1:]], T, 0.09, 0.3)
      n = int(np.cumprod(ok).sum())
      key = (n, logp[:n].sum())
      if best is None or key > best[0]:
        best = (key, path[:n + 1])
    accepted = best[1]
    count = len(accepted) - 1
    counts.append(count)
    num = int(new.num_B[b])
    assert num == 1 + count + 1
    emitted = np.asarray(new.tokens_BxT[b, 1:num])
    np.testing.assert_array_equal(emitted[:count], tokens[b, accepted[1:]])
    assert int(new.cache["index"][b]) == idx[b] + count + 1
    # The accepted nodes' K/V rows now follow the prefix, in path order.
    rows = np.asarray(new.cache["layers"][0]["k"][b, 0, idx[b]:idx[b] + count + 1, 0])
    np.testing.assert_array_equal(rows, 100.0 + accepted)
    last_nodes.append(accepted[-1])
    if bonus == "greedy":  # the paper's rule: the argmax at the last accepted node
      assert emitted[-1] == np.argmax(logits[b, accepted[-1]])
    # The next draft reads the hidden state at the last accepted node, and the bonus token.
    np.testing.assert_array_equal(np.asarray(new.draft.hidden_BxD[b]), hidden[b, accepted[-1]])
    assert new.last_B[b] == emitted[-1]
  assert int(new.steps) == 1
  assert counts[1:] == [0, 1, 2], counts
  # Over many keys the bonus token is always the argmax (greedy) or drawn from softmax(logits / T):
  # every draw possible, their frequencies those probabilities.
  draws = np.stack([np.asarray(step(decode.DecodeParams(params), state.replace(rng=jax.random.PRNGKey(k))).last_B)
                    for k in range(400)])  # [keys, B]
  for b, node in enumerate(last_nodes):
    if bonus == "greedy":
      assert (draws[:, b] == np.argmax(logits[b, node])).all()
    else:
      z = logits[b, node].astype(np.float64) / T
      p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
      freq = np.bincount(draws[:, b], minlength=V) / len(draws)
      assert np.abs(freq - p).max() < 0.08, (freq, p)
      assert (freq > 0).sum() > 1


# ----------------------------------------------------------------------------------------------
# Lossless sampling: the distribution of the first three tokens
# ----------------------------------------------------------------------------------------------

SMALL = ModelConfig(vocab_size=8, dim=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=16,
                    max_seq_len=256, bos_id=None, eos_ids=())
SMALL_HEADS = HeadsConfig(num_heads=2, num_layers=1, shared_lm_head=True)
SMALL_PROMPT = [3, 1, 4, 1, 5]
TEMP = 0.9
CHUNKS, CHUNK = 4, 5000  # 20,000 samples; chunks keep the prefill's [B, 64, 128] attention small


@functools.lru_cache(maxsize=None)
def _small_params(prefix_layer=False):
  base = _scaled_params(SMALL, 2, 10.0)  # entropy 5.3 of 6.2 nats over 8^3: neither flat nor peaked
  rng = np.random.default_rng(2)
  M, D = SMALL_HEADS.num_heads, SMALL.dim
  med = {"w": rng.normal(0, 0.3, (M, 1, D, D)).astype(np.float32),
         "b": rng.normal(0, 0.3, (M, 1, D)).astype(np.float32)}
  if prefix_layer:  # heads.prefix_layer, every matrix random: the heads read it, not h_t
    med["prefix"] = {k: (np.ones(shape) if k.endswith("norm") else rng.normal(0, 0.3, shape)).astype(np.float32)
                     for k, (shape, _) in heads_lib.prefix_shapes(SMALL).items()}
  return jax.tree.map(jnp.asarray, {"base": base, "medusa": med})


def _nucleus(logp, top_p):
  """NumPy nucleus truncation as plain sampling defines it: the smallest prefix (by probability)
  whose mass reaches top_p, ties at the cut kept; renormalised log-probabilities, -inf outside."""
  if top_p >= 1.0:
    return logp
  sorted_desc = -np.sort(-logp, axis=-1)
  cum = np.cumsum(np.exp(sorted_desc), axis=-1)
  cutoff = np.take_along_axis(sorted_desc, (cum < top_p).sum(-1, keepdims=True), axis=-1)
  kept = np.where(logp < cutoff, -np.inf, logp)
  return kept - np.log(np.exp(kept).sum(-1, keepdims=True))


@functools.lru_cache(maxsize=None)
def _exact_three_token_distribution(top_p=1.0):
  """P(x1, x2, x3 | prompt) for all 8^3 continuations, from the model's own conditionals."""
  params = _small_params()
  V, P = SMALL.vocab_size, len(SMALL_PROMPT)
  pairs = np.array([(a, b) for a in range(V) for b in range(V)])
  toks = np.concatenate([np.tile(SMALL_PROMPT, (V * V, 1)), pairs], axis=1)
  L = toks.shape[1]
  logits, _ = _causal_forward(SMALL, params["base"], jnp.asarray(toks), jnp.full((V * V,), L))
  z = np.asarray(logits, np.float64)[:, P - 1:] / TEMP                 # [V*V, 3, V], in NumPy float64
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  logp = _nucleus(logp, top_p)
  p1 = np.exp(logp[0, 0])                                   # [x1]
  p2 = np.exp(logp[::V, 1])                                 # rows (x1, 0): [x1, x2]
  p3 = np.exp(logp[:, 2]).reshape(V, V, V)                  # [x1, x2, x3]
  dist = p1[:, None, None] * p2[:, :, None] * p3
  assert abs(dist.sum() - 1) < 1e-9
  return dist.reshape(-1)


def _sample_first_three(spec, top_p=1.0):
  """Counts of each 3-token continuation over CHUNKS * CHUNK samples, and the fraction of
  sequences whose first Medusa step accepted at least one candidate."""
  params = _small_params(spec.heads.prefix_layer)
  dec = _decoder(SMALL, decode.Sampling(temperature=TEMP, top_p=top_p, max_new_tokens=3), spec)
  counts = np.zeros(SMALL.vocab_size ** 3, np.int64)
  multi = 0
  for chunk in range(CHUNKS):
    stream = dec.stream(params, [SMALL_PROMPT] * CHUNK, jax.random.PRNGKey(100 + chunk))
    chunks = list(stream)
    multi += sum(len(c) > 1 for c in chunks[1])
    seqs = np.array([sum((c[b] for c in chunks), []) for b in range(CHUNK)])
    assert seqs.shape == (CHUNK, 3)
    counts += np.bincount(seqs @ np.array([64, 8, 1]), minlength=512)
  return counts, multi / (CHUNKS * CHUNK)


def _chi_square_p(counts, dist):
  assert counts[dist == 0].sum() == 0, "sampled a continuation outside the nucleus"
  counts, dist = counts[dist > 0], dist[dist > 0]
  expected = dist * counts.sum()
  small = expected < 5  # pool the rare continuations into one cell
  obs, exp = counts[~small], expected[~small]
  if small.any():
    obs, exp = np.append(obs, counts[small].sum()), np.append(exp, expected[small].sum())
  return stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize("tree_name,top_p,prefix_layer", [("dense:2,2", 1.0, False), ("dense:2,2", 0.8, False),
                                                          ("dense:2,1", 1.0, False), ("dense:2,2", 1.0, True)])
def test_lossless_sampling_matches_plain_sampling(tree_name, top_p, prefix_layer):
  """The first three tokens: the prefill's, then the first step's. With the depth-2 tree they are
  accepted candidates or residual draws; with the depth-1 tree the third token is, whenever the
  step accepted its leaf, the one drawn from the leaf's own distribution after it. With the heads'
  prefix layer the drafts change, the distribution must not."""
  heads = dataclasses.replace(SMALL_HEADS, prefix_layer=prefix_layer)
  spec = _spec(tree_name, heads=heads, vocab=8, acceptance="sample")
  dist = _exact_three_token_distribution(top_p)
  counts, accepted = _sample_first_three(spec, top_p)
  assert accepted > 0.2  # the heads' candidates are often accepted: the tree walk is exercised
  if top_p < 1:
    assert (dist == 0).mean() > 0.3  # the nucleus matters: many continuations are impossible
  assert _chi_square_p(counts, dist) > 1e-3


def test_lossless_sampling_test_detects_a_wrong_rule():
  """Without the residual renormalisation the same test must fail."""
  spec = _spec("dense:2,2", heads=SMALL_HEADS, vocab=8, acceptance="sample", exact_renormalise=False)
  counts, accepted = _sample_first_three(spec)
  assert accepted > 0.2
  assert _chi_square_p(counts, _exact_three_token_distribution()) < 1e-3


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_tree_deeper_than_heads_is_an_error():
  tree = tree_lib.resolve("chain:3")
  with pytest.raises(ValueError, match="3 deep but there are only 2 Medusa heads"):
    medusa.MedusaSpec(heads=HeadsConfig(num_heads=2), tree=tree)
  medusa.MedusaSpec(heads=HeadsConfig(num_heads=3), tree=tree)  # exactly deep enough is fine


def test_bad_acceptance_name():
  with pytest.raises(ValueError, match="acceptance must be one of"):
    medusa.MedusaSpec(heads=HeadsConfig(), tree=tree_lib.resolve("chain:2"), acceptance="typicl")


def test_greedy_acceptance_with_a_temperature_is_an_error():
  spec = medusa.MedusaSpec(heads=HeadsConfig(num_heads=2), tree=tree_lib.resolve("chain:2"))
  with pytest.raises(ValueError, match="--acceptance sample .* or --acceptance typical"):
    medusa.make_decoder(TINY, decode.Sampling(temperature=0.7), spec)
  medusa.make_decoder(TINY, decode.Sampling(temperature=0.7), medusa.MedusaSpec(
      heads=HeadsConfig(num_heads=2), tree=tree_lib.resolve("chain:2"), acceptance="sample"))
