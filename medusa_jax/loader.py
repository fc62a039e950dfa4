"""Batching training data with grain: shuffle, shard across hosts, pad or pack, batch, resume.

``make_loader(source, ...)`` takes a random-access source (``data.load_split``) and returns
``Batches``, whose ``get_state()`` / ``set_state()`` make the data position part of a checkpoint.

Batch layout (B batch, L ``seq_len``), all int32 NumPy arrays:
  ``tokens_BxL``       token ids, 0 on padding;
  ``loss_mask_BxL``    1 where the token is an assistant token to be predicted (a *target*), else 0;
  ``segment_ids_BxL``  1, 2, ... per packed sequence, 0 on padding (always 1 per row when unpacked);
  ``positions_BxL``    position inside its own sequence (restarts per segment), 0 on padding;
  ``id_BxL``           1 + the example's index in the source on each of its tokens, 0 on padding: a
                       batch's examples are its distinct nonzero ids (the train step never reads it).

This module must stay free of JAX: the caller passes ``jax.process_index()`` / ``process_count()``.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import grain
import numpy as np

_log = logging.getLogger(__name__)


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
