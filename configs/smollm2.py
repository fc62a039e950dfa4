"""SmolLM2-135M-Instruct, the embedded default: chat, vanilla and Medusa decoding, benchmarks.

  python -m medusa_jax.generate --config configs/smollm2.py --prompt "Why is the sky blue?"
  python -m medusa_jax.benchmark --config configs/smollm2.py --num_prompts 10 --max_new_tokens 128 \
      --modes vanilla,medusa --heads random --tree mc_sim_7b_63 --out runs/results.json

Variants: ``configs/smollm2.py:tiny`` (a 2-layer random model, short generations: for tests).
"""

from medusa_jax import config as config_lib


VARIANTS = {"tiny": config_lib.tiny}


def get_config(arg=None):
  return config_lib.apply_variants(config_lib.default_config(), arg, VARIANTS, "configs/smollm2.py")
