"""Training data: ShareGPT parsing, chat rendering with an assistant-only loss mask, TFDS storage, grain batches.

The pipeline has three stages, each usable on its own:

1. ``iter_sharegpt(path)`` streams conversations out of a ShareGPT JSON array one record at a time.
   The bundled file is cut off mid-record, so a strict ``json.load`` fails; we decode record by
   record and skip (and count) what cannot be used.
2. ``build_dataset(data_dir, conversations, tokenizer, ...)`` renders each conversation with the
   tokenizer's chat template into ``tokens`` and a ``loss_mask`` (1 on the assistant replies and their
   end-of-turn token), splits it deterministically into ``train`` / ``heldout`` by hashing the
   conversation id, and writes an ArrayRecord dataset through TFDS. ``load_split`` reads it back as
   a random-access source with no TensorFlow involved.
3. ``make_loader(source, ...)`` shuffles, shards across hosts, pads or packs and batches with grain.
   The returned iterator's ``get_state()`` / ``set_state()`` make the data position part of a
   checkpoint.

Batch layout (B batch, L ``seq_len``), all int32 NumPy arrays:
  ``tokens_BxL``       token ids, 0 on padding;
  ``loss_mask_BxL``    1 where the token is an assistant token to be predicted (a *target*), else 0;
  ``segment_ids_BxL``  1, 2, ... per packed sequence, 0 on padding (always 1 per row when unpacked);
  ``positions_BxL``    position inside its own sequence (restarts per segment), 0 on padding.

Self-distillation reuses stage 2 with conversations it generated itself: anything shaped like a
ShareGPT record (``{'id', 'conversations': [{'from', 'value'}, ...]}``) or an OpenAI-style message
list (``[{'role', 'content'}, ...]``) is accepted.

This module must stay free of JAX: the caller passes ``jax.process_index()`` / ``process_count()``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

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
# ShareGPT V3 cuts long conversations into parts "<id>_0", "<id>_1", ...; hashing the stem keeps all
# parts of one conversation in the same split, so heldout text never leaks into training.
_PART_SUFFIX = re.compile(r'_\d+$')


# --------------------------------------------------------------------------------------------------
# ShareGPT streaming
# --------------------------------------------------------------------------------------------------

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


def _turn_role_and_text(turn: Any) -> tuple[str, str] | None:
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
    if _turn_role_and_text(turn) is None:
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


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------

def _turns(conversation: Any) -> list | None:
  if isinstance(conversation, Mapping):
    conversation = conversation.get('conversations', conversation.get('messages'))
  return conversation if isinstance(conversation, (list, tuple)) else None


def to_messages(conversation: Any) -> list[dict] | None:
  """Chat-template messages ``[{'role', 'content'}, ...]`` for training, or None if unusable.

  Keeps an optional leading non-empty system turn, skips assistant turns before the first user
  turn, then keeps the longest strictly alternating user/assistant prefix without empty turns and
  drops a trailing user turn (it has no reply to learn). None when no assistant reply remains or a
  speaker is unknown.
  """
  turns = _turns(conversation)
  if not turns:
    return None
  pairs = [_turn_role_and_text(t) for t in turns]
  if any(p is None for p in pairs):
    return None
  messages = []
  if pairs[0][0] == 'system':
    # An empty system turn is dropped so the template's default system prompt applies, as it
    # will at inference time.
    if pairs[0][1].strip():
      messages.append({'role': 'system', 'content': pairs[0][1]})
    pairs = pairs[1:]
  # ShareGPT V3 cuts long conversations into parts, and a later part usually opens with the reply
  # to a prompt left in the previous part. That orphan reply is dropped (as the original Medusa /
  # FastChat preprocessing does) and the part is kept from its first user turn on.
  while pairs and pairs[0][0] == 'assistant':
    pairs = pairs[1:]
  expected = 'user'
  for role, text in pairs:
    if role != expected or not text.strip():
      break
    messages.append({'role': role, 'content': text})
    expected = 'assistant' if role == 'user' else 'user'
  if messages and messages[-1]['role'] == 'user':
    messages.pop()
  if not any(m['role'] == 'assistant' for m in messages):
    return None
  return messages


def first_user_prompt(conversation: Any) -> str | None:
  """The text of the first human/user turn (the prompt self-distillation replies to), or None."""
  for turn in _turns(conversation) or ():
    pair = _turn_role_and_text(turn)
    if pair is not None and pair[0] == 'user' and pair[1].strip():
      return pair[1]
  return None


def _assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]] | None:
  """The rendered text and the [start, end) character span of each assistant reply + end token.

  The span of reply i runs from the end of the template applied to ``messages[:i]`` with the
  generation prompt (so the ``<|im_start|>assistant\\n`` header is excluded) to the last end-of-turn
  token rendered by ``messages[:i+1]`` (so the newline the template puts after it is excluded).
  None if the template is not prefix-stable (rendering a longer conversation changes earlier text).
  """
  text = tokenizer.apply_chat_template(messages, tokenize=False)
  eos = tokenizer.eos_token or ''
  spans = []
  for i, message in enumerate(messages):
    if message['role'] != 'assistant':
      continue
    head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
    upto = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
    if not (upto.startswith(head) and text.startswith(upto)):
      return None
    reply = upto[len(head):]
    cut = reply.rfind(eos) if eos else -1
    end = len(head) + (cut + len(eos) if cut >= 0 else len(reply.rstrip()))
    spans.append((len(head), end))
  return text, spans


def render_example(tokenizer, conversation: Any, max_len: int) -> dict | None:
  """Tokenises a conversation with the chat template; the mask covers only assistant replies.

  Args:
    tokenizer: a fast Hugging Face tokenizer with a chat template (offsets are needed).
    conversation: a ShareGPT record, a list of ShareGPT turns, or a list of role/content messages.
    max_len: keep at most this many tokens (truncating the end of the conversation).

  Returns:
    ``{'tokens': int32[L], 'loss_mask': int32[L]}`` with L <= max_len, where ``loss_mask`` is 1 on
    each token lying wholly inside an assistant reply or its closing end-of-turn token; or None
    when the conversation is unusable (see ``to_messages``) or no masked token survives truncation.
  """
  messages = to_messages(conversation)
  if messages is None:
    return None
  rendered = _assistant_char_spans(tokenizer, messages)
  if rendered is None:
    return None
  text, spans = rendered
  enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  tokens = np.asarray(enc['input_ids'][:max_len], np.int32)
  offsets = np.asarray(enc['offset_mapping'][:max_len], np.int64).reshape(-1, 2)
  mask = np.zeros(len(tokens), np.int32)
  for start, end in spans:
    # Whole tokens only: a token straddling the header/reply boundary stays unmasked, so the mask
    # never reaches into template text.
    mask |= ((offsets[:, 0] >= start) & (offsets[:, 1] <= end)
             & (offsets[:, 1] > offsets[:, 0])).astype(np.int32)
  if not mask.any():
    return None
  return {'tokens': tokens, 'loss_mask': mask}


# --------------------------------------------------------------------------------------------------
# TFDS ArrayRecord dataset
# --------------------------------------------------------------------------------------------------

def _heldout_score(conversation_id: str) -> float:
  """A uniform number in [0, 1) fixed by the conversation id (parts of one conversation share it)."""
  stem = _PART_SUFFIX.sub('', conversation_id)
  return int.from_bytes(hashlib.sha256(stem.encode('utf-8')).digest()[:8], 'big') / 2.0**64


def is_heldout(conversation_id: str, heldout_fraction: float) -> bool:
  """Whether ``build_dataset`` puts this conversation in the heldout split (by its id alone).

  Distillation answers only train-split prompts and calibration reads only heldout ones, so the
  heads are never tuned on the prompts they are calibrated or evaluated on. (A tiny build with an
  empty heldout split still borrows one train example; see ``MedusaChat._render_all``.)
  """
  return _heldout_score(str(conversation_id)) < heldout_fraction


def tokenizer_fingerprint(tokenizer) -> str:
  """A short hash of what decides the tokens: vocabulary, chat template and end token.

  Paths are left out so a dataset built on one machine is recognised on another.
  """
  h = hashlib.sha256()
  h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode('utf-8'))
  h.update((tokenizer.chat_template or '').encode('utf-8'))
  h.update((tokenizer.eos_token or '').encode('utf-8'))
  return h.hexdigest()[:16]


class MedusaChat(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Chat conversations rendered to ``tokens`` / ``loss_mask``, stored as ArrayRecord.

  One builder config per dataset ``name`` (``<data_dir>/medusa_chat/<name>/<VERSION>``). The
  rendering settings are recorded in the dataset's metadata; ``build_dataset`` refuses to reuse a
  name built with other settings. Skipping the global TFDS registry keeps importing this module
  free of side effects.
  """

  # Bump when rendering changes, so stale datasets are not silently reused.
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Assistant replies + end token masked; heldout by id-stem hash.'}
  # The class ships no files beside its code (download checksums, README). Without this TFDS looks
  # for them in the package through `importlib_resources`, which is not a dependency here.
  code_path = None

  def __init__(self, *, conversations: Iterable[Any] | None = None, tokenizer=None,
               max_len: int | None = None, heldout_fraction: float = 0.02,
               max_examples: int | None = None, progress_desc: str | None = None, **kwargs):
    self._conversations = conversations
    self._tokenizer = tokenizer
    self._max_len = max_len
    self._heldout_fraction = heldout_fraction
    self._max_examples = max_examples
    self._progress_desc = progress_desc
    super().__init__(**kwargs)

  def settings(self) -> dict:
    """What the examples depend on besides the source (which ``name`` stands for)."""
    return {'version': str(self.VERSION), 'max_len': self._max_len,
            'heldout_fraction': self._heldout_fraction, 'max_examples': self._max_examples,
            'tokenizer': tokenizer_fingerprint(self._tokenizer)}

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly rather than dataset_info_from_configs, which reads README/citation
    # files from the package directory.
    return tfds.core.DatasetInfo(
        builder=self,
        description='Chat conversations with an assistant-only loss mask, for Medusa heads.',
        features=tfds.features.FeaturesDict({
            # Tensor, not Sequence: it decodes to one NumPy array instead of a list of scalars.
            'tokens': tfds.features.Tensor(shape=(None,), dtype=np.int32),
            'loss_mask': tfds.features.Tensor(shape=(None,), dtype=np.int32),
            'id': tfds.features.Text(),
        }),
        # Keep source order on disk; the loader shuffles with its own seed.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _render_all(self) -> tuple[list, list, dict]:
    """Renders the source once (it may be a one-pass iterator) into the two splits."""
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    if self._conversations is None or self._tokenizer is None or not self._max_len:
      raise ValueError('MedusaChat needs conversations, a tokenizer and max_len to build.')
    train, heldout, scores = [], [], []
    counts = {'conversations': 0, 'unusable': 0, 'truncated': 0, 'tokens': 0, 'loss_tokens': 0}
    bar = tqdm(self._conversations, desc=self._progress_desc or f'Rendering {self.builder_config.name}',
               unit=' conv', disable=self._progress_desc == '')
    for conversation in bar:
      if self._max_examples is not None and len(train) + len(heldout) >= self._max_examples:
        break
      counts['conversations'] += 1
      example = render_example(self._tokenizer, conversation, self._max_len + 1)
      if example is None:
        counts['unusable'] += 1
        continue
      if len(example['tokens']) > self._max_len:
        counts['truncated'] += 1
        example = {k: v[:self._max_len] for k, v in example.items()}
        if not example['loss_mask'].any():
          counts['unusable'] += 1
          continue
      cid = conversation.get('id') if isinstance(conversation, Mapping) else None
      cid = str(cid) if cid is not None else f'example_{counts["conversations"] - 1}'
      # uint8 while buffered: the whole split sits in memory until TFDS writes it.
      example = {'tokens': example['tokens'], 'loss_mask': example['loss_mask'].astype(np.uint8),
                 'id': cid}
      counts['tokens'] += len(example['tokens'])
      counts['loss_tokens'] += int(example['loss_mask'].sum())
      score = _heldout_score(cid)
      (heldout if score < self._heldout_fraction else train).append(example)
      scores.append(score)
    bar.close()
    if self._heldout_fraction > 0 and not heldout and len(train) > 1:
      # TFDS cannot write an empty split; a tiny build still gets one heldout example, the one whose
      # hash is closest to falling in.
      heldout.append(train.pop(int(np.argmin([_heldout_score(e['id']) for e in train]))))
    if not train:
      raise ValueError(f'No usable training examples in the source of {self.builder_config.name!r}.')
    counts.update(train=len(train), heldout=len(heldout))
    return train, heldout, counts

  def _split_generators(self, dl_manager):
    del dl_manager
    train, heldout, counts = self._render_all()
    self.info.metadata['settings'] = self.settings()
    self.info.metadata['counts'] = counts
    _log.info('Dataset %s: %s', self.builder_config.name, counts)
    splits = {'train': self._generate_examples(train)}
    if heldout:
      splits['heldout'] = self._generate_examples(heldout)
    return splits

  def _generate_examples(self, examples):
    for i, ex in enumerate(examples):
      yield i, {'tokens': ex['tokens'], 'loss_mask': ex['loss_mask'].astype(np.int32),
                'id': ex['id']}


class _DropCustomConfigWarning(logging.Filter):
  """TFDS warns on every construction that our config is not a predefined one; it always is not."""

  def filter(self, record):
    return not record.getMessage().startswith('Using custom data configuration')


def _builder(data_dir: str, name: str, **kwargs) -> MedusaChat:
  config = tfds.core.BuilderConfig(name=name, version=MedusaChat.VERSION)
  absl_logger, quiet = logging.getLogger('absl'), _DropCustomConfigWarning()
  absl_logger.addFilter(quiet)
  try:
    return MedusaChat(data_dir=data_dir, config=config, file_format='array_record', **kwargs)
  finally:
    absl_logger.removeFilter(quiet)


def build_dataset(data_dir: str, conversations: Iterable[Any], tokenizer, *, name: str,
                  max_len: int, heldout_fraction: float = 0.02,
                  max_examples: int | None = None, progress_desc: str | None = None) -> str:
  """Renders ``conversations`` into an ArrayRecord dataset; returns its directory.

  Idempotent: if ``<data_dir>/medusa_chat/<name>/<version>`` is already built with the same
  settings (max_len, heldout fraction, max_examples, tokenizer fingerprint), it is reused without
  touching ``conversations``. A different setting under the same name raises ``ValueError``: pick a
  new name (e.g. one that encodes max_len). Build on one host only, then let the others load.

  Args:
    data_dir: root directory for TFDS datasets.
    conversations: iterable of records (see ``render_example``); consumed once. Records with an
      ``'id'`` are split by its hash, others by their position.
    tokenizer: fast Hugging Face tokenizer with a chat template.
    name: dataset (TFDS config) name; stands for the source.
    max_len: tokens kept per conversation.
    heldout_fraction: expected fraction of conversations in the ``heldout`` split (0 for none).
    max_examples: stop after this many usable examples (tiny configs); None for all.
    progress_desc: tqdm label; '' disables the bar.
  """
  builder = _builder(data_dir, name, conversations=conversations, tokenizer=tokenizer,
                     max_len=max_len, heldout_fraction=heldout_fraction,
                     max_examples=max_examples, progress_desc=progress_desc)
  if builder.is_prepared():
    found = dict(builder.info.metadata.get('settings', {}))
    wanted = json.loads(json.dumps(builder.settings()))
    if found != wanted:
      raise ValueError(f'Dataset {name!r} in {builder.data_dir} was built with {found}, not '
                       f'{wanted}; use another name or delete it.')
    _log.info('Reusing dataset %s', builder.data_dir)
    return os.fspath(builder.data_dir)
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


def dataset_metadata(data_dir: str, name: str) -> dict:
  """``{'settings': {...}, 'counts': {...}}`` recorded when the dataset was built."""
  builder = _builder(data_dir, name)
  if not builder.is_prepared():
    raise FileNotFoundError(f'No dataset {name!r} under {data_dir}; run build_dataset first.')
  return dict(builder.info.metadata)


def load_split(data_dir: str, name: str, split: str) -> Sequence[dict]:
  """A random-access source of ``{'tokens': int32[L], 'loss_mask': int32[L], 'id': bytes}``.

  Reads ArrayRecord files directly (``as_data_source``), so TensorFlow is never imported.
  ``split`` is ``'train'`` or ``'heldout'`` (TFDS slicing such as ``'train[:1%]'`` also works).
  """
  builder = _builder(data_dir, name)
  if not builder.is_prepared():
    raise FileNotFoundError(f'No dataset {name!r} under {data_dir}; run build_dataset first.')
  base = split.split('[')[0]
  if base not in builder.info.splits:
    raise KeyError(f'Dataset {name!r} has splits {list(builder.info.splits)}, not {base!r}.')
  return builder.as_data_source(split)


def prepare_sharegpt(data_dir: str, tokenizer, *, max_len: int, max_examples: int | None = None,
                     heldout_fraction: float = 0.02, name: str | None = None,
                     path: str | None = None) -> str:
  """Builds (or reuses) the dataset of the bundled ShareGPT V3 file; returns its directory.

  The default name encodes the settings that are most often changed, e.g. ``sharegpt_l2048`` or
  ``sharegpt_l512_n64``; pass ``name`` to choose another.
  """
  if path is None:
    from medusa_jax import bundled  # pylint: disable=g-import-not-at-top
    path = bundled.sharegpt_path()
  if name is None:
    name = f'sharegpt_l{max_len}' + (f'_n{max_examples}' if max_examples is not None else '')
  return build_dataset(data_dir, iter_sharegpt(path), tokenizer, name=name, max_len=max_len,
                       heldout_fraction=heldout_fraction, max_examples=max_examples,
                       progress_desc='ShareGPT conversations')


# --------------------------------------------------------------------------------------------------
# Batching with grain
# --------------------------------------------------------------------------------------------------

class _Truncate(grain.transforms.Map):
  """Drops the id and cuts an example to the row length; with token offsets, adds each token's
  index into a flat per-token array of the source (``hidden_cache``)."""

  def __init__(self, seq_len: int, token_offsets=None):
    self.seq_len = seq_len
    self.token_offsets = token_offsets

  def map(self, element):
    out = {'tokens': np.asarray(element['tokens'][:self.seq_len], np.int32),
           'loss_mask': np.asarray(element['loss_mask'][:self.seq_len], np.int32)}
    if self.token_offsets is not None:
      start = int(self.token_offsets[element['source_index']])
      out['token_index'] = np.arange(start, start + len(out['tokens']), dtype=np.int32)
    return out


_ROW_KEYS = ('tokens', 'loss_mask', 'token_index')


class _PadRow(grain.transforms.Map):
  """One example per row: pads to ``seq_len`` and adds segment ids and positions."""

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def map(self, element):
    n = len(element['tokens'])
    out = {}
    for key in (k for k in _ROW_KEYS if k in element):
      row = np.zeros(self.seq_len, np.int32)
      row[:n] = element[key]
      out[key] = row
    out['segment_ids'] = (np.arange(self.seq_len) < n).astype(np.int32)
    # Zero on padding, as grain's packer does, so both layouts agree outside real tokens.
    out['positions'] = np.where(out['segment_ids'] > 0, np.arange(self.seq_len), 0).astype(np.int32)
    return out


class _PackedKeys(grain.transforms.Map):
  """Renames the packer's per-feature segment ids / positions to the batch layout."""

  def map(self, element):
    out = {k: element[k].astype(np.int32) for k in _ROW_KEYS if k in element}
    out['segment_ids'] = element['tokens_segment_ids'].astype(np.int32)
    out['positions'] = element['tokens_positions'].astype(np.int32)
    return out


def make_loader(source: Sequence[Mapping[str, np.ndarray]], *, batch_size: int, seq_len: int,
                seed: int, shuffle: bool = True, num_epochs: int | None = None,
                shard_index: int = 0, shard_count: int = 1, pack: bool = False,
                read_options: grain.ReadOptions | None = None, token_offsets=None) -> grain.DatasetIterator:
  """An iterator of batches ``{tokens, loss_mask, segment_ids, positions}``, each int32 [B, seq_len].

  Order: a global shuffle (reseeded every epoch) of the whole source, then host ``shard_index``
  takes every ``shard_count``-th example, so hosts see disjoint examples within an epoch and the
  same number of them (the remainder of ``len(source) // shard_count`` is left out per epoch).
  Examples longer than ``seq_len`` are truncated. Unpacked: one example per row, padded; packed:
  first-fit packing of several examples per row with ``batch_size`` bins (segment ids 1, 2, ...,
  positions restart per segment). The last incomplete batch of a finite run is dropped.

  The returned grain iterator is checkpointable: ``state = it.get_state()`` (a JSON-serialisable
  dict) and ``it.set_state(state)`` on a fresh iterator built with the same arguments resume the
  exact stream; with Orbax use ``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)``.

  Args:
    source: random-access source, e.g. ``load_split(...)``; elements have ``tokens``/``loss_mask``.
    batch_size: rows per batch on this host.
    seq_len: row length.
    seed: seeds the shuffle and the packer's bin order; use the same on every host.
    shuffle: False keeps source order (evaluation).
    num_epochs: None repeats forever.
    shard_index: this host's index (``jax.process_index()`` at the call site).
    shard_count: number of hosts (``jax.process_count()``).
    pack: pack several examples per row.
    read_options: grain read threads / prefetch; grain's defaults if None.
    token_offsets: [len(source) + 1] start of each example in a flat per-token array (its
      truncated tokens, in source order); batches then also hold ``token_index`` [B, seq_len], each
      token's row there (0 on padding). ``hidden_cache`` uses it to look up cached hidden states.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} not in [0, {shard_count}).')
  if seq_len < 2 or batch_size < 1:
    raise ValueError(f'Need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}.')
  per_shard = len(source) // shard_count
  if per_shard == 0:
    raise ValueError(f'{len(source)} examples cannot be split over {shard_count} shards.')
  ds = grain.MapDataset.source(source)
  if token_offsets is not None:
    # A repeated dataset passes the epoch's offset on in the index: the source index is modulo its size.
    n = len(source)
    ds = ds.map_with_index(lambda i, e: {**e, 'source_index': i % n})
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds[shard_index:per_shard * shard_count:shard_count]
  # After shuffle and slice so that each epoch re-shuffles globally before sharding.
  ds = ds.repeat(num_epochs)
  ds = ds.map(_Truncate(seq_len, token_offsets))
  it = ds.to_iter_dataset(read_options)
  if pack:
    keys = _ROW_KEYS if token_offsets is not None else _ROW_KEYS[:2]
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={k: seq_len for k in keys},
        num_packing_bins=batch_size, seed=seed, shuffle_bins=shuffle)
    it = it.map(_PackedKeys())
  else:
    it = it.map(_PadRow(seq_len))
  return iter(it.batch(batch_size, drop_remainder=True))
