"""Tests of ShareGPT streaming (medusa_jax/sharegpt.py): skipped and counted records, a truncated file."""

import itertools
import json

from medusa_jax import bundled
from medusa_jax import sharegpt


def _conv(cid, *texts, first='human'):
  roles = itertools.cycle([first, 'gpt' if first == 'human' else 'human'])
  return {'id': cid, 'conversations': [{'from': r, 'value': t} for r, t in zip(roles, texts)]}


def test_iter_sharegpt_skips_and_counts(tmp_path):
  good = [_conv(f'g{i}', f'question {i} ✓', f'answer {i} ' + 'x' * i) for i in range(5)]
  parts = [json.dumps(good[0]), '42', json.dumps({'id': 'nc'}),
           json.dumps({'id': 'empty', 'conversations': []}),
           json.dumps(_conv('alien', 'a', 'b') | {'conversations': [{'from': 'alien', 'value': 'a'}]}),
           json.dumps({'id': 'nv', 'conversations': [{'from': 'human', 'value': 3}]}),
           json.dumps(good[1]),
           '{"id": "broken", "conversations": [}',  # A syntax error in mid-file.
           json.dumps(good[2]), '{"id":]', json.dumps(good[3])]
  text = '[\n' + ',\n'.join(parts) + ',\n' + json.dumps(good[4], indent=2) + ']'
  path = tmp_path / 'ok.json'
  path.write_text(text, encoding='utf-8')
  for chunk in (3, 7, 1 << 20):  # Tiny chunks put record boundaries across reads.
    stats = {}
    out = list(sharegpt.iter_sharegpt(str(path), stats, chunk_chars=chunk))
    assert [r['id'] for r in out] == [f'g{i}' for i in range(5)], chunk
    assert out[0] == good[0]
    assert stats == {'records': 10, 'kept': 5, 'malformed': 7, 'truncated_tail': 0}, chunk

  cut = text[:text.index('"answer 4')]  # Truncated mid-record, as the bundled file is.
  path.write_text(cut, encoding='utf-8')
  stats = {}
  assert [r['id'] for r in sharegpt.iter_sharegpt(str(path), stats, chunk_chars=5)] == [
      f'g{i}' for i in range(4)]
  assert stats == {'records': 9, 'kept': 4, 'malformed': 7, 'truncated_tail': 1}

  for junk in ('', '{"not": "an array"}', '[', '[1, 2', '[]'):
    path.write_text(junk, encoding='utf-8')
    assert list(sharegpt.iter_sharegpt(str(path))) == []


def test_iter_sharegpt_streams_the_bundled_file():
  stats = {}
  it = sharegpt.iter_sharegpt(bundled.sharegpt_path(), stats)
  first = list(itertools.islice(it, 300))
  it.close()
  assert first[0]['id'] == 'QWJhYvA_0'
  assert len({r['id'] for r in first}) == 300
  assert all(t['from'] in sharegpt.ROLE_MAP for r in first for t in r['conversations'])
  assert stats['records'] <= 310
