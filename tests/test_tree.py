"""Tests of the static tree buffers (medusa_jax/tree.py): NumPy only, fast."""

import collections
import hashlib
import json

import numpy as np
import pytest

from medusa_jax import tree

WORKED = [[0], [0, 0], [0, 1], [0, 2], [1], [1, 0], [1, 1], [1, 2]]


def _ancestors_from_paths(buf):
  """Node -> set of itself and its ancestors, read off the root-to-leaf paths only."""
  anc = {}
  for row, valid in zip(buf.paths, buf.path_valid):
    nodes = [int(x) for x, v in zip(row, valid) if v]
    for i, node in enumerate(nodes):
      anc.setdefault(node, set()).update(nodes[:i + 1])
  return anc


# ----- worked example: the 8-path tree with top-k 10, buffers computed by hand ------------------


def test_worked_example_flat_topk():
  buf = tree.build(WORKED, flat_topk=10)
  assert buf.num_nodes == 9 and buf.depth == 2
  np.testing.assert_array_equal(buf.tree_indices, [0, 1, 2, 11, 12, 13, 11, 12, 13])
  np.testing.assert_array_equal(buf.depths, [0, 1, 1, 2, 2, 2, 2, 2, 2])
  np.testing.assert_array_equal(buf.paths, [[0, 2, 8], [0, 2, 7], [0, 2, 6],
                                            [0, 1, 5], [0, 1, 4], [0, 1, 3]])
  assert buf.path_valid.all()
  np.testing.assert_array_equal(buf.path_lengths, [3] * 6)
  assert buf.segment_topk == (10, 10) and buf.num_candidates == 21
  assert buf.topk == (2, 3)


def test_worked_example_per_head_topk():
  buf = tree.build(WORKED)
  assert buf.topk == (2, 3) and buf.segment_topk == (2, 3) and buf.num_heads_needed == 2
  # Flat vector [root, head1 top-2, head2 top-3]: depth-2 nodes start at 1 + 2.
  np.testing.assert_array_equal(buf.tree_indices, [0, 1, 2, 3, 4, 5, 3, 4, 5])
  assert buf.num_candidates == 6


def test_node_order_parent_rank_children():
  buf = tree.build(list(reversed(WORKED)))  # input order must not matter
  assert buf.choices == ((0,), (1,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2))
  np.testing.assert_array_equal(buf.parent, [-1, 0, 0, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(buf.rank, [-1, 0, 1, 0, 1, 2, 0, 1, 2])
  np.testing.assert_array_equal(buf.num_children, [2, 3, 3, 0, 0, 0, 0, 0, 0])
  assert buf.children.shape == (9, 3)
  np.testing.assert_array_equal(buf.children[:3], [[1, 2, 0], [3, 4, 5], [6, 7, 8]])
  np.testing.assert_array_equal(buf.children_valid[0], [True, True, False])
  assert not buf.children_valid[3:].any() and not buf.children[3:].any()


def test_hashable_and_read_only():
  a, b = tree.build(WORKED), tree.build(list(reversed(WORKED)))
  assert a == b and hash(a) == hash(b) and len({a, b}) == 1
  assert a != tree.build(WORKED, flat_topk=10)  # same tree, different gather indices
  assert a != tree.build(WORKED[:4])
  with pytest.raises(ValueError):
    a.tree_indices[0] = 1


# ----- packaged default ------------------------------------------------------------------------


def test_mc_sim_7b_63():
  buf = tree.resolve("mc_sim_7b_63", num_heads=5)
  assert buf.num_nodes == 64 and buf.depth == 4
  counts = collections.Counter(int(d) for d in buf.depths[1:])
  assert counts == {1: 10, 2: 28, 3: 23, 4: 2}
  assert buf.num_paths == 42 and buf.paths.shape == (42, 5)
  assert buf.topk == (10, 10, 10, 2)
  # The release's list, unchanged and in its own order: the SHA-256 of its JSON (json.dumps of the
  # list of 63 paths) as taken from FasterDecoding/Medusa's medusa_choices.py.
  choices = tree.named_choices("mc_sim_7b_63")
  assert choices[:4] == [[0], [0, 0], [1], [0, 1]]
  assert hashlib.sha256(json.dumps(choices).encode()).hexdigest() == (
      "35c38d3c9cde7957c18de9f5cca50aa9fd3b3947479a0f171412e87b7c3ad3d6")
  assert "mc_sim_7b_63" in tree.packaged_names()


@pytest.mark.parametrize("spec", ["mc_sim_7b_63", "dense:3,3", "chain:4"])
def test_attn_mask_is_ancestor_set(spec):
  buf = tree.resolve(spec)
  anc = _ancestors_from_paths(buf)
  assert sorted(anc) == list(range(buf.num_nodes))  # every node lies on some path
  for i in range(buf.num_nodes):
    assert set(np.flatnonzero(buf.attn_mask[i])) == anc[i], i
  # Node order puts ancestors first, so the mask is lower triangular.
  assert not np.triu(buf.attn_mask, 1).any()


@pytest.mark.parametrize("spec", ["mc_sim_7b_63", "dense:2,3"])
def test_tree_indices_invert_paths(spec):
  buf = tree.resolve(spec)
  flat = [()]  # the path each flat-candidate slot stands for at its depth: (depth, rank)
  for d, k in enumerate(buf.segment_topk):
    flat.extend((d + 1, r) for r in range(k))
  assert len(flat) == buf.num_candidates
  for node, p in enumerate(((),) + buf.choices):
    expect = () if not p else (len(p), p[-1])
    assert flat[buf.tree_indices[node]] == expect
    assert buf.depths[node] == len(p)


# ----- padding ---------------------------------------------------------------------------------


def test_paths_padding():
  buf = tree.build([[0], [1], [0, 0], [0, 0, 0], [2]])
  # Nodes: 1=[0] 2=[1] 3=[2] 4=[0,0] 5=[0,0,0]; leaves in reverse node order: 5, 3, 2.
  np.testing.assert_array_equal(buf.paths, [[0, 1, 4, 5], [0, 3, 0, 0], [0, 2, 0, 0]])
  np.testing.assert_array_equal(buf.path_valid, [[True, True, True, True],
                                                 [True, True, False, False],
                                                 [True, True, False, False]])
  np.testing.assert_array_equal(buf.path_lengths, [4, 2, 2])
  assert (buf.paths[~buf.path_valid] == 0).all()


# ----- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("choices, kwargs, match", [
    ([], {}, "empty tree choice list"),
    ([[]], {}, "empty tree path"),
    ([[0], [0]], {}, r"duplicate tree path \[0\]"),
    ([[0], [0, 1, 0]], {}, r"prefix \[0, 1\] is missing"),
    ([[0], [-1]], {}, "negative rank -1"),
    ([[0], [0.5]], {}, "non-integer rank"),
    ([[0], [0, 0], [0, 0, 0]], {"num_heads": 2}, "tree depth 3 exceeds the 2 Medusa heads"),
    ([[0], [4]], {"max_topk": 4}, r"uses rank 4 .* max_topk=4"),
    ([[0], [3]], {"flat_topk": 2}, r"flat_topk=2 is smaller"),
    ([[0]], {"flat_topk": 8, "max_topk": 4}, r"flat_topk=8 exceeds max_topk=4"),
    ("chain:3", {}, "must be a list of paths"),
])
def test_build_errors(choices, kwargs, match):
  with pytest.raises(ValueError, match=match):
    tree.build(choices, **kwargs)


def test_build_limits_ok_at_the_boundary():
  buf = tree.build([[0], [3], [0, 0]], num_heads=2, max_topk=4, flat_topk=4)
  assert buf.segment_topk == (4, 4)


@pytest.mark.parametrize("spec, match", [
    ("nope", r"unknown tree 'nope'.*mc_sim_7b_63.*chain:N.*dense:k,d.*JSON"),
    ("chain:0", "bad tree spec"),
    ("chain:x", "bad tree spec"),
    ("chain:2,3", "chain:N"),
    ("dense:2", "dense:k,d"),
    ("dense:0,2", "bad tree spec"),
])
def test_spec_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    tree.named_choices(spec)


# ----- specs and files -------------------------------------------------------------------------


def test_chain_and_dense():
  chain = tree.resolve("chain:3")
  assert chain.choices == ((0,), (0, 0), (0, 0, 0))
  assert chain.num_nodes == 4 and chain.paths.shape == (1, 4)
  np.testing.assert_array_equal(chain.paths, [[0, 1, 2, 3]])
  np.testing.assert_array_equal(chain.tree_indices, [0, 1, 2, 3])
  dense = tree.resolve("dense:2,3")
  assert dense.num_nodes == 1 + 2 + 4 + 8 and dense.depth == 3 and dense.topk == (2, 2, 2)
  assert dense.paths.shape == (8, 4) and dense.path_valid.all()
  assert dense.children.shape == (15, 2)
  with pytest.raises(ValueError, match="exceeds the 2 Medusa heads"):
    tree.resolve("dense:2,3", num_heads=2)


def test_json_round_trip(tmp_path):
  choices = [[0], [0, 0], [1], [0, 1]]
  path = tmp_path / "sub" / "my_tree.json"
  tree.save_choices(path, choices, {"model": "x", "acc": np.float32(0.5)})
  obj = json.loads(path.read_text())
  assert obj["choices"] == choices and obj["model"] == "x" and obj["acc"] == 0.5
  assert tree.resolve(path) == tree.build(choices)
  assert tree.resolve(str(path), num_heads=2).num_nodes == 5
  plain = tmp_path / "plain.json"
  plain.write_text(json.dumps(choices))  # a bare list is accepted too
  assert tree.named_choices(plain) == choices
  with pytest.raises(ValueError, match="no parent"):
    tree.save_choices(tmp_path / "bad.json", [[0, 0]])
  with pytest.raises(ValueError, match="'choices'"):
    tree.save_choices(tmp_path / "bad.json", choices, {"choices": 1})
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"paths": choices}))
  with pytest.raises(ValueError, match="key 'choices'"):
    tree.resolve(bad)


# ----- optimised tree --------------------------------------------------------------------------


def test_grow_tree_hand_example():
  acc = np.array([[0.6, 0.2], [0.5, 0.1]])
  # Step 1: frontier {[0]: .6} -> add [0] (length 1.6).
  # Step 2: frontier {[1]: .2, [0,0]: .6*.5 = .3} -> add [0,0] (1.9).
  # Step 3: frontier {[1]: .2, [0,1]: .6*.1 = .06} ([0,0,0] would need a third head) -> add [1] (2.1).
  choices, lengths = tree.grow_tree(acc, num_nodes=4)
  assert choices == [[0], [0, 0], [1]]
  np.testing.assert_allclose(lengths, [1.6, 1.9, 2.1])
  # Every node of a 2x2 table: [0], [0,0], [1], [1,0] (.2*.5 = .1), [0,1] (.06), [1,1] (.02).
  choices, lengths = tree.grow_tree(acc, num_nodes=7)
  assert choices == [[0], [0, 0], [1], [1, 0], [0, 1], [1, 1]]
  np.testing.assert_allclose(lengths, [1.6, 1.9, 2.1, 2.2, 2.26, 2.28])
  with pytest.raises(ValueError, match="exceeds the 7 nodes"):
    tree.grow_tree(acc, num_nodes=8)


def test_grow_tree_joint_hand_example():
  """Measured path frequencies instead of products: heads that are right together grow a chain."""
  # 10 positions, ranks of the right token under heads 1 and 2 (2 = a miss, beyond the table).
  ranks = np.array([[0, 0]] * 4 + [[0, 2]] + [[1, 0]] + [[1, 2]] + [[2, 2]] * 3)
  acc = np.array([[0.5, 0.2], [0.5, 0.0]])  # the per-head (marginal) frequencies of the same data
  # Joint values: [0] .5, [0,0] .4, [1] .2, [1,0] .1, [0,1] 0, [1,1] 0.
  # The product would value [0,0] at .5 * .5 = .25 and [1,0] at .2 * .5 = .1.
  choices, lengths = tree.grow_tree(acc, num_nodes=5, ranks_NxM=ranks)
  assert choices == [[0], [0, 0], [1], [1, 0]]
  np.testing.assert_allclose(lengths, [1.5, 1.9, 2.1, 2.2])
  np.testing.assert_allclose(tree.grow_tree(acc, num_nodes=3)[1], [1.5, 1.75])
  with pytest.raises(ValueError, match=r"\[N, 2\]"):
    tree.grow_tree(acc, 3, ranks_NxM=np.zeros((4, 3), int))


def test_grow_tree_builds_and_is_greedy_optimal_prefix():
  rng = np.random.default_rng(0)
  acc = np.sort(rng.uniform(0, 0.8, size=(4, 10)), axis=1)[:, ::-1]
  choices, lengths = tree.grow_tree(acc, num_nodes=33)
  buf = tree.build(choices, num_heads=4, max_topk=10)
  assert buf.num_nodes == 33
  value = {(): 1.0}
  for p in buf.choices:
    value[p] = value[p[:-1]] * acc[len(p) - 1, p[-1]]
  assert lengths[-1] == pytest.approx(sum(value.values()))
  assert all(np.diff(lengths) >= 0)
  # Any prefix of the addition order is itself a valid tree.
  for n in (2, 5, 17):
    tree.build(choices[:n - 1])
  assert tree.grow_tree(acc, num_nodes=17)[0] == choices[:16]


def _prefix_closed_trees(universe, size):
  """Every set of ``size`` paths from ``universe`` that contains each of its paths' prefixes."""
  import itertools  # pylint: disable=g-import-not-at-top
  for combo in itertools.combinations(universe, size):
    chosen = set(combo)
    if all(p[:-1] in chosen or len(p) == 1 for p in chosen):
      yield chosen


def test_grow_tree_is_optimal_by_brute_force():
  """With ranks sorted by accuracy (as a head's top-k are), the greedy tree of every size has the
  largest expected length of all trees of that size: checked against every prefix-closed tree
  over 2 heads x 3 ranks (12 possible nodes)."""
  rng = np.random.default_rng(3)
  for trial in range(3):
    acc = np.sort(rng.uniform(0, 0.7, size=(2, 3)), axis=1)[:, ::-1]
    universe = [(a,) for a in range(3)] + [(a, b) for a in range(3) for b in range(3)]
    value = lambda p: float(np.prod([acc[i, r] for i, r in enumerate(p)]))
    for n in range(2, 9):
      choices, lengths = tree.grow_tree(acc, num_nodes=n)
      best = max(sum(value(p) for p in t) for t in _prefix_closed_trees(universe, n - 1))
      assert lengths[-1] == pytest.approx(1 + best), (trial, n)
      assert 1 + sum(value(tuple(p)) for p in choices) == pytest.approx(lengths[-1])


@pytest.mark.parametrize("acc, n, match", [
    (np.ones((2, 2)), 1, "must be >= 2"),
    (np.ones(3), 3, r"\[M, R\]"),
    (np.full((2, 2), 1.5), 3, r"\[0, 1\]"),
])
def test_grow_tree_errors(acc, n, match):
  with pytest.raises(ValueError, match=match):
    tree.grow_tree(acc, n)
