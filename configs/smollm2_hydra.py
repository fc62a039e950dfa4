"""Sequential (Hydra-style) heads on SmolLM2-135M-Instruct: the Medusa-1 recipe, but head m also
reads the tokens drafted before it on its tree path (frozen backbone, self-distilled ShareGPT).

  python -m medusa_jax.distill --config configs/smollm2_hydra.py
  python -m medusa_jax.train --config configs/smollm2_hydra.py --workdir runs/smollm2_hydra
  python -m medusa_jax.calibrate --config configs/smollm2_hydra.py --checkpoint runs/smollm2_hydra/export \
      --nodes 0 --max_nodes 16 --sizes 1,2,3,4,5,6,8,10,12,16 --out runs/smollm2_hydra/tree.json
  python -m medusa_jax.benchmark --config configs/smollm2_hydra.py --checkpoint runs/smollm2_hydra/export \
      --tree runs/smollm2_hydra/tree.json --modes vanilla,medusa --num_prompts 10 --max_new_tokens 128

The same distilled data, steps and draft vocabulary as configs/smollm2_medusa1.py, so the two
compare head for head. Variants: ``:tiny`` (a 2-layer random model, a few steps: for tests).
"""

from medusa_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.sibling_config(__file__, "smollm2_medusa1.py").get_config()
  c.heads.kind = "sequential"
  # The root token is the first token of every head's path: a separate next-token input would read
  # it twice.
  c.heads.next_token_input = False
  return config_lib.apply_variants(c, arg, VARIANTS, "configs/smollm2_hydra.py")


VARIANTS = {"tiny": config_lib.tiny}
