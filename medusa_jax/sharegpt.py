"""ShareGPT files: conversations streamed one record at a time from a (possibly truncated) JSON array.

``iter_sharegpt(path)`` yields ``{'id', 'conversations': [{'from', 'value'}, ...]}`` records. The
bundled ShareGPT V3 file is cut off mid-record, so a strict ``json.load`` fails; we decode record by
record from a sliding buffer and skip (and count) what cannot be used.

``turn_role_and_text`` reads one turn, ShareGPT-style (``{'from', 'value'}``) or OpenAI-style
(``{'role', 'content'}``), as a chat-template role and its text; ``chat.py`` renders with it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from typing import Any, Iterator, Mapping

_log = logging.getLogger(__name__)

# ShareGPT speaker names -> chat-template roles. ShareGPT V3 uses "human"/"gpt" almost everywhere;
# the other assistant names appear in ShareGPT variants scraped from other chatbots.
ROLE_MAP = {
    'human': 'user', 'user': 'user',
    'gpt': 'assistant', 'chatgpt': 'assistant', 'bard': 'assistant', 'bing': 'assistant',
    'assistant': 'assistant', 'model': 'assistant',
    'system': 'system',
}

_NON_WS = re.compile(r'\S')
# Where a ShareGPT record starts; used only to resynchronise after a syntax error in mid-file.
_RECORD_START = re.compile(r'\{\s*"id"\s*:')


class _Buffer:
  """A sliding text window over a file: holds the record being decoded plus unread look-ahead."""

  def __init__(self, f: io.TextIOBase, chunk_chars: int):
    self.f, self.chunk_chars = f, chunk_chars
    self.text, self.pos, self.eof = '', 0, False

  def more(self) -> bool:
    """Reads more text; False at end of file."""
    if self.eof:
      return False
    if self.pos:  # Forget what was consumed so memory tracks one record, not the file.
      self.text, self.pos = self.text[self.pos:], 0
    # Growing the read with the buffer keeps re-decoding a record bigger than a chunk linear in
    # its size rather than quadratic.
    data = self.f.read(max(self.chunk_chars, len(self.text)))
    if not data:
      self.eof = True
      return False
    self.text += data
    return True

  def peek(self) -> str | None:
    """Skips whitespace and returns the next character, or None at end of file."""
    while True:
      m = _NON_WS.search(self.text, self.pos)
      if m:
        self.pos = m.start()
        return self.text[self.pos]
      self.pos = len(self.text)
      if not self.more():
        return None

  def resync(self) -> bool:
    """Moves to the next record start after the current position; False if there is none."""
    start = self.pos + 1
    while True:
      m = _RECORD_START.search(self.text, start)
      if m:
        self.pos = m.start()
        return True
      # Keep a short tail, as a record start may straddle the read boundary, but never the record
      # being skipped.
      self.pos = max(start, len(self.text) - 16)
      if not self.more():
        return False
      start = 0


def _iter_json_array(f, stats: dict, chunk_chars: int,
                     max_record_chars: int) -> Iterator[Any]:
  """Yields the values of a top-level JSON array one at a time, tolerating truncation."""
  decoder = json.JSONDecoder()
  buf = _Buffer(f, chunk_chars)
  if buf.peek() != '[':
    _log.error('Not a JSON array; nothing read.')
    stats['malformed'] += 1
    return
  buf.pos += 1
  expect_value, first = True, True
  while True:
    c = buf.peek()
    if c is None:  # The array was never closed: the file is truncated.
      stats['truncated_tail'] = 1
      return
    if c == ']' and (first or not expect_value):
      return
    if not expect_value:
      if c == ',':
        buf.pos += 1
        expect_value = True
        continue
      stats['malformed'] += 1  # Junk between records.
      if not buf.resync():
        stats['truncated_tail'] = 1
        return
      expect_value = True
      continue
    try:
      obj, end = decoder.raw_decode(buf.text, buf.pos)
    except json.JSONDecodeError:
      # Usually the record continues past the buffer; read on unless the record is implausibly
      # large, which means a syntax error that more text will not fix.
      if len(buf.text) - buf.pos <= max_record_chars and buf.more():
        continue
      if buf.resync():
        stats['malformed'] += 1
        continue
      stats['truncated_tail'] = 1  # An undecodable record with nothing after it.
      return
    if end == len(buf.text) and not buf.eof and buf.more():
      continue  # A bare number could go on in the next chunk; decode it again with more text.
    buf.pos = end
    first, expect_value = False, False
    yield obj


def turn_role_and_text(turn: Any) -> tuple[str, str] | None:
  """(template role, text) of one ShareGPT or OpenAI-style turn; None if it is not one."""
  if not isinstance(turn, Mapping):
    return None
  speaker = turn.get('from', turn.get('role'))
  text = turn.get('value', turn.get('content'))
  if not isinstance(speaker, str) or not isinstance(text, str):
    return None
  role = ROLE_MAP.get(speaker.strip().lower())
  return None if role is None else (role, text)


def _clean_record(obj: Any, index: int) -> dict | None:
  """A ShareGPT record in canonical form, or None when it is malformed."""
  if not isinstance(obj, Mapping):
    return None
  turns = obj.get('conversations')
  if not isinstance(turns, list) or not turns:
    return None
  clean = []
  for turn in turns:
    if turn_role_and_text(turn) is None:
      return None
    clean.append({'from': turn.get('from', turn.get('role')),
                  'value': turn.get('value', turn.get('content'))})
  rid = obj.get('id')
  # Ids decide the split; a positional id is still deterministic for a given file.
  rid = str(rid) if isinstance(rid, (str, int)) and str(rid) else f'record_{index}'
  return {'id': rid, 'conversations': clean}


def iter_sharegpt(path: str, stats: dict | None = None, *, chunk_chars: int = 1 << 20,
                  max_record_chars: int = 1 << 26) -> Iterator[dict]:
  """Streams ``{'id': str, 'conversations': [{'from': str, 'value': str}, ...]}`` from a ShareGPT file.

  Records are decoded one by one from a sliding buffer (memory ~ one record + ``chunk_chars``).
  Records that are not dicts, lack a non-empty ``conversations`` list, or contain a turn with an
  unknown speaker or a non-string value are skipped; so is an incomplete record at the end of the
  file. Nothing here raises on bad data.

  Args:
    path: the JSON file (a top-level array of records).
    stats: optional dict, filled with counts ``records`` (values decoded), ``kept`` (yielded),
      ``malformed`` (skipped, including undecodable spans in mid-file) and ``truncated_tail``
      (1 if the file ends inside the array).
    chunk_chars: characters read at a time.
    max_record_chars: a record that does not decode within this many characters is treated as a
      syntax error and skipped, which bounds memory on corrupt files.

  Yields:
    Canonical records, in file order.
  """
  if stats is None:
    stats = {}
  for key in ('records', 'kept', 'malformed', 'truncated_tail'):
    stats.setdefault(key, 0)
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      for obj in _iter_json_array(f, stats, chunk_chars, max_record_chars):
        stats['records'] += 1
        record = _clean_record(obj, stats['records'] - 1)
        if record is None:
          stats['malformed'] += 1
          continue
        stats['kept'] += 1
        yield record
  finally:
    # Also runs when the consumer stops early (max_examples), so the counts are then partial.
    _log.info('ShareGPT %s: %d records, %d kept, %d malformed, truncated tail: %d',
              os.path.basename(path), stats['records'], stats['kept'], stats['malformed'],
              stats['truncated_tail'])

