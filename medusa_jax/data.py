"""Training data on disk: conversations stored as a TFDS dataset with a loss mask.

``build_dataset(data_dir, conversations, tokenizer, ...)`` renders each conversation with
``chat.render_example`` (``tokens`` and a ``loss_mask`` on the assistant replies), splits it
deterministically into ``train`` / ``heldout`` by hashing the conversation id, and writes an
ArrayRecord dataset through TFDS. ``load_split`` reads it back as a random-access source with no
TensorFlow involved. ``prepare_sharegpt`` does this for the ShareGPT file (``sharegpt.py``).
Self-distillation builds with conversations it generated itself (any shape ``chat.py`` accepts).
Batching the sources for training is ``loader.py``'s.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any, Iterable, Mapping, Sequence

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
