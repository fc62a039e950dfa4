"""Teacher-forced soft-label data at scale: the sharded hidden-state cache, the token budget, held-out prompts.

The cache (medusa_jax/hidden_cache.py) must give every token the backbone's own hidden state, so
the KL teacher computed from it (``loss.teacher_logits``) is the backbone's own logits there; it
must survive a kill mid-build and grow with the budget without recomputing what it holds. The
budget (``data.max_tokens``) cuts the train split only; nothing held out reaches training.
"""

import itertools
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from medusa_jax import convert
from medusa_jax import data as data_lib
from medusa_jax import hidden_cache
from medusa_jax import loader as loader_lib
from medusa_jax import loss as loss_lib
from medusa_jax import model as model_lib
from medusa_jax import prompts as prompts_lib
from medusa_jax import train_data

from conftest import tiny_train_parts, train_config


@pytest.fixture(scope="module")
def parts(data_dir):
  c, cfg, hcfg, params, _, _ = tiny_train_parts(data_dir)
  train, _ = train_data.sources(c, convert.load_model(c.model)[2])
  return c, cfg, hcfg, params, train


def _id(example) -> str:
  return example["id"].decode() if isinstance(example["id"], bytes) else str(example["id"])


def _alone(cfg, base, tokens):
  """The backbone's final hidden states and logits of one example run alone (the decoder's view)."""
  L = len(tokens)
  logits, h, _ = model_lib.forward(cfg, base, jnp.asarray(tokens)[None], jnp.arange(L)[None],
                                   model_lib.causal_mask(jnp.array([L]), L))
  return np.asarray(h[0], np.float64), np.asarray(logits[0], np.float64)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_teacher_from_the_cache_is_the_backbones_own_logits(parts, tmp_path, dtype):
  """Packed loader rows -> token_index -> cached states -> teacher logits over the draft vocabulary,
  at every real token of every segment, against a NumPy projection of the example's own forward
  (and its logits): float32 to rounding, bfloat16 to its 2^-9 relative rounding of the states."""
  c, cfg, hcfg, params, train = parts
  L = int(c.train.seq_len)
  cache = hidden_cache.for_split(cfg, params["base"], train, L, str(tmp_path), "ds", "train", dtype=dtype)
  it = loader_lib.make_loader(train, batch_size=2, seq_len=L, seed=0, pack=True, token_offsets=cache.offsets)
  batch = next(iter(it))
  hidden = cache.gather(batch["token_index"])
  teacher = np.asarray(loss_lib.teacher_logits(hcfg, cfg, params, jnp.asarray(hidden)), np.float64)
  ids = np.asarray(params["medusa"]["vocab_ids"])
  w_lm = np.asarray(model_lib.lm_head_weight(cfg, params["base"]), np.float64)  # [D, V]
  checked = 0
  for b in range(2):
    for seg in set(np.unique(batch["segment_ids"][b])) - {0}:
      where = np.flatnonzero(batch["segment_ids"][b] == seg)
      example = train[int(batch["id"][b, where[0]]) - 1]
      h_ref, logits_ref = _alone(cfg, params["base"], np.asarray(example["tokens"][:L]))
      tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=0.0, atol=0.02 * np.abs(logits_ref).max())
      np.testing.assert_allclose(teacher[b, where], (h_ref @ w_lm)[:, ids], **tol)
      np.testing.assert_allclose(teacher[b, where], logits_ref[:, ids], **tol)
      checked += len(where)
  assert checked > L  # packed rows: more than one example checked


class _Killed(Exception):
  pass


def test_a_killed_build_resumes_and_a_larger_budget_extends_the_cache(parts, tmp_path, monkeypatch):
  c, cfg, hcfg, params, train = parts
  L = int(c.train.seq_len)
  full = hidden_cache.for_split(cfg, params["base"], train, L, str(tmp_path / "ref"), "ds", "train", shard_examples=8)
  ref32 = hidden_cache.for_split(cfg, params["base"], train, L, str(tmp_path / "ref"), "ds", "train", dtype="float32",
                                 shard_examples=8)
  # Killed while computing its third shard: the two before it are kept, the partial one is not.
  real, calls = hidden_cache._build_shard, []

  def dies_on_the_third(*args, **kw):
    calls.append(args[5:7])
    if len(calls) == 3:
      raise _Killed
    return real(*args, **kw)

  monkeypatch.setattr(hidden_cache, "_build_shard", dies_on_the_third)
  with pytest.raises(_Killed):
    hidden_cache.for_split(cfg, params["base"], train, L, str(tmp_path / "wd"), "ds", "train", num_examples=20,
                            shard_examples=8)
  d = hidden_cache.cache_dir(cfg, params["base"], str(tmp_path / "wd"), "ds", "train", L, "bfloat16")
  assert sorted(f for f in os.listdir(d) if f.endswith(".npy")) == ["0000000_0000008.npy", "0000008_0000016.npy"]
  assert not [f for f in os.listdir(d) if f.endswith(".tmp")]
  # The rerun computes only the missing shard; a larger budget only the shards past it.
  calls.clear()
  part = hidden_cache.for_split(cfg, params["base"], train, L, str(tmp_path / "wd"), "ds", "train", num_examples=20,
                            shard_examples=8)
  assert calls == [(16, 24)] and len(part.offsets) == 25
  calls.clear()
  more = hidden_cache.for_split(cfg, params["base"], train, L, str(tmp_path / "wd"), "ds", "train", num_examples=30,
                                 shard_examples=8)
  assert calls == [(24, 32)]
  idx = np.arange(more.num_tokens)
  np.testing.assert_array_equal(more.gather(idx), full.gather(idx))
  assert hidden_cache.build_seconds(d, more.num_tokens) > 0
  # bfloat16 on disk, float32 when read: the rounding of the float32 states.
  np.testing.assert_array_equal(more.gather(idx),
                                ref32.gather(idx).astype(ml_dtypes.bfloat16).astype(np.float32))


def test_the_token_budget_cuts_the_train_split_only_and_nothing_held_out_trains(data_dir):
  c = train_config(data_dir)
  _, _, tok = convert.load_model(c.model)
  full, heldout = train_data.sources(c, tok)
  lengths = [min(len(full[i]["tokens"]), c.train.seq_len) for i in range(len(full))]
  budget = sum(lengths[:10]) - 1
  c.data.max_tokens = budget
  train, heldout_b = train_data.sources(c, tok)
  assert len(train) == 10 and sum(lengths[:len(train)]) >= budget > sum(lengths[:len(train) - 1])
  assert len(heldout_b) == len(heldout)  # the held-out split is never cut by the budget
  # One epoch of the budget: its tokens over the rows of a step.
  c.train.epochs = 2.0
  assert train_data.steps_for_epochs(c, train) == round(2 * sum(lengths[:10]) / (c.train.batch_size * c.train.seq_len))
  # No training example is held out by its id; the prompts calibration and the held-out benchmark
  # read are held out, so none of their conversations trains.
  train_ids = {_id(full[i]) for i in range(len(full))}
  assert not any(data_lib.is_heldout(i, c.data.heldout_fraction) for i in train_ids)
  reserved = list(itertools.islice(prompts_lib.sharegpt_prompts(
      tok, split="heldout", heldout_fraction=c.data.heldout_fraction, max_prompt_len=10_000), 50))
  assert reserved and not {p.id for p in reserved} & train_ids
  assert all(data_lib.is_heldout(_id(heldout[i]), c.data.heldout_fraction)
             for i in range(len(heldout)))
