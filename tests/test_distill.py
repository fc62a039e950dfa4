"""Tests of self-distillation (medusa_jax/distill.py): the replies file, resume after a kill, the TFDS dataset."""

import json
import os

import pytest

from medusa_jax import config as config_lib
from medusa_jax import data
from medusa_jax import decode
from medusa_jax import distill
from medusa_jax import prompts as prompts_lib
from medusa_jax import runtime


def _config(model_dir, tmp_path, num_prompts):
  c = config_lib.default_config()
  c.model = model_dir
  c.distill.num_prompts = num_prompts
  c.distill.num_eval_prompts = 0  # the counts below are of train prompts only
  c.distill.batch_size = 2  # several batches out of a handful of prompts
  c.distill.max_new_tokens = 8
  c.distill.max_prompt_len = 128
  c.data.data_dir = str(tmp_path / "data")
  c.data.max_len = 160
  return c


def _lines(path):
  with open(path) as f:
    return [json.loads(l) for l in f]


class _Interrupt(Exception):
  pass


def test_default_workdir_is_shared_by_every_num_prompts():
  # The replies of a larger run extend a smaller one: num_prompts is not in the workdir.
  c = config_lib.default_config()
  c3 = config_lib.default_config()
  c3.distill.num_prompts = 7
  assert distill.default_workdir(c3) == distill.default_workdir(c)


def test_replies_with_unicode_line_separators_survive(tmp_path):
  # A real SmolLM2 reply contained such a character; str.splitlines() cut its record in two and
  # the resume logic dropped it as a broken line.
  path = str(tmp_path / distill.REPLIES_FILE)
  recs = [{"id": f"a{i}", "conversations": [{"from": "human", "value": "q"},
                                            {"from": "gpt", "value": f"x{sep}y"}]}
          for i, sep in enumerate(["\u2028", "\u2029", "\x1c", "\x85", "\x0b", "\x0c", "\r"])]
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
  got = distill.read_replies(path)
  assert [got[r["id"]] for r in recs] == recs
  assert distill.read_replies(path) == got  # and the file was not rewritten without them
  # Written before replies recorded their generation time: no time is made up for them.
  assert distill.generation_seconds(str(tmp_path), ["a0"]) is None


def test_resume_after_a_kill_and_a_larger_run(tiny_chat_dir, tmp_path, monkeypatch):
  out = str(tmp_path / "replies")
  replies = os.path.join(out, distill.REPLIES_FILE)
  c4 = _config(tiny_chat_dir, tmp_path, 4)
  loaded = runtime.load(c4)

  calls = []
  real_generate = decode.Decoder.generate

  def counting(self, params, prompts, rng=None):
    calls.append(len(prompts))
    if kill_after is not None and len(calls) > kill_after:
      raise _Interrupt("killed")
    return real_generate(self, params, prompts, rng)

  monkeypatch.setattr(decode.Decoder, "generate", counting)

  # Killed during the second batch: the first batch is on disk; then a kill mid-write leaves half a line.
  kill_after = 1
  with pytest.raises(_Interrupt):
    distill.distill(c4, loaded, out)
  assert len(_lines(replies)) == 2
  with open(replies, "a") as f:
    f.write('{"id": "half-written", "conversa')

  kill_after, calls[:] = None, []
  name4 = distill.distill(c4, loaded, out)
  assert calls == [2]  # only the two missing prompts were generated
  first = _lines(replies)
  assert len(first) == 4 and len({r["id"] for r in first}) == 4

  c8 = _config(tiny_chat_dir, tmp_path, 8)
  calls[:] = []
  name8 = distill.distill(c8, loaded, out)
  assert calls == [2, 2]
  recs = _lines(replies)
  ids = [r["id"] for r in recs]
  assert len(ids) == 8 and len(set(ids)) == 8
  assert recs[:4] == first  # earlier replies are kept as they were
  assert not any(data.is_heldout(i, c8.data.heldout_fraction) for i in ids)
  # The first 8 train-split prompts, in file order.
  expected = [p.id for p in prompts_lib.select_prompts(c8, loaded.tokenizer)]
  assert sorted(ids) == sorted(expected)
  for r in recs:
    turns = r["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt"] and isinstance(turns[1]["value"], str)

  # Both datasets exist under their own names and load back.
  assert name4 != name8 == prompts_lib.distilled_dataset_name(c8)
  train = data.load_split(c8.data.data_dir, name8, "train")
  held = data.load_split(c8.data.data_dir, name8, "heldout")
  meta = data.dataset_metadata(c8.data.data_dir, name8)
  assert len(train) + len(held) == meta["counts"]["train"] + meta["counts"]["heldout"] > 0
  stored = {train[i]["id"].decode() for i in range(len(train))} | {held[i]["id"].decode() for i in range(len(held))}
  assert stored <= set(ids)
  ex = train[0]
  assert ex["loss_mask"].sum() > 0 and len(ex["tokens"]) <= c8.data.max_len

  # Each reply carries its share of its batch's wall time; the data curve sums them per budget.
  assert all(r["seconds"] >= 0 for r in recs)
  train_ids = [train[i]["id"] for i in range(len(train))]  # bytes, as the dataset stores them
  want = sum(r["seconds"] for r in recs if r["id"].encode() in train_ids)
  assert distill.generation_seconds(out, train_ids) == pytest.approx(want)
  assert distill.generation_seconds(out, train_ids + [b"not-a-reply"]) is None

  # A finished run is not redone; other settings in the same workdir are refused.
  calls[:] = []
  assert distill.distill(c8, loaded, out) == name8 and calls == []
  c_other = _config(tiny_chat_dir, tmp_path, 8)
  c_other.distill.max_new_tokens = 9
  with pytest.raises(ValueError, match="use another --workdir"):
    distill.distill(c_other, loaded, out)
