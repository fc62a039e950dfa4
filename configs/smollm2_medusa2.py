"""Medusa-2 on SmolLM2-135M-Instruct: heads first, then heads + backbone jointly (self-distilled data).

  python -m medusa_jax.distill --config configs/smollm2_medusa2.py
  python -m medusa_jax.train --config configs/smollm2_medusa2.py --workdir runs/smollm2_medusa2

The recipe (the Medusa paper's Medusa-2): loss = L_LM + lambda0 * sum_k 0.8^k L_k; on self-distilled data L_LM is
KL(original backbone || trained backbone) and lambda0 is small and sine-ramped from the joint
stage's first step; the heads' learning rate is 4x the backbone's; a heads-only stage comes first
(the backbone's optimizer state begins with the joint stage). The backbone trains through LoRA
adapters (rank 32, alpha 16, every attention and MLP matrix), as in the released recipe; the
export merges them into the backbone. Variants: ``:tiny``, ``:full_backbone`` (every backbone
weight trains instead of adapters), combinable (``configs/smollm2_medusa2.py:tiny,full_backbone``).
"""

from medusa_jax import config as config_lib


def _medusa1():
  return config_lib.sibling_config(__file__, "smollm2_medusa1.py")


def get_config(arg=None):
  c = _medusa1().get_config()
  # Medusa-2 differs from Medusa-1 only here.
  c.train.trainable = (("medusa/vocab_ids", None), ("medusa/.*", "heads"), ("lora/.*", "backbone"),
                       ("base/.*", None))
  c.train.lora.rank = 32
  c.train.lora.alpha = 16.0
  c.train.cache_hidden = False  # the backbone trains: its hidden states change every step
  c.train.group_lr_mult = (("heads", 1.0), ("backbone", 0.25))  # 2e-3 vs 5e-4 in the paper: 4x
  c.train.lr = 2e-3
  c.train.heads_only_steps = 150
  c.train.backbone_warmup_steps = 40
  c.train.lm_weight = 1.0
  c.train.lm_loss = "kl"
  c.train.lambda0 = 0.01            # small with the KL loss (0.2 with plain next-token CE)
  c.train.lambda0_schedule = "sine"
  c.train.lambda0_ramp_steps = 50
  return config_lib.apply_variants(c, arg, VARIANTS, "configs/smollm2_medusa2.py")


def full_backbone(c):
  """Every backbone weight trains (no adapters): the paper's own text, not its released recipe."""
  c.train.trainable = (("medusa/vocab_ids", None), ("medusa/.*", "heads"), ("base/.*", "backbone"))
  c.train.lora.rank = 0


VARIANTS = {"tiny": config_lib.tiny, "full_backbone": full_backbone}
