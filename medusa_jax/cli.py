"""Flags shared by the decoding CLIs (generate, benchmark, calibrate): they override ``config.decode``."""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/smollm2.py", "Config file (configs/<name>.py[:variant]); override keys with "
    "--config.key=value, e.g. --config.decode.max_new_tokens=64.", lock_config=True)
MODE = flags.DEFINE_string("mode", None, "Decoding mode: vanilla | medusa (default: config.decode.mode).")
TREE = flags.DEFINE_string("tree", None, "Medusa tree: mc_sim_7b_63, chain:N, dense:k,d, or a JSON file "
                           "(e.g. one written by medusa_jax.calibrate).")
HEADS = flags.DEFINE_string("heads", None, "Medusa heads: 'random' (fresh random heads, for correctness "
                            "checks) or a directory in the original release's format.")
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A params export written by medusa_jax.train "
                                 "(WORKDIR/export): backbone + trained heads.")
ACCEPTANCE = flags.DEFINE_enum("acceptance", None, ["greedy", "typical", "sample"],
                               "Medusa acceptance: greedy (output identical to greedy decoding), typical "
                               "(fast, approximate), sample (exact sampling from the backbone).")
TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature (0 = greedy).")
MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Exactly this many new tokens at most.")
SEED = flags.DEFINE_integer("seed", None, "PRNG seed for sampling and random heads.")


def config():
  """The loaded config with the decoding flags applied."""
  c = _CONFIG.value
  with c.unlocked():
    for flag, key in ((MODE, "mode"), (TREE, "tree"), (ACCEPTANCE, "acceptance"),
                      (TEMPERATURE, "temperature"), (MAX_NEW_TOKENS, "max_new_tokens")):
      if flag.value is not None:
        c.decode[key] = flag.value
    if SEED.value is not None:
      c.seed = SEED.value
  return c

