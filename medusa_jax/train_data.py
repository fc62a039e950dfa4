"""The data a training run reads: its dataset's splits, the targets' counts, cached hidden states.

``config.data.source`` names the dataset: 'distilled' (built by ``medusa_jax.distill`` beforehand)
or 'sharegpt' (the original replies, built here on first use).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from medusa_jax import data as data_lib
from medusa_jax import loader as loader_lib
from medusa_jax import hidden_cache
from medusa_jax import prompts


def dataset_name(config) -> str:
  """The TFDS dataset a config trains on (built by medusa_jax.distill or from ShareGPT)."""
  if config.data.source == "distilled":
    return prompts.distilled_dataset_name(config)
  if config.data.source == "sharegpt":
    n = config.data.max_examples
    return f"sharegpt_l{config.data.max_len}" + (f"_n{n}" if n else "")
  raise ValueError(f"config.data.source must be 'distilled' or 'sharegpt', got {config.data.source!r}")


def sources(config, tokenizer):
  """(train split, held-out split or None) of the config's dataset; ShareGPT's is built if missing."""
  name = dataset_name(config)
  d = config.data
  if d.source == "sharegpt":
    # Host 0 builds the dataset first; then the others find it (a shared data_dir) or build their
    # own identical copy (host-local disks). The build is deterministic, so all hosts agree.
    for turn in (0, 1):
      if (jax.process_index() == 0) == (turn == 0):
        data_lib.prepare_sharegpt(d.data_dir, tokenizer, max_len=d.max_len,
                                  max_examples=d.max_examples or None, heldout_fraction=d.heldout_fraction,
                                  name=name)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"prepare_sharegpt_{turn}")
  try:
    train = data_lib.load_split(d.data_dir, name, "train")
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f"Training data {name!r} not found under {d.data_dir} ({type(e).__name__}). For "
        "data.source='distilled' run `python -m medusa_jax.distill --config <same config>` first.") from None
  try:
    heldout = data_lib.load_split(d.data_dir, name, "heldout")
  except Exception:  # pylint: disable=broad-except
    heldout = None
  return train, heldout


def target_counts(source, vocab_size: int, max_examples: int = 20000):
  """How often each token is an assistant (loss) target in the first examples of a split."""
  counts = np.zeros(vocab_size, np.int64)
  for i in range(min(len(source), max_examples)):
    ex = source[i]
    counts += np.bincount(np.asarray(ex["tokens"])[np.asarray(ex["loss_mask"]) > 0], minlength=vocab_size)
  return counts


def hidden_caches(config, cfg, base, train_src, heldout_src, frozen_backbone: bool):
  """{'train', 'heldout'} hidden-state caches with ``config.train.cache_hidden`` (else None).

  ``frozen_backbone``: no backbone weight trains and there is no LM loss (Medusa-1); otherwise the
  hidden states change every step and a cache is an error."""
  if not config.train.cache_hidden:
    return None
  if not frozen_backbone:
    raise ValueError("config.train.cache_hidden needs a frozen backbone and no LM loss (Medusa-1): the "
                     "hidden states of a backbone that trains change every step.")
  name, seq_len, data_dir = dataset_name(config), int(config.train.seq_len), config.data.data_dir
  splits = {"train": train_src} if heldout_src is None else {"train": train_src, "heldout": heldout_src}
  # Every host keeps the whole split's states: the examples a host reads change every epoch. Host 0
  # computes them first; the others then read its files (a shared data_dir) or compute their own
  # identical copy (host-local disks), as with the dataset itself.
  for turn in (0, 1):
    if (jax.process_index() == 0) == (turn == 0):
      caches = {k: hidden_cache.for_split(cfg, base, src, seq_len, data_dir, name, k) for k, src in splits.items()}
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"hidden_cache_{turn}")
  return caches


class Feed:
  """A run's batches: loaders of its splits sharded over hosts, and batches put on its mesh
  (``sharding.TrainPlacement``), with cached hidden states looked up when there are caches."""

  def __init__(self, config, placement, splits: dict, caches: dict | None):
    self.config, self.placement, self.splits, self.caches = config, placement, splits, caches

  def loader(self, split: str, **kwargs):
    # Hosts whose devices share batch rows (replicas) read the same examples; see sharding.process_shard.
    tc, (index, count) = self.config.train, self.placement.data_shard()
    return loader_lib.make_loader(self.splits[split], batch_size=tc.batch_size // count, seq_len=tc.seq_len,
                                shard_index=index, shard_count=count, pack=self.config.data.pack,
                                token_offsets=self.caches[split].offsets if self.caches else None, **kwargs)

  def put(self, batch, split: str):
    if self.caches:  # the frozen backbone's hidden states instead of its forward
      batch = dict(batch)
      batch["hidden"] = self.caches[split].gather(batch.pop("token_index"))
    return self.placement.put_batch(batch)
