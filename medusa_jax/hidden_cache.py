"""Medusa-1's frozen backbone, run once: the final hidden state of every training token, cached.

Medusa-1 trains only the heads, which read the backbone's final hidden states; the backbone never
changes, so its forward over an example gives the same hidden states every epoch (a packed row's
segment mask and restarting positions make each example's states its own). Computing them once
and looking them up per batch removes the backbone forward from every step: on a 2-core CPU that
forward is over half of a SmolLM2 Medusa-1 step, and a run reads each example about twice.

The cache of one split is a float32 array [tokens, D] (every example's truncated tokens, in source
order) with the start of each example (``offsets``), saved as ``.npy`` files under
``data_dir/hidden/`` and memory-mapped on reuse. Its name holds the dataset, the row length and a
fingerprint of the backbone's weights, so another model or dataset never reads it. Batches carry
``token_index`` (``loader.make_loader(..., token_offsets=)``) and ``gather`` turns it into the
[B, L, D] hidden states the step uses instead of the forward.

Several processes: every host keeps the whole split's cache (the examples it reads change every
epoch), host 0 computing it first (``train_data.hidden_caches``); ``config.train.cache_hidden``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from medusa_jax import decode
from medusa_jax import model as model_lib

_log = logging.getLogger("medusa_jax.hidden_cache")


def fingerprint(cfg: model_lib.ModelConfig, base) -> str:
  """A short hash of the architecture and a sample of every weight (cheap: a few values each)."""
  h = hashlib.sha256(repr(sorted(model_lib.param_shapes(cfg).keys())).encode())
  h.update(repr((cfg.vocab_size, cfg.dim, cfg.num_layers, cfg.dtype)).encode())
  for leaf in jax.tree.leaves(base):
    flat = np.asarray(leaf).reshape(-1)
    h.update(np.asarray(flat[:: max(1, flat.size // 64)][:64], np.float32).tobytes())
  return h.hexdigest()[:12]


def offsets_of(source, seq_len: int) -> np.ndarray:
  """[N + 1] start of each example's (truncated) tokens in the flat array."""
  lengths = np.array([min(len(source[i]["tokens"]), seq_len) for i in range(len(source))], np.int64)
  return np.concatenate([[0], np.cumsum(lengths)])


class HiddenCache:
  """The cached hidden states of one split: ``gather(token_index)`` -> [B, L, D] float32."""

  def __init__(self, hidden_TxD: np.ndarray, offsets: np.ndarray):
    self.hidden_TxD, self.offsets = hidden_TxD, offsets

  def gather(self, token_index_BxL) -> np.ndarray:
    return np.asarray(self.hidden_TxD[np.asarray(token_index_BxL)], np.float32)


def build(cfg: model_lib.ModelConfig, base, source, seq_len: int, path: str, *, batch_size: int = 8,
          desc: str = "hidden states") -> HiddenCache:
  """Runs the backbone over every example of ``source`` (shortest first, batched, one compile per
  length bucket) and writes the flat array to ``path`` atomically; returns it memory-mapped."""
  offsets = offsets_of(source, seq_len)
  lengths = np.diff(offsets)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".npy", dir=os.path.dirname(path))
  os.close(fd)
  out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(int(offsets[-1]), cfg.dim))

  @jax.jit
  def hidden_of(base, tokens_BxL, lengths_B):
    L = tokens_BxL.shape[1]
    positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), tokens_BxL.shape)
    _, hidden, _ = model_lib.forward(cfg, base, tokens_BxL, positions, model_lib.causal_mask(lengths_B, L),
                                     logits=False)
    return hidden.astype(jnp.float32)

  order = np.argsort(lengths, kind="stable")
  with tqdm(total=int(offsets[-1]), desc=desc, unit=" tok", unit_scale=True) as bar:
    for s in range(0, len(order), batch_size):
      idx = order[s:s + batch_size]
      rows = [np.asarray(source[int(i)]["tokens"][:seq_len]) for i in idx]
      rows += [rows[-1]] * (batch_size - len(rows))  # one shape per bucket
      tokens, lens = decode.pad_prompts([r.tolist() for r in rows], min(decode.bucket(max(map(len, rows))), seq_len))
      hidden = np.asarray(hidden_of(base, jnp.asarray(tokens), jnp.asarray(lens)))
      for j, i in enumerate(idx):
        out[offsets[i]:offsets[i + 1]] = hidden[j, :lengths[i]]
      bar.update(int(lengths[idx].sum()))
  out.flush()
  del out
  np.save(tmp[:-4] + ".offsets.npy", offsets)
  os.replace(tmp[:-4] + ".offsets.npy", path[:-4] + ".offsets.npy")
  os.replace(tmp, path)
  return load(path)


def load(path: str) -> HiddenCache:
  return HiddenCache(np.load(path, mmap_mode="r"), np.load(path[:-4] + ".offsets.npy"))


def for_split(cfg, base, source, seq_len: int, data_dir: str, dataset: str, split: str) -> HiddenCache:
  """The cache of one split: loaded if it exists (same dataset, row length and weights), else built."""
  path = os.path.join(data_dir, "hidden", f"{dataset}_{split}_l{seq_len}_{fingerprint(cfg, base)}.npy")
  if os.path.exists(path) and os.path.exists(path[:-4] + ".offsets.npy"):
    cache = load(path)
    if len(cache.offsets) == len(source) + 1 and np.array_equal(cache.offsets, offsets_of(source, seq_len)):
      _log.info("Hidden states of %s/%s read from %s.", dataset, split, path)
      return cache
    _log.warning("%s does not match the dataset (another build?): computing it again.", path)
  return build(cfg, base, source, seq_len, path, desc=f"backbone hidden states ({split})")
