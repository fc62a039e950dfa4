r"""Train Medusa heads (Medusa-1) or heads + backbone (Medusa-2).

  python -m medusa_jax.train --config configs/smollm2_medusa1.py --workdir runs/m1
  python -m medusa_jax.train --config configs/smollm2_medusa1.py:tiny --workdir runs/tiny \
      --config.train.steps=20

Restarting the same command resumes from the newest checkpoint in --workdir. Metrics go to stdout
and to TensorBoard (``tensorboard --logdir WORKDIR/tb``); the params for decoding are exported to
WORKDIR/export (use ``--checkpoint WORKDIR/export`` with generate, benchmark and calibrate).
"""

import os
import tempfile

from absl import flags
from ml_collections import config_flags

from medusa_jax import entry

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:variant]); "
                                          "override keys with --config.train.steps=100 etc.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and the export go.")
flags.mark_flags_as_required(["config", "workdir"])


def check_workdir(workdir: str) -> None:
  """Fails at once on a --workdir that cannot be written, not after the model and data are ready."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f"--workdir {workdir} cannot be written ({e.strerror or e}): pass a directory you can "
                     "write to.") from None


def main(argv):
  del argv
  check_workdir(_WORKDIR.value)
  # JAX and the model's libraries load only now (seconds): a bad --workdir, or --help, costs none of it.
  from medusa_jax import runtime, train_log, trainer  # pylint: disable=g-import-not-at-top
  runtime.quiet_jax_logs()
  out = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if out["stopped"] is None:  # a stop by a signal has said so, and how to resume
    train_log.say(f"done at step {out['step']}; last eval: {train_log.summary(out['eval'])}")


def run_cli():
  """The console script (`medusa-train`): `main` with one-line errors."""
  entry.run(main)


if __name__ == "__main__":
  run_cli()
