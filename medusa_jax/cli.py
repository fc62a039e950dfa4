"""Flags shared by the decoding CLIs (generate, benchmark, calibrate): they override ``config.decode``.

Their values are checked here, before the model loads, so a typo costs a second rather than the
load, and is an ``error:`` line rather than a traceback from inside a jitted program.
"""

from __future__ import annotations

import math
import os
import types

from absl import flags
from ml_collections import config_flags

MODES = ("vanilla", "medusa")
ACCEPTANCES = ("greedy", "typical", "sample")  # medusa.ACCEPTANCES, without importing jax here
BONUS_RULES = ("greedy", "sample")  # medusa.BONUS_RULES

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
ACCEPTANCE = flags.DEFINE_enum("acceptance", None, list(ACCEPTANCES),
                               "Medusa acceptance: greedy (output identical to greedy decoding), typical "
                               "(fast, approximate), sample (exact sampling from the backbone).")
TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature (0 = greedy).")
MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Exactly this many new tokens at most.")
SEED = flags.DEFINE_integer("seed", None, "PRNG seed for sampling and random heads.")

_FLAG_OF = {"mode": MODE, "tree": TREE, "acceptance": ACCEPTANCE, "temperature": TEMPERATURE,
            "max_new_tokens": MAX_NEW_TOKENS}


def config():
  """The loaded config with the decoding flags applied, its decoding values checked."""
  c = _CONFIG.value
  with c.unlocked():
    for key, flag in _FLAG_OF.items():
      if flag.value is not None:
        c.decode[key] = flag.value
    if SEED.value is not None:
      c.seed = SEED.value
  check_decode(c)
  _check_weights()
  return c


def _check_weights() -> None:
  """--checkpoint and --heads name what exists (whatever the mode: an export may hold a backbone)."""
  if CHECKPOINT.value:
    from medusa_jax import checkpoint  # pylint: disable=g-import-not-at-top
    checkpoint.check_export(CHECKPOINT.value)
  elif HEADS.value and HEADS.value != "random" and not os.path.isdir(HEADS.value):
    raise ValueError(f"--heads {HEADS.value}: no such directory; pass 'random' or a directory of heads "
                     "(the original release's format, or a medusa_jax export).")


def _named(key: str) -> str:
  """How the user set ``config.decode.<key>``: by its own flag, or by the config (file or override)."""
  flag = _FLAG_OF.get(key)
  return f"--{flag.name}" if flag is not None and flag.present else f"config.decode.{key}"


def check_decode(c) -> None:
  """``config.decode``'s values, checked before anything loads (see the module docstring)."""
  d = c.decode
  if d.mode not in MODES:
    raise ValueError(f"{_named('mode')} {d.mode!r} is not a decoding mode: use one of {', '.join(MODES)}.")
  if d.acceptance not in ACCEPTANCES:
    raise ValueError(f"{_named('acceptance')} {d.acceptance!r}: use one of {', '.join(ACCEPTANCES)}.")
  if d.typical_bonus not in BONUS_RULES:
    raise ValueError(f"config.decode.typical_bonus {d.typical_bonus!r}: use one of {', '.join(BONUS_RULES)}.")
  t = float(d.temperature)
  if not (math.isfinite(t) and t >= 0):
    raise ValueError(f"{_named('temperature')} must be 0 (greedy) or more, not {d.temperature:g}.")
  if not 0 < float(d.top_p) <= 1:
    raise ValueError(f"config.decode.top_p must be in (0, 1], not {d.top_p:g}.")
  if int(d.max_new_tokens) < 1 or int(d.max_new_tokens) != d.max_new_tokens:
    raise ValueError(f"{_named('max_new_tokens')} must be a whole number of tokens, at least 1, not "
                     f"{d.max_new_tokens}.")


def check_medusa(c, vanilla: str | None = "--mode vanilla") -> None:
  """What Medusa decoding needs besides ``config.decode``, checked before the model loads: heads that
  were trained (or explicitly random), a tree that parses, a temperature its acceptance allows.
  ``vanilla``: how this tool is told to decode without heads instead (None: it cannot)."""
  if not (CHECKPOINT.value or HEADS.value):
    # Without either, the heads would be freshly initialised identity blocks: Medusa decoding that
    # runs, accepts almost nothing and looks like a slow vanilla decoder.
    raise ValueError("Medusa decoding needs heads: pass --checkpoint WORKDIR/export (written by "
                     "medusa_jax.train) or --heads DIR (the original release's format); --heads random "
                     "for untrained random heads" + (f"; or {vanilla}." if vanilla else "."))
  from medusa_jax import tree  # pylint: disable=g-import-not-at-top
  tree.resolve(c.decode.tree)  # its depth is checked against the heads once they are loaded
  if c.decode.acceptance == "greedy" and float(c.decode.temperature) > 0:
    from medusa_jax import decode, medusa  # pylint: disable=g-import-not-at-top
    # check_sampling reads only the acceptance; a whole MedusaSpec would need the loaded heads.
    medusa.check_sampling(types.SimpleNamespace(acceptance="greedy"),
                          decode.Sampling(temperature=float(c.decode.temperature)))
