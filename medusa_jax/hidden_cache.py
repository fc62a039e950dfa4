"""Medusa-1's frozen backbone, run once: the final hidden state of every training token, cached.

Medusa-1 trains only the heads, which read the backbone's final hidden states; the backbone never
changes, so its forward over an example gives the same hidden states every epoch (a packed row's
segment mask and restarting positions make each example's states its own). Computing them once
and looking them up per batch removes the backbone forward from every step: on a 2-core CPU that
forward is over half of a SmolLM2 Medusa-1 step, and a run reads each example about twice.

Layout. The cache of one split is a directory under ``data_dir/hidden/`` whose name holds the
dataset, the row length, the stored dtype and a fingerprint of the backbone's weights, so another
model or dataset never reads it. It holds *shards*: ``{start}_{end}.npy`` has the hidden states
[tokens, D] of examples ``start .. end - 1`` (their truncated tokens, in source order), every
shard but the split's last covering ``SHARD_EXAMPLES`` examples. A run that trains on the first
N examples (``data.max_tokens``) needs only the shards up to N, so a larger token budget later
extends the cache instead of computing it again.

Disk: bfloat16 by default (``train.cache_dtype``), 2 bytes x D a token (1,152 for SmolLM2's 576:
8M tokens are ~9 GB, against ~18 GB in float32); the states are widened back to float32 when a
batch reads them. A bfloat16 state is the float32 one rounded to 8 significant bits (relative
error <= 2^-9), below the noise of training the heads; ``float32`` keeps them exact.

Resume: each shard is written to a temporary file and renamed when complete, so a killed build
loses at most the shard in progress and the next run computes only the missing shards.

Batches carry ``token_index`` (``loader.make_loader(..., token_offsets=)``) and ``gather`` turns
it into the [B, L, D] hidden states the step uses instead of the forward. Several processes:
every host keeps the whole split's cache (the examples it reads change every epoch), host 0
computing it first (``train_data.hidden_caches``); ``config.train.cache_hidden``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm import tqdm

from medusa_jax import decode
from medusa_jax import hardware
from medusa_jax import model as model_lib

_log = logging.getLogger("medusa_jax.hidden_cache")

SHARD_EXAMPLES = 512  # ~170k tokens of ShareGPT at 384: a few minutes of a 2-core CPU, lost at most on a kill
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
# .npy cannot name bfloat16: it is stored as its bits (uint16) and viewed back when read.
_ON_DISK = {"bfloat16": np.uint16, "float32": np.float32}


def _load(path: str) -> np.ndarray:
  a = np.load(path, mmap_mode="r")
  return a.view(ml_dtypes.bfloat16) if a.dtype == np.uint16 else a


def fingerprint(cfg: model_lib.ModelConfig, base) -> str:
  """A short hash of the architecture and a sample of every weight (cheap: a few values each)."""
  h = hashlib.sha256(repr(sorted(model_lib.param_shapes(cfg).keys())).encode())
  h.update(repr((cfg.vocab_size, cfg.dim, cfg.num_layers, cfg.dtype)).encode())
  for leaf in jax.tree.leaves(base):
    flat = np.asarray(leaf).reshape(-1)
    h.update(np.asarray(flat[:: max(1, flat.size // 64)][:64], np.float32).tobytes())
  return h.hexdigest()[:12]


def offsets_of(source, seq_len: int, num_examples: int | None = None) -> np.ndarray:
  """[N + 1] start of each of the first N examples' (truncated) tokens in the flat array."""
  n = len(source) if num_examples is None else num_examples
  lengths = np.array([min(len(source[i]["tokens"]), seq_len) for i in range(n)], np.int64)
  return np.concatenate([[0], np.cumsum(lengths)])


def shard_ranges(num_source: int, num_needed: int, shard_examples: int = SHARD_EXAMPLES) -> list[tuple[int, int]]:
  """The shards (start, end) that cover the first ``num_needed`` of ``num_source`` examples."""
  return [(s, min(s + shard_examples, num_source)) for s in range(0, num_needed, shard_examples)]


class HiddenCache:
  """The cached hidden states of (the first examples of) one split.

  ``offsets`` [N + 1]: each example's first token in the flat token numbering ``gather`` reads;
  ``gather(token_index)`` -> [..., D] float32."""

  def __init__(self, shards: list[np.ndarray], offsets: np.ndarray):
    self.shards, self.offsets = shards, offsets
    self.starts = np.cumsum([0] + [len(s) for s in shards])  # flat index of each shard's first token
    if self.starts[-1] != offsets[-1]:
      raise ValueError(f"hidden cache holds {self.starts[-1]} tokens, its examples {offsets[-1]}")

  @property
  def num_tokens(self) -> int:
    return int(self.starts[-1])

  def gather(self, token_index) -> np.ndarray:
    idx = np.asarray(token_index)
    flat = idx.reshape(-1)
    which = np.searchsorted(self.starts, flat, side="right") - 1
    out = np.empty((flat.size, self.shards[0].shape[1]), np.float32)
    for k in np.unique(which):
      sel = which == k
      out[sel] = self.shards[k][flat[sel] - self.starts[k]]  # widened to float32 on assignment
    return out.reshape(idx.shape + (out.shape[1],))


def _hidden_fn(cfg: model_lib.ModelConfig):
  @jax.jit
  def hidden_of(base, tokens_BxL, lengths_B):
    L = tokens_BxL.shape[1]
    positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), tokens_BxL.shape)
    _, hidden, _ = model_lib.forward(cfg, base, tokens_BxL, positions, model_lib.causal_mask(lengths_B, L),
                                     logits=False)
    return hidden.astype(jnp.float32)
  return hidden_of


def _build_shard(hidden_of, cfg, base, source, seq_len: int, start: int, end: int, path: str, dtype: str,
                 bar, batch_size: int) -> None:
  """Runs the backbone over examples start..end-1 (shortest first, batched, one compile per length
  bucket) and writes their states to ``path`` atomically (a temporary file, renamed when whole)."""
  lengths = np.array([min(len(source[i]["tokens"]), seq_len) for i in range(start, end)], np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  t0 = time.perf_counter()
  fd, tmp = tempfile.mkstemp(suffix=".npy.tmp", dir=os.path.dirname(path))
  os.close(fd)
  try:
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=_ON_DISK[dtype],
                                     shape=(int(offsets[-1]), cfg.dim))
    order = np.argsort(lengths, kind="stable")
    for s in range(0, len(order), batch_size):
      idx = order[s:s + batch_size]
      rows = [np.asarray(source[start + int(i)]["tokens"][:seq_len]) for i in idx]
      rows += [rows[-1]] * (batch_size - len(rows))  # one shape per bucket
      tokens, lens = decode.pad_prompts([r.tolist() for r in rows], min(decode.bucket(max(map(len, rows))), seq_len))
      hidden = np.asarray(hidden_of(base, jnp.asarray(tokens), jnp.asarray(lens)))
      for j, i in enumerate(idx):
        out[offsets[i]:offsets[i + 1]] = hidden[j, :lengths[i]].astype(DTYPES[dtype]).view(_ON_DISK[dtype])
      bar.update(int(lengths[idx].sum()))
    out.flush()
    del out
    # What making this shard cost (experiments/data_curve.py reports the data's wall time).
    with open(path[:-4] + ".json", "w") as f:
      json.dump({"seconds": time.perf_counter() - t0, "tokens": int(offsets[-1]), "cpu": hardware.cpu_model()}, f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def cache_dir(cfg, base, data_dir: str, dataset: str, split: str, seq_len: int, dtype: str) -> str:
  return os.path.join(data_dir, "hidden", f"{dataset}_{split}_l{seq_len}_{dtype}_{fingerprint(cfg, base)}")


def for_split(cfg, base, source, seq_len: int, data_dir: str, dataset: str, split: str, *,
              num_examples: int | None = None, dtype: str = "bfloat16", batch_size: int = 8,
              shard_examples: int = SHARD_EXAMPLES) -> HiddenCache:
  """The cache of one split's first ``num_examples`` examples (all by default): its shards read
  where they exist (same dataset, row length, dtype and weights), the missing ones computed.
  The returned cache may cover a few more examples than asked (whole shards of ``shard_examples``;
  a caller that always reads the same prefix passes its length)."""
  if dtype not in DTYPES:
    raise ValueError(f"train.cache_dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  n = len(source) if num_examples is None else min(num_examples, len(source))
  directory = cache_dir(cfg, base, data_dir, dataset, split, seq_len, dtype)
  os.makedirs(directory, exist_ok=True)
  ranges = shard_ranges(len(source), n, shard_examples)
  offsets = offsets_of(source, seq_len, ranges[-1][1] if ranges else 0)
  paths = [os.path.join(directory, f"{s:07d}_{e:07d}.npy") for s, e in ranges]
  missing = []
  for (s, e), p in zip(ranges, paths):
    want = int(offsets[e] - offsets[s])
    if os.path.exists(p):
      got = np.load(p, mmap_mode="r")
      if got.shape == (want, cfg.dim) and got.dtype == _ON_DISK[dtype]:
        continue
      _log.warning("%s holds %s states, its examples %d tokens (another build?): computing it again.",
                   p, got.shape, want)
    missing.append(((s, e), p, want))
  if missing:
    todo = sum(w for _, _, w in missing)
    _log.info("Hidden states of %s/%s: %d of %d shards to compute (%d tokens), in %s.", dataset, split,
              len(missing), len(ranges), todo, directory)
    hidden_of = _hidden_fn(cfg)
    with tqdm(total=todo, desc=f"backbone hidden states ({split})", unit=" tok", unit_scale=True) as bar:
      for (s, e), p, _ in missing:
        _build_shard(hidden_of, cfg, base, source, seq_len, s, e, p, dtype, bar, batch_size)
  else:
    _log.info("Hidden states of %s/%s read from %s.", dataset, split, directory)
  return HiddenCache([_load(p) for p in paths], offsets)


def build_seconds(directory: str, num_tokens: int) -> float | None:
  """Wall seconds the shards holding the first ``num_tokens`` tokens took to build, from their
  records (None if a shard's record is missing)."""
  total, tokens = 0.0, 0
  for name in sorted(f for f in os.listdir(directory) if f.endswith(".npy")):
    if tokens >= num_tokens:
      break
    record = os.path.join(directory, name[:-4] + ".json")
    if not os.path.exists(record):
      return None
    with open(record) as f:
      r = json.load(f)
    total, tokens = total + r["seconds"], tokens + r["tokens"]
  return total
