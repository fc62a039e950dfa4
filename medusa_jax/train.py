"""Train Medusa heads (Medusa-1) or heads + backbone (Medusa-2).

  python -m medusa_jax.train --config configs/smollm2_medusa1.py --workdir runs/m1
  python -m medusa_jax.train --config configs/smollm2_medusa1.py:tiny --workdir runs/tiny \
      --config.train.steps=20

Restarting the same command resumes from the newest checkpoint in --workdir. Metrics go to stdout
and to TensorBoard (``tensorboard --logdir WORKDIR/tb``); the params for decoding are exported to
WORKDIR/export (use ``--checkpoint WORKDIR/export`` with generate, benchmark and calibrate).
"""

from absl import flags
from ml_collections import config_flags

from medusa_jax import entry, runtime, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:variant]); "
                                          "override keys with --config.train.steps=100 etc.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and the export go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  runtime.quiet_jax_logs()
  out = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if out["stopped"] is None:  # a stop by a signal has said so, and how to resume
    trainer.say(f"done at step {out['step']}; last eval: {trainer._summary(out['eval'])}")  # pylint: disable=protected-access


if __name__ == "__main__":
  entry.run(main)
