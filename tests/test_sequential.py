"""Sequential (Hydra-style) heads: each tree level drafted from its parent's path, verified by the
same tree step (medusa_jax/heads.py kind='sequential', medusa.py draft_levels).

Pinned here: the level-by-level draft equals a plain loop over the nodes; a head's guess at a node
depends on the tokens of its path; greedy decoding with sequential heads emits exactly greedy
decoding's tokens (float64, batch 4 with ragged prompts and an EOS, three trees); exact sampling
with them is distributed as plain sampling (chi-square over the first three tokens).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax import convert
from medusa_jax import decode
from medusa_jax import heads as heads_lib
from medusa_jax import medusa
from medusa_jax import model as model_lib
from medusa_jax import release_heads
from medusa_jax import tree as tree_lib
from medusa_jax.heads import HeadsConfig

import test_medusa as tm  # the float64 model, prompts and sampling reference of the Medusa tests

SEQ_HEADS = HeadsConfig(num_heads=4, num_layers=1, shared_lm_head=False, kind="sequential")


@functools.lru_cache(maxsize=None)
def _seq_params():
  """Backbone + sequential heads that are right often but not always (NumPy float64, under x64):
  random blocks and path projections, LM heads fitted by least squares to the token each head
  should predict on the greedy continuations of the prompts, reading the true path (teacher
  forcing, as training does)."""
  cfg, hcfg, V = tm.X64, SEQ_HEADS, tm.X64.vocab_size
  M = hcfg.num_heads
  base = tm._scaled_params(cfg, 0, tm.X64_SCALE)  # pylint: disable=protected-access
  rng = np.random.default_rng(1)
  med = {"w": rng.normal(0, 0.1, (M, 1, cfg.dim, cfg.dim)), "b": rng.normal(0, 0.1, (M, 1, cfg.dim)),
         "path_w": rng.normal(0, 0.3, (M, M, cfg.dim, cfg.dim)) / np.sqrt(cfg.dim)}
  outs, _ = tm._decoder(cfg, decode.Sampling(max_new_tokens=tm.MAX_NEW)).generate({"base": base}, tm.PROMPTS)  # pylint: disable=protected-access
  feats, targets = [[] for _ in range(M)], [[] for _ in range(M)]
  for prompt, out in zip(tm.PROMPTS, outs):
    seq = prompt + out
    L = len(seq)
    _, hidden = tm._causal_forward(cfg, base, jnp.asarray([seq]), jnp.asarray([L]))  # pylint: disable=protected-access
    padded = np.array(seq + [0] * (M + 1))
    path = np.stack([padded[1 + j:1 + j + L] for j in range(M)], -1)[None]  # [1, L, M]: t+1 .. t+M
    states = np.asarray(heads_lib.head_states(hcfg, cfg, {"base": base, "medusa": med}, hidden, jnp.asarray(path)))[0]
    for t in range(len(prompt) - 1, L):
      for m in range(M):
        if t + m + 2 < L:
          feats[m].append(states[t, m])
          targets[m].append(seq[t + m + 2])
  lm_head = np.stack([np.linalg.lstsq(np.array(x), np.eye(V)[y], rcond=None)[0] for x, y in zip(feats, targets)])
  med["lm_head"] = lm_head + tm.X64_NOISE * lm_head.std() * rng.normal(size=lm_head.shape)
  return {"base": base, "medusa": med}


def _spec(tree_name, heads=SEQ_HEADS, vocab=64, **kw):
  return medusa.MedusaSpec(heads=heads, tree=tree_lib.resolve(tree_name, num_heads=heads.num_heads, max_topk=vocab),
                           **kw)


def _loop_draft(spec, cfg, params, hidden_D, root):
  """Node by node, in node order: head d at a depth-d node reads h and the node's path tokens."""
  tree = spec.tree
  toks = [int(root)] + [0] * (tree.num_nodes - 1)
  for i in range(1, tree.num_nodes):
    d = int(tree.depths[i])
    path = [toks[int(a)] for a in tree.ancestors[i, :d]]  # root .. parent
    logits = heads_lib.subset_logits(spec.heads, cfg, params, jnp.asarray(hidden_D)[None, None],
                                     jnp.asarray(path + [0] * (spec.heads.num_heads - d))[None, None])[0, 0, d - 1]
    order = np.argsort(-np.asarray(logits), kind="stable")
    tok = int(order[tree.rank[i]])
    toks[i] = int(params["medusa"]["vocab_ids"][tok]) if spec.heads.draft_vocab else tok
  return toks


@pytest.mark.parametrize("tree_name,draft_vocab", [(tm.MC, 0), ("dense:2,3", 24)])
def test_level_draft_equals_a_loop_over_nodes(tree_name, draft_vocab, projection_backend):
  cfg = tm.TINY
  hcfg = HeadsConfig(num_heads=4, num_layers=2, shared_lm_head=True, draft_vocab=draft_vocab, kind="sequential")
  base = tm._scaled_params(cfg, 3, 20.0)  # pylint: disable=protected-access
  med = heads_lib.init_params(hcfg, cfg, base)
  med["w"] = jax.random.normal(jax.random.PRNGKey(4), med["w"].shape) * 0.3
  med["path_w"] = jax.random.normal(jax.random.PRNGKey(5), med["path_w"].shape) * 0.3
  if draft_vocab:
    med["vocab_ids"] = jnp.asarray(np.sort(np.random.default_rng(5).choice(cfg.vocab_size, draft_vocab, False)),
                                   jnp.int32)
  params = {"base": base, "medusa": med}
  spec = _spec(tree_name, heads=hcfg, vocab=draft_vocab or cfg.vocab_size)
  hidden_BxD = jax.random.normal(jax.random.PRNGKey(6), (2, cfg.dim))
  root_B = jnp.array([3, 7], jnp.int32)
  weights = heads_lib.decoding_weights(hcfg, cfg, params, backend=True)
  assert ("proj" in weights) == ("proj_VxD" in weights and projection_backend == "cpu_kernel")
  got = np.asarray(jax.jit(lambda p, h, r: medusa.draft_levels(spec, cfg, p, h, r, weights))(params, hidden_BxD, root_B))
  for b in range(2):
    assert got[b].tolist() == _loop_draft(spec, cfg, params, hidden_BxD[b], root_B[b])
  assert len(set(got[0, 1:].tolist())) > 3  # not a degenerate draft


def test_a_heads_guess_depends_on_its_parents_token():
  cfg, hcfg = tm.TINY, HeadsConfig(num_heads=2, num_layers=1, kind="sequential")
  base = tm._scaled_params(cfg, 3, 20.0)  # pylint: disable=protected-access
  med = heads_lib.init_params(hcfg, cfg, base)
  med["path_w"] = jax.random.normal(jax.random.PRNGKey(5), med["path_w"].shape) * 0.5
  params = {"base": base, "medusa": med}
  h = jax.random.normal(jax.random.PRNGKey(6), (1, 1, cfg.dim))
  second = lambda parent: int(jnp.argmax(heads_lib.subset_logits(hcfg, cfg, params, h,
                                                                 jnp.asarray([[[3, parent]]]))[0, 0, 1]))
  assert len({second(p) for p in range(20)}) > 1
  # Head 1 reads only the root: the parent slot (path position 1) does not matter to it.
  first = lambda parent: int(jnp.argmax(heads_lib.subset_logits(hcfg, cfg, params, h,
                                                                jnp.asarray([[[3, parent]]]))[0, 0, 0]))
  assert len({first(p) for p in range(20)}) == 1


@pytest.mark.parametrize("tree_name", ["chain:3", "dense:2,3", tm.MC])
def test_greedy_sequential_equals_greedy(tree_name):
  with jax.enable_x64(True):
    params = _seq_params()
    sampling = decode.Sampling(max_new_tokens=tm.MAX_NEW)
    eos = tm._eos_for_batch()  # pylint: disable=protected-access
    cfg = tm.X64.replace(eos_ids=(eos,))
    want, vstate = tm._decoder(cfg, sampling).generate(params, tm.PROMPTS)  # pylint: disable=protected-access
    got, mstate = tm._decoder(cfg, sampling, _spec(tree_name)).generate(params, tm.PROMPTS)  # pylint: disable=protected-access
  assert got == want
  assert int(mstate.steps) < int(vstate.steps) * 0.75  # candidates were accepted: not vacuous


SMALL_SEQ = HeadsConfig(num_heads=2, num_layers=1, shared_lm_head=True, kind="sequential")


def test_lossless_sampling_with_sequential_heads():
  base = tm._small_params()["base"]  # pylint: disable=protected-access
  rng = np.random.default_rng(2)
  D = tm.SMALL.dim
  med = {"w": rng.normal(0, 0.3, (2, 1, D, D)).astype(np.float32), "b": rng.normal(0, 0.3, (2, 1, D)).astype(np.float32),
         "path_w": rng.normal(0, 0.3, (2, 2, D, D)).astype(np.float32)}
  params = jax.tree.map(jnp.asarray, {"base": base, "medusa": med})
  spec = _spec("dense:2,2", heads=SMALL_SEQ, vocab=8, acceptance="sample")
  dec = medusa.make_decoder(tm.SMALL, decode.Sampling(temperature=tm.TEMP, max_new_tokens=3), spec)
  counts, multi = np.zeros(8 ** 3, np.int64), 0
  for chunk in range(tm.CHUNKS):
    chunks = list(dec.stream(params, [tm.SMALL_PROMPT] * tm.CHUNK, jax.random.PRNGKey(300 + chunk)))
    multi += sum(len(c) > 1 for c in chunks[1])
    seqs = np.array([sum((c[b] for c in chunks), []) for b in range(tm.CHUNK)])
    counts += np.bincount(seqs @ np.array([64, 8, 1]), minlength=512)
  assert multi / (tm.CHUNKS * tm.CHUNK) > 0.2
  assert tm._chi_square_p(counts, tm._exact_three_token_distribution()) > 1e-3  # pylint: disable=protected-access


def test_release_format_refuses_sequential_heads(tmp_path):
  hcfg = HeadsConfig(num_heads=2, kind="sequential")
  with pytest.raises(convert.WeightsError, match="Medusa heads only, not sequential heads"):
    release_heads.save(str(tmp_path), hcfg, tm.TINY, heads_lib.init_params(hcfg, tm.TINY))


def test_unknown_heads_kind():
  with pytest.raises(ValueError, match="heads.kind must be one of"):
    HeadsConfig(kind="hydra")


def test_sequential_heads_train_lower_the_loss_and_resume_exactly(data_dir, tmp_path):
  """configs/smollm2_hydra.py's recipe through the trainer: teacher-forced on the data's path, the
  heads' held-out loss goes down; a run killed after 3 steps and resumed logs what an uninterrupted
  run logs; the export decodes."""
  from conftest import tb_scalars, train_config, without_timing  # pylint: disable=g-import-not-at-top
  from medusa_jax import runtime, trainer  # pylint: disable=g-import-not-at-top
  c = train_config(data_dir, "smollm2_hydra", steps=6, checkpoint_every=3)
  assert c.heads.kind == "sequential" and not c.heads.next_token_input
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  out = trainer.train_and_evaluate(c, straight)
  (want,) = tb_scalars(straight)
  assert want[("eval/heads_loss", 6)] < want[("eval/heads_loss", 1)] - 0.3
  trainer.train_and_evaluate(c, killed, stop_after=3)
  trainer.train_and_evaluate(c, killed)
  first, second = tb_scalars(killed)
  assert without_timing({**first, **second}) == without_timing(want)
  loaded = runtime.load(c, checkpoint=os.path.join(straight, "export"))
  assert loaded.heads.kind == "sequential" and "path_w" in loaded.params["medusa"]
  assert out["step"] == 6
