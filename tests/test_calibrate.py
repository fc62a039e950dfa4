"""Tests of tree calibration (medusa_jax/calibrate.py): rank counting, tree size choice, the tree file."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax import calibrate
from medusa_jax import config as config_lib
from medusa_jax import decode
from medusa_jax import medusa
from medusa_jax import heads as heads_lib
from medusa_jax import runtime
from medusa_jax import tree


def test_generation_targets():
  targets, valid = calibrate.generation_targets([[10, 11, 12, 13], [20, 21]], num_heads=2)
  # Position j: the backbone predicts token j, head k token j+k.
  np.testing.assert_array_equal(targets[0], [[10, 11, 12], [11, 12, 13], [12, 13, 0], [13, 0, 0]])
  np.testing.assert_array_equal(valid[0], [[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]])
  np.testing.assert_array_equal(targets[1], [[20, 21, 0], [21, 0, 0], [0, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(valid[1], [[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]])


def test_rank_counts_with_known_head_ranks(tiny):
  """Fake heads whose rank of token x is (x - c_m) mod V: the table is known by hand."""
  cfg, params = tiny
  V = cfg.vocab_size
  hcfg = heads_lib.HeadsConfig(num_heads=2)
  params = {**params, "medusa": heads_lib.init_params(hcfg, cfg)}
  shift = np.array([5, 7])
  table = -((np.arange(V)[None, :] - shift[:, None]) % V).astype(np.float32)  # [M, V]

  def fake_logits(hcfg, cfg, params, hidden_BxLxD, path=None):
    B, L = hidden_BxLxD.shape[:2]
    return jnp.broadcast_to(jnp.asarray(table), (B, L) + table.shape)

  prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
  gens = [[5, 6, 8, 9, 7], [7, 8, 9], [30]]
  # Head 1 (c=5): targets 6,8,9,7 | 8,9 | (none) -> ranks 1,3,4,2 | 3,4.
  # Head 2 (c=7): targets 8,9,7 | 9 | (none) -> ranks 1,2,0 | 2.
  joint = []
  counts = calibrate.rank_counts(cfg, hcfg, params, prompts, gens, num_ranks=3, batch_size=2,
                                 logits_fn=fake_logits, ranks_out=joint)
  # Joint ranks at the positions with a head-1 target (3 = beyond the table or the text).
  np.testing.assert_array_equal(np.concatenate(joint), [[1, 1], [3, 2], [3, 0], [2, 3], [3, 2], [3, 3]])
  np.testing.assert_array_equal(counts[1], [0, 1, 1, 4])
  np.testing.assert_array_equal(counts[2], [1, 1, 2, 0])
  assert counts[0].sum() == 9  # the backbone: one target per generated token
  acc = calibrate.accuracy_table(counts)[1:]
  np.testing.assert_allclose(acc, [[0, 1 / 6, 1 / 6], [0.25, 0.25, 0.5]])


def test_simulated_tokens_per_step_by_hand():
  tree = [[0], [0, 0]]
  # Sequence 1: position 0 accepts 2 (ranks 0, 0) -> next step at 3, which accepts 1 -> at 5, the
  # end. 5 positions, 2 steps. Sequence 2: nothing accepted: 2 positions, 2 steps.
  seqs = [np.array([[0, 0], [0, 0], [5, 5], [0, 1], [5, 5]]), np.array([[1, 0], [3, 3]])]
  assert calibrate.simulate_tokens_per_step(seqs, tree) == pytest.approx(7 / 4)
  assert calibrate.simulate_steps(seqs, tree).tolist() == [2, 2]
  # The per-position sum of node values would say 1 + 4/7 + 2/7 = 1.857.
  assert calibrate.simulate_tokens_per_step(seqs, []) == 1.0
  assert calibrate.simulate_steps(seqs, []).tolist() == [5, 2]
  # A one-token generation (n - 1 = 0 rows) takes no step after the prefill.
  assert calibrate.simulate_steps([np.zeros((0, 2), np.int64)], tree).tolist() == [0]


def test_backbone_reproduces_its_greedy_output(tiny):
  """Teacher forcing lines up with decoding: the backbone ranks its own greedy tokens first."""
  cfg, params = tiny
  hcfg = heads_lib.HeadsConfig(num_heads=3)
  params = {**params, "medusa": heads_lib.init_params(hcfg, cfg)}
  prompts = [[1, 5, 9, 200], [3] * 70, [7, 8]]
  dec = medusa.make_decoder(cfg, decode.Sampling(max_new_tokens=12))
  gens, _ = dec.generate(params, prompts)
  counts = calibrate.rank_counts(cfg, hcfg, params, prompts, gens, num_ranks=4, batch_size=2)
  assert counts[0, 0] == counts[0].sum() == sum(map(len, gens))
  # Zero-initialised heads are the identity: head 1 at position j ranks the backbone's token j
  # first, so its top-1 accuracy is how often a generated token repeats the previous one.
  repeats = sum(g[j] == g[j + 1] for g in gens for j in range(len(g) - 1))
  assert counts[1, 0] == repeats


def test_grow_and_choose_by_expected_speedup():
  acc = np.array([[0.6, 0.2], [0.5, 0.1]])
  choices, expected = calibrate.grow(acc, 5)
  # [0]=0.6, then [0,0]=0.3 over [1]=0.2, then [1]=0.2, then [1,0]=0.1 over [0,1]=0.06.
  assert choices == [[0], [0, 0], [1], [1, 0]]
  np.testing.assert_allclose(expected, [1.0, 1.6, 1.9, 2.1, 2.2])
  rows = calibrate.speedup_table(expected, {1: 0.010, 2: 0.012, 4: 0.014, 5: 0.020})
  np.testing.assert_allclose([r["speedup"] for r in rows], [1.0, 1.6 * 10 / 12, 2.1 * 10 / 14, 2.2 * 10 / 20])
  assert calibrate.best_size(rows) == 4
  # A tree is chosen even when vanilla wins (the tree file needs one node): the best of the trees.
  slow = calibrate.speedup_table(expected, {1: 0.010, 2: 0.030, 4: 0.050})  # 0.53x, 0.42x
  assert calibrate.best_size(slow) == 2


def _tiny_config(model_dir):
  c = config_lib.default_config()
  c.model = model_dir
  c.heads.num_heads = 2
  c.distill.max_prompt_len = 96
  return c


def test_calibrate_joint_estimate_by_hand(tiny_chat_dir, monkeypatch):
  """The default estimate: node values are measured path frequencies and tokens per step come from
  walking the measured generations. Ranks at 6 positions of one generation (2 heads, R = 2):

      position  0      1      2      3      4      5
      ranks    (0,0)  (0,0)  (1,2)  (0,1)  (2,2)  (1,0)

  Path frequencies: [0] 3/6, [0,0] 2/6, [1] 2/6, [1,0] 1/6, [0,1] 1/6. Growing: [0] (0.5), then
  [0,0] and [1] (both 2/6: the shorter, [1], first), then [0,0], then [0,1] or [1,0] (1/6 each:
  lexicographic, [0,1]). The product of marginals would rank [0,0] at 0.5 * 2/6 = 1/6 instead.
  Walking the generation with the tree {[0]}: pos 0 accepts 1 -> 2 (nothing) -> 3 (1) -> 5 (0)
  -> end: 4 steps for 6 tokens, 1.5 per step; with {[0], [1], [0,0]}: 0 accepts 2 -> 3 (1)
  -> 5 (1) -> end: 3 steps, 2.0.
  """
  config = _tiny_config(tiny_chat_dir)
  loaded = runtime.load(config)
  ranks = np.array([[0, 0], [0, 0], [1, 2], [0, 1], [2, 2], [1, 0]])
  counts = np.zeros((3, 3), np.int64)
  for k in range(2):
    counts[k + 1] = np.bincount(ranks[:, k], minlength=3)
  counts[0, 0] = 6

  def fake_rank_counts(*a, ranks_out=None, **k):
    ranks_out.append(ranks)
    return counts

  monkeypatch.setattr(calibrate, "rank_counts", fake_rank_counts)
  monkeypatch.setattr(calibrate, "measure_step_costs", lambda cfg, hcfg, params, choices, sizes, *a, **k: {
      n: 0.01 for n in sizes})
  res = calibrate.calibrate(config, loaded, num_nodes=0, max_nodes=6, num_prompts=2, max_new_tokens=4,
                            num_ranks=2, sizes=(1, 2, 4), plot=False)
  meta = res["meta"]
  assert meta["estimate"] == "joint"
  assert meta["grown_choices"] == [[0], [1], [0, 0], [0, 1], [1, 0]]
  exp = meta["expected_tokens_per_step"]
  assert exp[1] == pytest.approx(6 / 4) and exp[3] == pytest.approx(6 / 3)
  # Product estimate on the same measurements: [0] 0.5, [0,0] 0.5 * 2/6, [1] 2/6 -> [1] before [0,0].
  res = calibrate.calibrate(config, loaded, num_nodes=0, max_nodes=3, num_prompts=2, max_new_tokens=4,
                            num_ranks=2, sizes=(1, 2), plot=False, estimate="product")
  assert res["meta"]["estimate"] == "product" and res["meta"]["grown_choices"] == [[0], [1]]


def test_step_costs_time_the_prepared_step(tiny_chat_dir, monkeypatch):
  """The heads' draft projection is gathered once per tree size (what the decoder prepares), never
  inside the timed step: every call of heads.draft_weight happens in Decoder.prepare."""
  config = _tiny_config(tiny_chat_dir)
  config.heads.draft_vocab = 64
  loaded = runtime.load(config, heads="random")
  calls = []
  real = heads_lib.draft_weight
  monkeypatch.setattr(heads_lib, "draft_weight", lambda *a: calls.append(1) or real(*a))
  prepares = []
  real_prepare = decode.Decoder.prepare
  monkeypatch.setattr(decode.Decoder, "prepare", lambda self, p: prepares.append(1) or real_prepare(self, p))
  costs = calibrate.measure_step_costs(loaded.cfg, loaded.heads, loaded.params, [[0], [1], [0, 0]], (1, 2, 4),
                                       list(range(1, 20)), 8, runs=2, warmup=1)
  assert set(costs) == {1, 2, 4}
  assert len(prepares) == 3 and len(calls) == 2  # the two Medusa sizes, in their prepare only


def test_calibrate_picks_the_size_and_writes_a_loadable_tree(tiny_chat_dir, tmp_path, monkeypatch):
  config = _tiny_config(tiny_chat_dir)
  loaded = runtime.load(config)
  # Given accuracies and step costs: the selection, not the measurement, is under test here (the
  # product estimate; the joint one is checked by hand above).
  counts = np.array([[10, 0, 0], [6, 2, 2], [5, 1, 4]])
  monkeypatch.setattr(calibrate, "rank_counts", lambda *a, **k: counts)
  costs = {1: 0.010, 2: 0.012, 4: 0.014, 5: 0.020}
  monkeypatch.setattr(calibrate, "measure_step_costs", lambda cfg, hcfg, params, choices, sizes, *a, **k: {
      n: costs[n] for n in sizes})
  out = str(tmp_path / "cal" / "tree.json")
  res = calibrate.calibrate(config, loaded, num_nodes=0, max_nodes=5, num_prompts=2, max_new_tokens=4,
                            num_ranks=2, sizes=(1, 2, 4), out=out, estimate="product")
  assert res["meta"]["num_nodes"] == 4 and res["choices"] == [[0], [0, 0], [1]]
  buf = tree.resolve(out, num_heads=2)
  assert buf.num_nodes == 4 and buf.choices == ((0,), (1,), (0, 0))
  with open(out) as f:
    meta = json.load(f)
  np.testing.assert_allclose(meta["head_accuracy"], [[0.6, 0.2], [0.5, 0.1]])
  np.testing.assert_allclose(meta["head_topk_accuracy"], [[0.6, 0.8], [0.5, 0.6]])
  np.testing.assert_allclose(meta["expected_tokens_per_step"], [1.0, 1.6, 1.9, 2.1, 2.2])
  assert set(meta["step_ms"]) == {"1", "2", "4", "5"} and meta["best_measured_nodes"] == 4
  assert (tmp_path / "cal" / "tree.png").exists()

  # An explicit size is written as asked, even when another measures better.
  res = calibrate.calibrate(config, loaded, num_nodes=2, num_prompts=2, max_new_tokens=4, num_ranks=2,
                            sizes=(1, 2), out=out, plot=False, estimate="product")
  assert res["meta"]["num_nodes"] == 2 and tree.resolve(out).num_nodes == 2


def test_calibrate_end_to_end_on_a_tiny_model(tiny_chat_dir, tmp_path):
  config = _tiny_config(tiny_chat_dir)
  loaded = runtime.load(config, heads="random")
  out = str(tmp_path / "tree.json")
  res = calibrate.calibrate(config, loaded, num_nodes=0, max_nodes=3, num_prompts=3, max_new_tokens=6,
                            num_ranks=4, batch_size=2, sizes=(1, 2), runs=2, out=out, plot=False)
  meta = res["meta"]
  assert meta["backbone_top1"] == 1.0
  assert meta["calibration"]["prompts"] == 3
  assert sorted(int(n) for n in meta["step_ms"]) == [1, 2, 3]
  assert meta["num_nodes"] in (2, 3)
  assert np.asarray(meta["head_accuracy"]).shape == (2, 4)
  buf = tree.resolve(out, num_heads=2)
  assert buf.num_nodes == meta["num_nodes"]


def test_top1_given_path_by_hand():
  ranks = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
  # head 1: 3/4; head 2 where head 1 right (rows 0, 1, 3): 2/3; head 3 where both right (rows 0, 3): 1/2.
  np.testing.assert_allclose(calibrate.top1_given_path(ranks), [0.75, 2 / 3, 0.5])
