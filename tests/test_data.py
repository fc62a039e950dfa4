"""Tests of the data pipeline (medusa_jax/data.py): TFDS storage and the heldout split, grain batches."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from medusa_jax import bundled
from medusa_jax import chat
from medusa_jax import data
from medusa_jax import loader


@pytest.fixture(scope='module')
def tok():
  return bundled.smollm2_tokenizer()


def _conv(cid, *texts, first='human'):
  roles = itertools.cycle([first, 'gpt' if first == 'human' else 'human'])
  return {'id': cid, 'conversations': [{'from': r, 'value': t} for r, t in zip(roles, texts)]}


# --------------------------------------------------------------------------------------------------
# TFDS ArrayRecord dataset
# --------------------------------------------------------------------------------------------------

def _fake_conversations(n):
  words = 'alpha beta gamma delta epsilon zeta eta theta iota kappa'.split()
  convs = []
  for i in range(n):
    if i % 7 == 3:  # Unusable: no reply.
      convs.append(_conv(f'c{i}', 'a lonely question'))
      continue
    convs.append(_conv(f'c{i}', f'Tell me about {words[i % 10]} number {i}.',
                       ' '.join(words[(i + j) % 10] for j in range(i + 3)), 'More?', f'Yes {i}.'))
  return convs


def test_build_and_load_without_tensorflow(tmp_path, tok):
  convs = _fake_conversations(20)
  root = str(tmp_path / 'tfds')
  path = data.build_dataset(root, iter(convs), tok, name='fake', max_len=48, heldout_fraction=0.25,
                            progress_desc='')
  assert path.endswith('medusa_chat/fake/1.0.0')
  expected = {}
  for c in convs:
    ex = chat.render_example(tok, c, 48)
    if ex is not None:
      expected[c['id']] = ex
  seen = {}
  for split in ('train', 'heldout'):
    source = data.load_split(root, 'fake', split)
    assert len(source) > 0
    for i in range(len(source)):
      ex = source[i]
      cid = ex['id'].decode()
      assert ex['tokens'].dtype == np.int32 and ex['loss_mask'].dtype == np.int32
      np.testing.assert_array_equal(ex['tokens'], expected[cid]['tokens'])
      np.testing.assert_array_equal(ex['loss_mask'], expected[cid]['loss_mask'])
      assert (data._heldout_score(cid) < 0.25) == (split == 'heldout')
      seen[cid] = split
  assert set(seen) == set(expected)
  meta = data.dataset_metadata(root, 'fake')
  assert meta['settings']['max_len'] == 48 and meta['counts']['unusable'] == 3
  assert meta['counts']['train'] + meta['counts']['heldout'] == len(expected)
  assert 'tensorflow' not in sys.modules

  # Idempotent: the same settings reuse the files without touching the source.
  def exploding():
    raise AssertionError('source consumed')
    yield  # pylint: disable=unreachable
  assert data.build_dataset(root, exploding(), tok, name='fake', max_len=48,
                            heldout_fraction=0.25) == path
  with pytest.raises(ValueError, match='built with'):
    data.build_dataset(root, exploding(), tok, name='fake', max_len=64, heldout_fraction=0.25)

  # A tiny build still gets a heldout example; max_examples stops reading the source early.
  def counted():
    for i, c in enumerate(convs):
      assert i < 6, 'read past max_examples'
      yield c
  data.build_dataset(root, counted(), tok, name='tiny', max_len=48, heldout_fraction=0.02,
                     max_examples=4, progress_desc='')
  assert len(data.load_split(root, 'tiny', 'train')) == 3
  assert len(data.load_split(root, 'tiny', 'heldout')) == 1

  # A fresh interpreter reads the dataset; TensorFlow is neither imported nor (in this venv)
  # installed.
  code = ('import importlib.util, sys\n'
          'from medusa_jax import data\n'
          f'src = data.load_split({root!r}, "fake", "train")\n'
          'print(len(src), src[0]["tokens"].dtype, "tensorflow" in sys.modules,\n'
          '      importlib.util.find_spec("tensorflow") is not None)\n')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get('PYTHONPATH')])))
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  n_train = len(data.load_split(root, 'fake', 'train'))
  assert out.stdout.split() == [str(n_train), 'int32', 'False', 'False']


# --------------------------------------------------------------------------------------------------
# Batching with grain
# --------------------------------------------------------------------------------------------------

def _toy_source(n=37, seed=0):
  """Example i has tokens [1000*i + 1, ...] so every token names its example and position."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    length = int(rng.integers(2, 20))
    mask = (rng.random(length) < 0.6).astype(np.int32)
    out.append({'tokens': (1000 * i + 1 + np.arange(length)).astype(np.int32), 'loss_mask': mask,
                'id': f'x{i}'.encode()})
  return out


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_loader_unpacked_layout_and_determinism():
  src = _toy_source()
  kw = dict(batch_size=4, seq_len=16, seed=3)
  batches = _take(loader.make_loader(src, **kw), 12)  # Crosses an epoch boundary (37 examples).
  for b in batches:
    assert set(b) == {'tokens', 'loss_mask', 'segment_ids', 'positions', 'id'}
    for key in b:
      assert b[key].shape == (4, 16) and b[key].dtype == np.int32
    for row in range(4):
      ex = src[(b['tokens'][row, 0] - 1) // 1000]
      n = min(len(ex['tokens']), 16)
      np.testing.assert_array_equal(b['tokens'][row, :n], ex['tokens'][:n])
      np.testing.assert_array_equal(b['loss_mask'][row, :n], ex['loss_mask'][:n])
      np.testing.assert_array_equal(b['segment_ids'][row], np.arange(16) < n)
      np.testing.assert_array_equal(b['positions'][row], np.where(np.arange(16) < n, np.arange(16), 0))
      np.testing.assert_array_equal(b['id'][row], np.where(np.arange(16) < n, (b['tokens'][row, 0] - 1) // 1000 + 1, 0))
      assert not b['tokens'][row, n:].any() and not b['loss_mask'][row, n:].any()
  _assert_batches_equal(batches, _take(loader.make_loader(src, **kw), 12))
  other = _take(loader.make_loader(src, **(kw | {'seed': 4})), 12)
  assert any((x['tokens'] != y['tokens']).any() for x, y in zip(batches, other))
  # Unshuffled: source order.
  first = next(loader.make_loader(src, batch_size=4, seq_len=16, seed=0, shuffle=False))
  assert list((first['tokens'][:, 0] - 1) // 1000) == [0, 1, 2, 3]


def _example_ids(batches):
  return [int(t) // 1000 for b in batches for t in b['tokens'][:, 0]]


def test_loader_shards_are_disjoint_and_epochs_reshuffle():
  src = _toy_source(41)
  kw = dict(seq_len=8, seed=0, shard_count=3)
  # 41 // 3 = 13 examples per host and epoch, the same on every host.
  epoch_ids = {s: _example_ids(list(loader.make_loader(src, shard_index=s, num_epochs=1, batch_size=1,
                                                     **kw)))
               for s in range(3)}
  assert all(len(v) == 13 for v in epoch_ids.values())
  flat = [i for v in epoch_ids.values() for i in v]
  assert len(set(flat)) == 39
  # The second epoch is a new permutation, still disjoint across hosts.
  two = {s: _example_ids(list(loader.make_loader(src, shard_index=s, num_epochs=2, batch_size=1,
                                               **kw)))
         for s in range(3)}
  assert two[0][:13] == epoch_ids[0] and two[0][13:] != two[0][:13]
  second = [i for v in two.values() for i in v[13:]]
  assert len(second) == 39 and len(set(second)) == 39
  # Batches of a finite run: 26 examples per host make 8 full batches of 3.
  assert len(list(loader.make_loader(src, shard_index=2, num_epochs=2, batch_size=3, **kw))) == 8


def test_loader_packing():
  src = _toy_source(50)
  batches = _take(loader.make_loader(src, batch_size=3, seq_len=24, seed=1, pack=True), 10)
  n_segments = 0
  for b in batches:
    assert all(b[k].shape == (3, 24) and b[k].dtype == np.int32 for k in b)
    for row in range(3):
      seg, pos, toks, mask = (b[k][row] for k in ('segment_ids', 'positions', 'tokens', 'loss_mask'))
      pad = seg == 0
      assert not toks[pad].any() and not mask[pad].any() and not pos[pad].any()
      assert (np.diff(seg[~pad]) >= 0).all()
      for s in np.unique(seg[~pad]):
        idx = np.flatnonzero(seg == s)
        assert (np.diff(idx) == 1).all()
        np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
        ex = src[(toks[idx[0]] - 1) // 1000]
        np.testing.assert_array_equal(toks[idx], ex['tokens'][:len(idx)])
        np.testing.assert_array_equal(mask[idx], ex['loss_mask'][:len(idx)])
        assert len(idx) == min(len(ex['tokens']), 24)
        assert (b['id'][row][idx] == (toks[idx[0]] - 1) // 1000 + 1).all()
        n_segments += 1
  assert n_segments > 50  # Really packed: well above one example per row.
  _assert_batches_equal(
      batches, _take(loader.make_loader(src, batch_size=3, seq_len=24, seed=1, pack=True), 10))


@pytest.mark.parametrize('pack', [False, True])
def test_loader_checkpoint_resumes_exactly(pack):
  src = _toy_source(29)
  kw = dict(batch_size=3, seq_len=12, seed=7, pack=pack, shard_index=1, shard_count=2)
  it = loader.make_loader(src, **kw)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # Must survive a JSON checkpoint.
  expected = _take(it, 8)  # Crosses epoch boundaries (14 examples per host and epoch).
  fresh = loader.make_loader(src, **kw)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 8), expected)


def _ids(batch):
  return sorted(int(i) - 1 for i in np.unique(batch['id']) if i)


def test_loader_state_resumes_on_another_shard_count():
  """A position saved by 2 hosts ({'processes': [each host's state]}, as a checkpoint of several
  processes holds it) resumes on 1 host exactly where one host reading the same stream would be,
  and on the same 2 hosts each host gets its own state back."""
  src = _toy_source(40)
  kw = dict(seq_len=8, seed=5)
  hosts = [loader.make_loader(src, batch_size=2, shard_index=s, shard_count=2, **kw) for s in range(2)]
  seen = [_ids(b) for it in hosts for b in _take(it, 3)]
  saved = json.loads(json.dumps({'processes': [it.get_state() for it in hosts]}))
  one = loader.make_loader(src, batch_size=4, **kw)
  assert sorted(sum(seen, [])) == sorted(sum((_ids(b) for b in _take(one, 3)), []))
  resumed = loader.make_loader(src, batch_size=4, **kw)
  resumed.set_state(saved)
  _assert_batches_equal(_take(resumed, 9), _take(one, 9))  # across the epoch boundary (10 batches)
  again = loader.make_loader(src, batch_size=2, shard_index=1, shard_count=2, **kw)
  again.set_state(saved)
  _assert_batches_equal(_take(again, 4), _take(hosts[1], 4))
