"""Training data: conversations stored as a TFDS dataset with a loss mask, and batched with grain.

Two stages, each usable on its own:

1. ``build_dataset(data_dir, conversations, tokenizer, ...)`` renders each conversation with
   ``chat.render_example`` (``tokens`` and a ``loss_mask`` on the assistant replies), splits it
   deterministically into ``train`` / ``heldout`` by hashing the conversation id, and writes an
   ArrayRecord dataset through TFDS. ``load_split`` reads it back as a random-access source with no
   TensorFlow involved. ``prepare_sharegpt`` does this for the ShareGPT file (``sharegpt.py``).
2. ``make_loader(source, ...)`` shuffles, shards across hosts, pads or packs and batches with grain.
   The returned iterator's ``get_state()`` / ``set_state()`` make the data position part of a
   checkpoint.

Batch layout (B batch, L ``seq_len``), all int32 NumPy arrays:
  ``tokens_BxL``       token ids, 0 on padding;
  ``loss_mask_BxL``    1 where the token is an assistant token to be predicted (a *target*), else 0;
  ``segment_ids_BxL``  1, 2, ... per packed sequence, 0 on padding (always 1 per row when unpacked);
  ``positions_BxL``    position inside its own sequence (restarts per segment), 0 on padding;
  ``id_BxL``           1 + the example's index in the source on each of its tokens, 0 on padding: a
                       batch's examples are its distinct nonzero ids (the train step never reads it).

Self-distillation builds with conversations it generated itself (any shape ``chat.py`` accepts).

This module must stay free of JAX: the caller passes ``jax.process_index()`` / ``process_count()``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from medusa_jax import bundled
from medusa_jax import chat
from medusa_jax import sharegpt

_log = logging.getLogger(__name__)

# ShareGPT V3 cuts long conversations into parts "<id>_0", "<id>_1", ...; hashing the stem keeps all
# parts of one conversation in the same split, so heldout text never leaks into training.
_PART_SUFFIX = re.compile(r'_\d+$')


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
      example = chat.render_example(self._tokenizer, conversation, self._max_len + 1)
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
    conversations: iterable of records (see ``chat.render_example``); consumed once. Records with an
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
    path = bundled.sharegpt_path()
  if name is None:
    name = f'sharegpt_l{max_len}' + (f'_n{max_examples}' if max_examples is not None else '')
  return build_dataset(data_dir, sharegpt.iter_sharegpt(path), tokenizer, name=name, max_len=max_len,
                       heldout_fraction=heldout_fraction, max_examples=max_examples,
                       progress_desc='ShareGPT conversations')


# --------------------------------------------------------------------------------------------------
# Batching with grain
# --------------------------------------------------------------------------------------------------

class _Truncate(grain.transforms.Map):
  """Cuts an example to the row length and marks its tokens with its index in the source (the
  stored conversation id, a string, is dropped); with token offsets, adds each token's index into
  a flat per-token array of the source (``hidden_cache``)."""

  def __init__(self, seq_len: int, token_offsets=None):
    self.seq_len = seq_len
    self.token_offsets = token_offsets

  def map(self, element):
    out = {'tokens': np.asarray(element['tokens'][:self.seq_len], np.int32),
           'loss_mask': np.asarray(element['loss_mask'][:self.seq_len], np.int32)}
    # 1-based so that padding (rows and the packer's bins are zero-filled) is 0, as in every key.
    out['id'] = np.full(len(out['tokens']), element['source_index'] + 1, np.int32)
    if self.token_offsets is not None:
      start = int(self.token_offsets[element['source_index']])
      out['token_index'] = np.arange(start, start + len(out['tokens']), dtype=np.int32)
    return out


_ROW_KEYS = ('tokens', 'loss_mask', 'id', 'token_index')


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
                read_options: grain.ReadOptions | None = None, token_offsets=None) -> Batches:
  """An iterator of batches ``{tokens, loss_mask, segment_ids, positions, id}``, each int32 [B, seq_len].

  Order: a global shuffle (reseeded every epoch) of the whole source, then host ``shard_index``
  takes every ``shard_count``-th example, so hosts see disjoint examples within an epoch and the
  same number of them (the remainder of ``len(source) // shard_count`` is left out per epoch).
  Examples longer than ``seq_len`` are truncated. Unpacked: one example per row, padded; packed:
  first-fit packing of several examples per row with ``batch_size`` bins (segment ids 1, 2, ...,
  positions restart per segment). The last incomplete batch of a finite run is dropped.

  The returned iterator is checkpointable: ``state = it.get_state()`` (a JSON-serialisable dict)
  and ``it.set_state(state)`` on a fresh iterator built with the same arguments resume the exact
  stream; see ``Batches`` for states written by hosts with other shards.

  Args:
    source: random-access source, e.g. ``load_split(...)``; elements have ``tokens``/``loss_mask``.
    batch_size: rows per batch on this host.
    seq_len: row length.
    seed: seeds the shuffle and the packer's bin order; use the same on every host.
    shuffle: False keeps source order (evaluation).
    num_epochs: None repeats forever.
    shard_index: this host's share of the examples (``sharding.process_shard`` at the call site).
    shard_count: how many distinct shares there are (hosts, less those holding the same rows).
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
    keys = _ROW_KEYS if token_offsets is not None else _ROW_KEYS[:3]
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={k: seq_len for k in keys},
        num_packing_bins=batch_size, seed=seed, shuffle_bins=shuffle)
    it = it.map(_PackedKeys())
  else:
    it = it.map(_PadRow(seq_len))
  return Batches(iter(it.batch(batch_size, drop_remainder=True)), source_len=n, shard_index=shard_index,
                 shard_count=shard_count, pack=pack)


class Batches:
  """``make_loader``'s iterator: grain's, with a position (``get_state``) that names its shard.

  ``get_state()`` is ``{'grain': <grain's state>, 'shard': [index, count]}``. ``set_state`` takes
  one such state, grain's own (a checkpoint written before shards were named), or
  ``{'processes': [state, ...]}``, every host's state of one step (what a checkpoint of several
  processes holds): it resumes from the state of its own shard when one is there, exactly. From
  states of another shard count (a run resumed on fewer or more hosts) it resumes at the same
  place in the same epoch's shuffled order: the examples the old hosts had read together, counted
  from the one that had read fewest, divided among the new shards. That is exact for unpacked
  rows when the count divides; otherwise (packed rows: examples already packed into rows not yet
  emitted; a count that does not divide) a few examples are read again, none is skipped, and a
  warning says so.
  """

  def __init__(self, it, *, source_len: int, shard_index: int, shard_count: int, pack: bool):
    self._it = it
    self.source_len, self.shard, self.pack = source_len, [shard_index, shard_count], pack

  def __iter__(self) -> Batches:
    return self

  def __next__(self) -> dict:
    return next(self._it)

  def get_state(self) -> dict:
    return {'grain': self._it.get_state(), 'shard': list(self.shard)}

  def set_state(self, state: dict) -> None:
    states = state['processes'] if 'processes' in state else [state]
    if not all('grain' in s for s in states):  # grain's own state
      self._it.set_state(state)
      return
    mine = [s for s in states if list(s['shard']) == self.shard]
    self._it.set_state(mine[0]['grain'] if mine else self._translated(states))

  def _translated(self, states: list[dict]) -> dict:
    old_count = int(states[0]['shard'][1])
    read = [(s['grain']['parent'] if self.pack else s['grain'])['next_index'] for s in states]
    # Element j of a host's stream is element j % per_shard of epoch j // per_shard, and the hosts
    # had taken examples [0, k * count) of that epoch's order between them.
    epoch, k = divmod(min(read), self.source_len // old_count)
    together = k * old_count
    count = self.shard[1]
    index = epoch * (self.source_len // count) + together // count
    if self.pack or together % count or len(set(read)) > 1:
      _log.warning('Data position of %d shards resumed on %d (shard %d): a few examples of epoch %d are read '
                   'again%s.', old_count, count, self.shard[0], epoch,
                   ' (packed rows are packed anew)' if self.pack else '')
    return {'parent': {'next_index': index}, 'next_row': 0, 'counter': 0} if self.pack else {'next_index': index}
