"""The data a training run reads: its dataset's splits, the targets' counts, cached hidden states.

``config.data.source`` names the dataset: 'distilled' (built by ``medusa_jax.distill`` beforehand)
or 'sharegpt' (the original replies, built here on first use). ``config.data.max_tokens`` is the
run's token budget: it trains on the first examples of the train split that hold that many tokens
(after truncation to ``train.seq_len``), so runs with budgets 0.5M .. 8M read nested prefixes of
one dataset and share one hidden-state cache. The held-out split is never cut and never trained on.
"""

from __future__ import annotations

import logging
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from medusa_jax import data as data_lib
from medusa_jax import loader as loader_lib
from medusa_jax import hidden_cache
from medusa_jax import prompts

_log = logging.getLogger("medusa_jax.train_data")


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
  if heldout is not None and config.train.eval_batches:
    # Evaluation reads the first eval_batches batches in order: only those examples (with a margin
    # for packing) need their hidden states cached, not a big split's whole held-out share.
    heldout = Prefix(heldout, min(len(heldout), 4 * int(config.train.eval_batches) * int(config.train.batch_size)))
  budget = int(d.get("max_tokens", 0) or 0)
  if budget:
    train = Prefix(train, prefix_length(train, int(config.train.seq_len), budget, name))
  return train, heldout


def steps_for_epochs(config, train_src) -> int:
  """``train.epochs`` passes over the train split's tokens (truncated to ``train.seq_len``), in
  steps of ``batch_size`` rows; packed rows are counted full, so a packed run reads a few percent more."""
  tc = config.train
  tokens = int(hidden_cache.offsets_of(train_src, int(tc.seq_len))[-1])
  return max(1, round(float(tc.epochs) * tokens / (int(tc.batch_size) * int(tc.seq_len))))


class Prefix(Sequence):
  """The first ``n`` examples of a random-access source (``full``: the whole of it)."""

  def __init__(self, full, n: int):
    self.full, self.n = full, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not -self.n <= i < self.n:
      raise IndexError(i)
    return self.full[i % self.n]


def prefix_length(source, seq_len: int, max_tokens: int, name: str = "the dataset") -> int:
  """The fewest first examples of ``source`` that hold ``max_tokens`` tokens (each truncated to
  ``seq_len``); all of them, with a warning, when the source holds fewer."""
  total = 0
  for i in range(len(source)):
    total += min(len(source[i]["tokens"]), seq_len)
    if total >= max_tokens:
      _log.info("Token budget %d: the first %d of %d examples of %s (%d tokens).", max_tokens, i + 1,
                len(source), name, total)
      return i + 1
  _log.warning("Token budget %d is more than %s's train split holds (%d tokens in %d examples): training on "
               "all of it. Raise data.max_examples for more.", max_tokens, name, total, len(source))
  return len(source)


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
      # The train split grows with the token budget, in shards; evaluation always reads the same
      # first held-out examples, one shard of exactly those.
      caches = {k: hidden_cache.for_split(
          cfg, base, getattr(src, "full", src), seq_len, data_dir, name, k, num_examples=len(src),
          dtype=config.train.cache_dtype,
          shard_examples=hidden_cache.SHARD_EXAMPLES if k == "train" else max(1, len(src)))
                for k, src in splits.items()}
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
