"""A damaged training checkpoint (a truncated file in the newest step): the run resumes from the step
before, moves the damaged one aside (nothing deleted) and says so in one line; with no step before,
the error is one line naming the step directory to delete.

Run time: a few seconds on their own (``TrainCheckpoints`` on a small tree), plus a resume of a copy
of conftest's shared ``run_a`` (reused from tests/test_train.py and tests/test_faults.py when they run).
"""

import glob
import logging
import os
import shutil

import jax.numpy as jnp
import pytest

from medusa_jax import checkpoint as ckpt_lib
from medusa_jax.model import ModelConfig

CFG = ModelConfig(vocab_size=16, dim=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, mlp_dim=16)
META = {"cfg": CFG, "trainable": [["medusa/.*", "heads"]], "heads": {}, "model": "test"}


def _truncate_largest_file(step_dir: str) -> None:
  """Cuts the largest array file of the step in half, as a full disk or a killed copy would."""
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True) if os.path.isfile(f)]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def _state(step: int) -> dict:
  return {"params": {"w": jnp.arange(2000.0) * step}, "opt_state": {"mu": jnp.ones(5) * step}}


def test_a_truncated_newest_step_falls_back_to_the_one_before(tmp_path, caplog):
  ckpts = ckpt_lib.TrainCheckpoints(str(tmp_path), every=2, keep=3, meta=META)
  for step in (2, 4):
    ckpts.save(step, _state(step), {"position": step}, force=True)
  ckpts.close()
  _truncate_largest_file(str(tmp_path / "checkpoints" / "4"))

  ckpts = ckpt_lib.TrainCheckpoints(str(tmp_path), every=2, keep=3, meta=META)
  assert ckpts.latest_step() == 4  # damage shows only when the files are read
  with caplog.at_level(logging.WARNING, logger="medusa_jax.checkpoint"):
    step, state, data_state = ckpts.restore_latest(_state(0))
  assert step == 2 and data_state == {"position": 2}
  assert float(state["params"]["w"][1]) == 2.0
  (record,) = [r for r in caplog.records if r.name == "medusa_jax.checkpoint"]
  message = record.getMessage()
  assert "\n" not in message and len(message) < 400, message
  assert message.startswith("Checkpoint step 4 cannot be restored (") and "resumed from step 2" in message
  # Nothing is deleted, and the resumed run can save step 4 again.
  assert sorted(os.listdir(tmp_path / "checkpoints.unreadable")) == ["4"]
  assert ckpts.latest_step() == 2
  ckpts.save(4, _state(4), {"position": 4}, force=True)
  assert ckpts.latest_step() == 4
  ckpts.close()


def test_with_no_good_step_the_error_names_the_directory_to_delete(tmp_path):
  ckpts = ckpt_lib.TrainCheckpoints(str(tmp_path), every=2, keep=3, meta=META)
  ckpts.save(2, _state(2), {"position": 2}, force=True)
  ckpts.close()
  _truncate_largest_file(str(tmp_path / "checkpoints" / "2"))
  ckpts = ckpt_lib.TrainCheckpoints(str(tmp_path), every=2, keep=3, meta=META)
  with pytest.raises(ckpt_lib.CheckpointError) as info:
    ckpts.restore_latest(_state(0))
  ckpts.close()
  message = str(info.value)
  assert "\n" not in message and "TensorStore(" not in message, message
  assert f"Checkpoint step 2 in {tmp_path / 'checkpoints'} cannot be restored" in message
  assert f"delete {tmp_path / 'checkpoints' / '2'}" in message
  assert os.path.isdir(tmp_path / "checkpoints" / "2")  # left where it is: the user decides


def test_training_resumes_from_the_step_before_a_damaged_newest_one(run_a, tmp_path, caplog, capsys):
  from medusa_jax import trainer  # pylint: disable=g-import-not-at-top
  c, workdir, _, _ = run_a
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)  # run_a is other tests' reference: damage a copy
  steps = sorted(int(n) for n in os.listdir(os.path.join(copy, "checkpoints")) if n.isdigit())
  newest, before = steps[-1], steps[-2]
  _truncate_largest_file(os.path.join(copy, "checkpoints", str(newest)))
  with caplog.at_level(logging.WARNING, logger="medusa_jax.checkpoint"):
    out = trainer.train_and_evaluate(c, copy, stop_after=0)  # resume, take no step
  assert out["step"] == before
  assert f"Resumed from step {before}" in capsys.readouterr().out
  assert any(f"Checkpoint step {newest} cannot be restored" in r.getMessage() and
             f"resumed from step {before}" in r.getMessage() for r in caplog.records)
  assert os.listdir(os.path.join(copy, "checkpoints.unreadable")) == [str(newest)]
