"""SmolLM2-135M-Instruct, the embedded default: chat, vanilla and Medusa decoding, benchmarks.

  python -m medusa_jax.generate --config configs/smollm2.py --prompt "Why is the sky blue?"
  python -m medusa_jax.benchmark --config configs/smollm2.py --num_prompts 10 --max_new_tokens 128 \
      --modes vanilla,medusa --heads random --tree mc_sim_7b_63 --out runs/results.json

Variants: ``configs/smollm2.py:tiny`` (short generations, for tests).
"""

from medusa_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.default_config()
  if arg == "tiny":
    c.decode.max_new_tokens = 16
    c.decode.tree = "chain:3"
  elif arg:
    raise ValueError(f"Unknown variant {arg!r} of configs/smollm2.py (known: tiny)")
  return c
