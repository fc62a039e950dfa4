"""Tests of chat rendering (medusa_jax/chat.py): the assistant-only loss mask, unusable conversations."""

import itertools

import numpy as np
import pytest

from medusa_jax import bundled
from medusa_jax import chat
from medusa_jax import sharegpt

EOS = '<|im_end|>'


@pytest.fixture(scope='module')
def tok():
  return bundled.smollm2_tokenizer()


def _masked_runs(tokenizer, example):
  """Decoded text of each maximal run of masked tokens."""
  mask = np.asarray(example['loss_mask']).astype(bool)
  runs, start = [], None
  for i, m in enumerate(list(mask) + [False]):
    if m and start is None:
      start = i
    elif not m and start is not None:
      runs.append(tokenizer.decode(example['tokens'][start:i]))
      start = None
  return runs


def _conv(cid, *texts, first='human'):
  roles = itertools.cycle([first, 'gpt' if first == 'human' else 'human'])
  return {'id': cid, 'conversations': [{'from': r, 'value': t} for r, t in zip(roles, texts)]}


def test_loss_mask_is_exactly_the_assistant_replies(tok):
  conv = _conv('a', 'Hi there, who are you?', 'I am SmolLM.\n\nNice to meet you!',
               'Write 2+2 in Python.', '```python\nprint(2 + 2)\n```', 'Merci ! ça va ?', 'Oui, très bien.')
  ex = chat.render_example(tok, conv, max_len=4096)
  assert ex['tokens'].dtype == np.int32 and ex['loss_mask'].dtype == np.int32
  replies = [t['value'] for t in conv['conversations'][1::2]]
  assert _masked_runs(tok, ex) == [r + EOS for r in replies]
  # Everything unmasked is template or user text: removing the replies from the full text leaves
  # exactly the unmasked tokens' text.
  unmasked = tok.decode(ex['tokens'][ex['loss_mask'] == 0])
  full = tok.decode(ex['tokens'])
  for r in replies:
    full = full.replace(r + EOS, '', 1)
  assert unmasked == full
  assert '<|im_start|>assistant\n' in unmasked and 'Hi there' in unmasked


def test_system_turn_and_leading_assistant_turn(tok):
  conv = {'id': 's', 'conversations': [
      {'from': 'system', 'value': 'Answer briefly.'}, {'from': 'gpt', 'value': 'orphan reply'},
      {'from': 'human', 'value': 'Capital of France?'}, {'from': 'gpt', 'value': 'Paris.'}]}
  ex = chat.render_example(tok, conv, max_len=512)
  text = tok.decode(ex['tokens'])
  assert text.startswith('<|im_start|>system\nAnswer briefly.<|im_end|>')
  assert 'orphan' not in text
  assert _masked_runs(tok, ex) == ['Paris.' + EOS]
  # Without a system turn the template's default one is used, and never masked.
  ex = chat.render_example(tok, _conv('n', 'Capital of France?', 'Paris.'), max_len=512)
  assert 'SmolLM' in tok.decode(ex['tokens']) and _masked_runs(tok, ex) == ['Paris.' + EOS]


def test_openai_style_messages_and_odd_whitespace(tok):
  messages = [{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': '  y z\n'}]
  ex = chat.render_example(tok, messages, max_len=512)
  runs = _masked_runs(tok, ex)
  # A token straddling the header/reply boundary stays unmasked: the mask only ever lies inside.
  assert len(runs) == 1 and ('  y z\n' + EOS).endswith(runs[0]) and runs[0].endswith('y z\n' + EOS)


def test_unusable_conversations_and_truncation(tok):
  assert chat.render_example(tok, _conv('u', 'only a question'), 512) is None
  assert chat.render_example(tok, _conv('g', 'reply', first='gpt'), 512) is None
  assert chat.render_example(tok, _conv('e', 'q', '   '), 512) is None
  assert chat.render_example(tok, {'conversations': [{'from': 'alien', 'value': 'x'}]}, 512) is None
  # Non-alternating turns: keep the alternating prefix.
  conv = {'conversations': [{'from': 'human', 'value': 'a'}, {'from': 'gpt', 'value': 'b'},
                            {'from': 'gpt', 'value': 'c'}]}
  assert _masked_runs(tok, chat.render_example(tok, conv, 512)) == ['b' + EOS]
  long = _conv('l', 'question ' * 50, 'answer ' * 200)
  ex = chat.render_example(tok, long, max_len=100)
  assert len(ex['tokens']) == 100 and ex['loss_mask'][-1] == 1
  # The prompt alone fills max_len: nothing to learn.
  assert chat.render_example(tok, long, max_len=40) is None


def test_first_user_prompt():
  assert chat.first_user_prompt(_conv('a', 'hello', 'hi')) == 'hello'
  assert chat.first_user_prompt(_conv('b', 'r', 'q2', 'r2', first='gpt')) == 'q2'
  assert chat.first_user_prompt([{'role': 'system', 'content': 's'},
                                 {'role': 'user', 'content': 'u'}]) == 'u'
  assert chat.first_user_prompt({'conversations': []}) is None


def test_real_sharegpt_masks(tok):
  stats = {}
  records = list(itertools.islice(sharegpt.iter_sharegpt(bundled.sharegpt_path(), stats), 40))
  assert len(records) == 40 and stats['kept'] == 40
  n_checked = 0
  for record in records:
    messages = chat.to_messages(record)
    ex = chat.render_example(tok, record, max_len=1024)
    if ex is None:
      continue
    replies = [m['content'] + EOS for m in messages if m['role'] == 'assistant']
    runs = _masked_runs(tok, ex)
    assert 0 < len(runs) <= len(replies)
    for run, reply in zip(runs, replies):
      # Truncation may cut the last run; a boundary token may trim its start.
      assert run in reply
    assert all(run == reply for run, reply in zip(runs[:-1], replies))
    n_checked += 1
  assert n_checked >= 20
