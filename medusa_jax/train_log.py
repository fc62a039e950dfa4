"""What the train loop reports: progress lines, TensorBoard scalars, and skipped non-finite steps.

Host 0 writes; the other hosts of a multi-host run keep quiet (they compute the same metrics).
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm


class Writer:
  """Metrics to TensorBoard event files (``workdir/tb``)."""

  def __init__(self, workdir):
    self.tb = SummaryWriter(os.path.join(workdir, "tb")) if jax.process_index() == 0 else None

  def write(self, step: int, metrics: dict, prefix: str = "train"):
    if self.tb is None:
      return
    for k, v in metrics.items():
      self.tb.add_scalar(f"{prefix}/{k}", float(v), step)
    self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def say(msg: str) -> None:
  """Progress lines on stdout (host 0), above the progress bar. Library INFO logs (Orbax logs every
  file it writes) stay off unless --verbosity asks for them."""
  if jax.process_index() == 0:
    tqdm.write(msg)


def summary(metrics: dict, keys=("loss", "heads_loss", "head1/top1", "head2/top1", "head3/top1",
                                 "lm/loss", "lm/kl", "grad_norm", "steps_per_s")) -> str:
  return " ".join(f"{k}={float(metrics[k]):.4g}" for k in keys if k in metrics)


class NonFiniteError(RuntimeError):
  """Too many train steps in a row had a non-finite loss or gradient norm; the message is one line."""


class NonFiniteSteps:
  """Skipped steps (``metrics['skipped']``), read only when the loop syncs with the device anyway.

  The loop hands over every step's flag as a device array; ``check`` fetches the flags gathered
  since its last call (at log steps and before each save), logs each skipped step with the data
  position of its batch, and raises ``NonFiniteError`` once ``limit`` steps in a row were skipped,
  so a save never follows such a streak: the newest checkpoint is the last good state.
  """

  def __init__(self, limit: int):
    self.limit = limit
    self.streak = 0
    self.total = 0
    self._pending = []

  def add(self, step: int, position, metrics: dict) -> None:
    self._pending.append((step, position, metrics))

  def check(self, newest_checkpoint: Callable[[], int | None]) -> int:
    """Logs the pending skipped steps and returns how many there were; raises on a streak."""
    pending, self._pending = self._pending, []
    flags = jax.device_get([m["skipped"] for _, _, m in pending])
    skipped = 0
    for (step, position, m), flag in zip(pending, flags):
      if not flag:
        self.streak = 0
        continue
      skipped += 1
      self.total += 1
      self.streak += 1
      loss, grad_norm = jax.device_get((m["loss"], m["grad_norm"]))
      say(f"step {step}: skipped (loss={float(loss):.4g}, grad_norm={float(grad_norm):.4g} not finite); params "
          f"and optimizer state unchanged. Its batch: number {step - 1} of the data stream, read from data "
          f"position {json.dumps(position)}; {self.streak} skipped in a row.")
      if self.limit and self.streak >= self.limit:
        newest = newest_checkpoint()
        kept = f"the newest checkpoint (step {newest}) is the last good state" if newest is not None else (
            "no checkpoint was saved")
        raise NonFiniteError(
            f"Training stopped at step {step}: {self.streak} steps in a row had a non-finite loss or gradient "
            f"norm (config.train.max_nonfinite_steps={self.limit}); {kept}. Check the data at the logged "
            "positions, or lower config.train.lr.")
    return skipped
