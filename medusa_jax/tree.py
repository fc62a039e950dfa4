"""Static Medusa tree buffers, built once in NumPy from a choice list.

A tree is a list of paths such as ``[[0], [0, 0], [1], [0, 1]]``: element i of a path is the 0-based
top-k rank taken from Medusa head i+1. The root (node 0) is the backbone's own next token and is
implicit. Everything tree attention, candidate gathering and verification need depends only on this
list, so it is computed here once and closed over as constants by the jitted decode step.

Node order
  Node 0 is the root; node i+1 is ``choices[i]`` where ``choices`` is the input sorted canonically
  (by length, then lexicographically). A parent therefore always precedes its children, all nodes of
  depth d precede those of depth d+1, and the children of a node are contiguous and in rank order.

Flat candidate vector
  The decode step concatenates ``[root, top-k of head 1, top-k of head 2, ...]`` where head i+1
  contributes ``segment_topk[i]`` tokens; ``tree_indices`` gathers the N tree tokens from it.

Shape letters as in the package docstring: N tree nodes, C candidate (root-to-leaf) paths; below
P = depth + 1 is the padded path length, R the ranks an accuracy table covers.
"""

from __future__ import annotations

import dataclasses
import heapq
import importlib.resources
import json
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np

Choices = tuple[tuple[int, ...], ...]

_SPEC_FORMS = ("a packaged name ({names}), 'chain:N' (N >= 1), 'dense:k,d' (k, d >= 1), "
               "or a path to a JSON file holding a list of paths or an object with key 'choices'")


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class TreeBuffers:
  """The NumPy constants of one tree. Build it with ``build``; the arrays are read-only.

  Equality and hashing use ``(choices, segment_topk)`` (the arrays are functions of those), so an
  instance can be a ``jax.jit`` static argument.

  Attributes:
    choices: canonically sorted paths; node i+1 is ``choices[i]``.
    num_nodes: N = len(choices) + 1 (the root included): tokens fed per verification.
    depth: longest path length, i.e. the number of Medusa heads the tree needs.
    topk: per head (length ``depth``): 1 + the largest rank the tree uses at that position.
    segment_topk: per head: how many top-k tokens of head i+1 sit in the flat candidate vector;
      equals ``topk`` unless ``build`` got ``flat_topk``.
    num_candidates: length of the flat candidate vector, 1 + sum(segment_topk).
    attn_mask: [N, N] bool; row i is True on node i and its ancestors (the root is everyone's).
    depths: [N] int32; root 0, node with a length-d path d. Position id = prefix length + depth.
    tree_indices: [N] int32; index of each node into the flat candidate vector. A node whose path
      has length d and last rank r maps to 1 + sum(segment_topk[:d-1]) + r; the root maps to 0.
    paths: [C, P] int32; node indices from the root (column 0, always 0) to each leaf, padded with 0
      (a real node index, so gathers stay in bounds; use ``path_valid``). Leaves are in reverse node
      order (deepest, lexicographically last first), the original release's "retrieve indices" order.
    path_valid: [C, P] bool; False exactly on the padding.
    path_lengths: [C] int32; valid entries per path, root included (= leaf depth + 1).
    parent: [N] int32; parent node of each node; -1 for the root (never use it as an index).
    rank: [N] int32; the node's rank among its parent's head top-k (last path element); -1 for
      the root.
    children: [N, W] int32; children of each node in increasing rank, padded with 0; W is the largest
      number of children any node has.
    children_valid: [N, W] bool; False on the padding.
    num_children: [N] int32.
    ancestors: [N, depth + 1] int32; ``ancestors[i, j]`` is node i's ancestor at depth j (itself at
      its own depth, the root at depth 0), padded with 0 beyond its depth.
    level_parents: per depth d = 1..depth, the nodes of depth d-1 that have children, in node order:
      sequential heads draft level d by evaluating head d once per such node (batched).
    parent_slot: [N] int32; the index of each node's parent in ``level_parents`` of the node's
      depth (so a depth-d node's token is rank ``rank[i]`` of head d's top-k at that parent); -1 for
      the root.
  """

  choices: Choices
  num_nodes: int
  depth: int
  topk: tuple[int, ...]
  segment_topk: tuple[int, ...]
  num_candidates: int
  attn_mask: np.ndarray
  depths: np.ndarray
  tree_indices: np.ndarray
  paths: np.ndarray
  path_valid: np.ndarray
  path_lengths: np.ndarray
  parent: np.ndarray
  rank: np.ndarray
  children: np.ndarray
  children_valid: np.ndarray
  num_children: np.ndarray
  ancestors: np.ndarray
  level_parents: tuple[np.ndarray, ...]
  parent_slot: np.ndarray

  @property
  def num_heads_needed(self) -> int:
    return self.depth

  @property
  def num_paths(self) -> int:
    return int(self.paths.shape[0])

  def _key(self) -> tuple[Choices, tuple[int, ...]]:
    return (self.choices, self.segment_topk)

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, TreeBuffers):
      return NotImplemented
    return self._key() == other._key()

  def __hash__(self) -> int:
    return hash(self._key())

  def __repr__(self) -> str:
    return (f"TreeBuffers(num_nodes={self.num_nodes}, depth={self.depth}, topk={self.topk}, "
            f"segment_topk={self.segment_topk}, num_paths={self.num_paths})")


def _canonical(choices: Any) -> Choices:
  """Validates the structure of a choice list and returns it sorted as tuples."""
  if isinstance(choices, (str, bytes)) or not isinstance(choices, Iterable):
    raise ValueError(f"tree choices must be a list of paths (lists of ints), got {choices!r}")
  paths = []
  for path in choices:
    if isinstance(path, (str, bytes)) or not isinstance(path, Iterable):
      raise ValueError(f"tree path {path!r} is not a list of ints")
    path = list(path)
    if not path:
      raise ValueError("empty tree path []: the root is implicit, list only the nodes below it")
    for r in path:
      # bool is an int subclass; a True in a path is almost surely a bug upstream.
      if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)):
        raise ValueError(f"tree path {path!r} holds a non-integer rank {r!r}")
      if r < 0:
        raise ValueError(f"tree path {path!r} has a negative rank {int(r)}")
    paths.append(tuple(int(r) for r in path))
  if not paths:
    raise ValueError("empty tree choice list: give at least one path, e.g. [[0]]")
  seen = set()
  for p in paths:
    if p in seen:
      raise ValueError(f"duplicate tree path {list(p)}")
    seen.add(p)
  for p in paths:
    if len(p) > 1 and p[:-1] not in seen:
      raise ValueError(f"tree path {list(p)} has no parent: its prefix {list(p[:-1])} is missing")
  return tuple(sorted(paths, key=lambda p: (len(p), p)))


def _readonly(a: np.ndarray) -> np.ndarray:
  # The instance hashes by its choices; frozen arrays keep that honest.
  a.setflags(write=False)
  return a


def build(choices: Sequence[Sequence[int]], num_heads: int | None = None,
          flat_topk: int | None = None, max_topk: int | None = None) -> TreeBuffers:
  """Builds the tree buffers of a choice list.

  Args:
    choices: paths below the implicit root, in any order.
    num_heads: Medusa heads available (M); a deeper tree is an error. None skips the check.
    flat_topk: if set, every head contributes this many tokens to the flat candidate vector
      (the original release's fixed top-k); by default head i+1 contributes ``topk[i]``.
    max_topk: how many ranks the heads can provide (e.g. the vocabulary size); a rank or
      ``flat_topk`` beyond it is an error. None skips the check.

  Raises:
    ValueError: on an empty list, an empty or non-integer path, a negative rank, a duplicate path,
      a path whose prefix is missing, depth > num_heads, or ranks beyond max_topk / flat_topk.
  """
  canon = _canonical(choices)
  depth = max(len(p) for p in canon)
  if num_heads is not None:
    if num_heads < 1:
      raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if depth > num_heads:
      raise ValueError(f"tree depth {depth} exceeds the {num_heads} Medusa heads; use a shallower "
                       f"tree or a model with more heads")
  topk = tuple(1 + max(p[i] for p in canon if len(p) > i) for i in range(depth))
  if max_topk is not None and max(topk) > max_topk:
    worst = max(canon, key=max)
    raise ValueError(f"tree path {list(worst)} uses rank {max(worst)} but the heads provide only "
                     f"max_topk={max_topk} ranks")
  if flat_topk is not None:
    if flat_topk < max(topk):
      raise ValueError(f"flat_topk={flat_topk} is smaller than the tree needs: per-head top-k {topk}")
    if max_topk is not None and flat_topk > max_topk:
      raise ValueError(f"flat_topk={flat_topk} exceeds max_topk={max_topk}")
    segment_topk = (int(flat_topk),) * depth
  else:
    segment_topk = topk
  offsets = np.concatenate([[1], 1 + np.cumsum(segment_topk)]).astype(np.int64)

  n = len(canon) + 1
  node_of = {(): 0}
  for i, p in enumerate(canon):
    node_of[p] = i + 1
  nodes = ((),) + canon

  depths = np.array([len(p) for p in nodes], np.int32)
  parent = np.array([-1] + [node_of[p[:-1]] for p in canon], np.int32)
  rank = np.array([-1] + [p[-1] for p in canon], np.int32)
  tree_indices = np.array([0] + [offsets[len(p) - 1] + p[-1] for p in canon], np.int32)

  attn_mask = np.zeros((n, n), bool)
  for i, p in enumerate(nodes):
    for d in range(len(p) + 1):
      attn_mask[i, node_of[p[:d]]] = True

  kids = [[] for _ in range(n)]
  for i in range(1, n):  # node order already puts siblings in rank order
    kids[parent[i]].append(i)
  width = max(len(k) for k in kids)
  children = np.zeros((n, width), np.int32)
  children_valid = np.zeros((n, width), bool)
  for i, k in enumerate(kids):
    children[i, :len(k)] = k
    children_valid[i, :len(k)] = True
  num_children = np.array([len(k) for k in kids], np.int32)

  # Reverse node order, as the release's retrieve indices: deepest (then lexicographically last)
  # leaves come first. Verification is order-independent up to tie-breaking, so keeping the
  # original's order keeps tie-breaks identical to it.
  leaves = [i for i in range(n - 1, 0, -1) if num_children[i] == 0]
  paths = np.zeros((len(leaves), depth + 1), np.int32)
  path_valid = np.zeros((len(leaves), depth + 1), bool)
  for c, leaf in enumerate(leaves):
    p = nodes[leaf]
    row = [node_of[p[:d]] for d in range(len(p) + 1)]
    paths[c, :len(row)] = row
    path_valid[c, :len(row)] = True
  path_lengths = path_valid.sum(axis=1).astype(np.int32)

  ancestors = np.zeros((n, depth + 1), np.int32)
  for i, p in enumerate(nodes):
    ancestors[i, :len(p) + 1] = [node_of[p[:d]] for d in range(len(p) + 1)]
  level_parents = tuple(np.array(sorted({int(parent[i]) for i in range(1, n) if depths[i] == d}), np.int32)
                        for d in range(1, depth + 1))
  parent_slot = np.full((n,), -1, np.int32)
  for i in range(1, n):
    parent_slot[i] = int(np.searchsorted(level_parents[depths[i] - 1], parent[i]))

  return TreeBuffers(
      choices=canon, num_nodes=n, depth=depth, topk=topk, segment_topk=segment_topk,
      num_candidates=int(offsets[-1]), attn_mask=_readonly(attn_mask),
      depths=_readonly(depths), tree_indices=_readonly(tree_indices), paths=_readonly(paths),
      path_valid=_readonly(path_valid), path_lengths=_readonly(path_lengths),
      parent=_readonly(parent), rank=_readonly(rank), children=_readonly(children),
      children_valid=_readonly(children_valid), num_children=_readonly(num_children),
      ancestors=_readonly(ancestors), level_parents=tuple(_readonly(a) for a in level_parents),
      parent_slot=_readonly(parent_slot))


# ---------------------------------------------------------------------------------------------
# Named trees and files
# ---------------------------------------------------------------------------------------------


def _trees_dir():
  return importlib.resources.files(__package__ or "medusa_jax").joinpath("trees")


def packaged_names() -> list[str]:
  """Names of the trees shipped in ``medusa_jax/trees``."""
  return sorted(f.name[:-len(".json")] for f in _trees_dir().iterdir() if f.name.endswith(".json"))


def _choices_from_json(obj: Any, where: str) -> list[list[int]]:
  if isinstance(obj, dict):
    if "choices" not in obj:
      raise ValueError(f"{where}: a JSON object must hold the paths under key 'choices'")
    obj = obj["choices"]
  if not isinstance(obj, list):
    raise ValueError(f"{where}: expected a list of paths, got {type(obj).__name__}")
  return [list(p) if isinstance(p, list) else p for p in obj]


def _positive_ints(text: str, spec: str) -> list[int]:
  try:
    vals = [int(v) for v in text.split(",")]
  except ValueError:
    vals = []
  if not vals or any(v < 1 for v in vals):
    raise ValueError(f"bad tree spec {spec!r}: expected positive integers after the colon")
  return vals


def named_choices(spec: str | os.PathLike | Sequence[Sequence[int]]) -> list[list[int]]:
  """The choice list of a tree spec.

  Specs: a packaged name (``mc_sim_7b_63``); ``chain:N`` (one path of rank-0 tokens N deep,
  i.e. [[0], [0, 0], ...]); ``dense:k,d`` (every path of ranks < k up to depth d: k + k^2 + ... + k^d
  nodes); a path to a JSON file holding a list of paths or an object with key ``choices`` (what
  ``save_choices`` writes). A list of paths is returned as is (as lists).
  """
  if not isinstance(spec, (str, os.PathLike)):
    return [list(p) for p in spec]
  text = os.fspath(spec)
  if text in packaged_names():
    f = _trees_dir().joinpath(f"{text}.json")
    return _choices_from_json(json.loads(f.read_text()), f"packaged tree {text!r}")
  m = re.fullmatch(r"chain:(.*)", text)
  if m:
    vals = _positive_ints(m.group(1), text)
    if len(vals) != 1:
      raise ValueError(f"bad tree spec {text!r}: expected 'chain:N' with N >= 1")
    n = vals[0]
    return [[0] * d for d in range(1, n + 1)]
  m = re.fullmatch(r"dense:(.*)", text)
  if m:
    vals = _positive_ints(m.group(1), text)
    if len(vals) != 2:
      raise ValueError(f"bad tree spec {text!r}: expected 'dense:k,d' with k, d >= 1")
    k, d = vals
    out = []
    for length in range(1, d + 1):
      out.extend(list(map(int, p)) for p in np.ndindex(*(k,) * length))
    return out
  if os.path.isfile(text):
    with open(text) as fh:
      try:
        obj = json.load(fh)
      except json.JSONDecodeError as e:
        raise ValueError(f"tree file {text!r} is not valid JSON: {e}") from e
    return _choices_from_json(obj, f"tree file {text!r}")
  forms = _SPEC_FORMS.format(names=", ".join(packaged_names()))
  raise ValueError(f"unknown tree {text!r} (no such packaged tree or file); valid forms: {forms}")


def resolve(name_or_path: str | os.PathLike | Sequence[Sequence[int]], num_heads: int | None = None,
            flat_topk: int | None = None, max_topk: int | None = None) -> TreeBuffers:
  """``build(named_choices(name_or_path), ...)``; see both for the specs and checks."""
  return build(named_choices(name_or_path), num_heads=num_heads, flat_topk=flat_topk,
               max_topk=max_topk)


def _json_default(o: Any) -> Any:
  # Calibration metadata naturally carries NumPy scalars and arrays.
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f"cannot write {type(o).__name__} to a tree file")


def save_choices(path: str | os.PathLike, choices: Sequence[Sequence[int]],
                 meta: dict[str, Any] | None = None) -> None:
  """Writes ``{"choices": [...], **meta}`` as JSON, loadable by ``resolve(path)``.

  The choices keep the given order (``grow_tree``'s order is meaningful: its first n-1 paths are
  the greedy tree of n nodes). They are validated first so a bad tree never reaches disk.
  """
  meta = dict(meta or {})
  if "choices" in meta:
    raise ValueError("meta must not hold a 'choices' key")
  _canonical(choices)
  rows = [[int(r) for r in p] for p in choices]
  obj = {"choices": rows, **meta}
  parent_dir = os.path.dirname(os.fspath(path))
  if parent_dir:
    os.makedirs(parent_dir, exist_ok=True)
  with open(path, "w") as fh:
    json.dump(obj, fh, default=_json_default)
    fh.write("\n")


# ---------------------------------------------------------------------------------------------
# Optimised tree (paper's calibration)
# ---------------------------------------------------------------------------------------------


def grow_tree(accuracy_MxR: np.ndarray, num_nodes: int, ranks_NxM: np.ndarray | None = None
              ) -> tuple[list[list[int]], list[float]]:
  """Grows the tree of ``num_nodes`` nodes (root included) that greedily maximises acceptance.

  ``accuracy_MxR[k, r]`` is how often head k+1's rank-r token equals the token generated k+2
  steps later. A node's value is the product of the accuracies along its path, i.e. (assuming
  heads err independently) the probability that the whole path is accepted, so the expected
  accepted length of a tree is 1 (the backbone's own token) + the sum of its node values.

  With ``ranks_NxM`` (the rank of the right token under each head at N measured positions, any
  value >= R for a miss) a node's value is instead the measured frequency of its whole path: the
  fraction of positions where head i's right token had rank ``path[i]`` for every i. Heads do not
  err independently (when head 1 is right, head 2 is right far more often than on average), so
  the product underrates deep paths and grows trees that are too wide and shallow.

  Starting from the root, each step adds the most valuable node among the next sibling and the
  first child of every chosen node. Ties go to the shorter, then lexicographically smaller path,
  so the result is deterministic.

  Returns:
    (choices, expected_lengths): the ``num_nodes - 1`` paths in the order they were added (any
    prefix of that list is itself the greedy tree of that size), and the expected accepted length
    after each addition.
  """
  acc = np.asarray(accuracy_MxR, dtype=np.float64)
  if acc.ndim != 2 or acc.shape[0] < 1 or acc.shape[1] < 1:
    raise ValueError(f"accuracy must be a non-empty [M, R] array, got shape {acc.shape}")
  if not np.all(np.isfinite(acc)) or acc.min() < 0 or acc.max() > 1:
    raise ValueError("accuracy entries must be finite probabilities in [0, 1]")
  num_heads, num_ranks = acc.shape
  if num_nodes < 2:
    raise ValueError(f"num_nodes counts the root and must be >= 2, got {num_nodes}")

  if ranks_NxM is not None:
    ranks = np.asarray(ranks_NxM)
    if ranks.ndim != 2 or ranks.shape[1] != num_heads or not len(ranks):
      raise ValueError(f"ranks must be a non-empty [N, {num_heads}] array, got shape {ranks.shape}")

    def value_of(path):
      return float(np.mean(np.all(ranks[:, :len(path)] == np.asarray(path), axis=1)))
  else:
    def value_of(path):
      return float(np.prod([acc[i, r] for i, r in enumerate(path)]))

  frontier = [(-value_of((0,)), 1, (0,))]
  choices, lengths, total = [], [], 1.0
  while len(choices) < num_nodes - 1:
    if not frontier:
      raise ValueError(f"num_nodes={num_nodes} exceeds the {len(choices) + 1} nodes an "
                       f"[{num_heads}, {num_ranks}] accuracy table can place")
    neg_value, _, path = heapq.heappop(frontier)
    choices.append(list(path))
    total += -neg_value
    lengths.append(total)
    grown = []
    if path[-1] + 1 < num_ranks:
      grown.append(path[:-1] + (path[-1] + 1,))
    if len(path) < num_heads:
      grown.append(path + (0,))
    for p in grown:
      # Each node enters the frontier once: from its previous sibling or (rank 0) from its parent.
      heapq.heappush(frontier, (-value_of(p), len(p), p))
  return choices, lengths
