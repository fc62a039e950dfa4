"""Medusa-2 on Vicuna-7B v1.3: heads first, then heads + backbone jointly on ShareGPT.

  python -m medusa_jax.fit --config configs/vicuna7b_medusa2.py --devices 8
  python -m medusa_jax.train --config configs/vicuna7b_medusa2.py \
      --config.model=/data/vicuna-7b-v1.3 --workdir runs/vicuna7b_medusa2
  # starting from the release's Medusa-1 heads, the heads-only stage can be skipped:
  python -m medusa_jax.train --config configs/vicuna7b_medusa2.py --config.model=/data/vicuna-7b-v1.3 \
      --config.heads_dir=/data/medusa-vicuna-7b-v1.3 --config.train.heads_only_steps=0 \
      --workdir runs/vicuna7b_medusa2

The recipe (the Medusa paper's Medusa-2): loss = L_LM + lambda0 * sum_k 0.8^k L_k with lambda0 = 0.2 and plain
next-token CE for L_LM (ShareGPT is Vicuna's own fine-tuning data, so no self-distillation); the
heads' learning rate is 4x the backbone's (2e-3 vs 5e-4). As in the release, the backbone trains
through LoRA adapters (rank 32, alpha 16), merged into it by the export. Variants: ``:gpu8``
(default), ``:tpu`` (multi-host launch: docs/scale_out.md), ``:full_backbone`` (every weight trains:
compare the fit checks of ``configs/vicuna7b_medusa2.py`` and ``configs/vicuna7b_medusa2.py:full_backbone``).
"""

from medusa_jax import config as config_lib


def _medusa1():
  return config_lib.sibling_config(__file__, "vicuna7b_medusa1.py")


def full_backbone(c):
  """Every backbone weight trains (no adapters): needs the backbone's Adam moments too (fit check)."""
  c.train.trainable = (("medusa/vocab_ids", None), ("medusa/.*", "heads"), ("base/.*", "backbone"))
  c.train.lora.rank = 0


VARIANTS = {"full_backbone": full_backbone}


def get_config(arg=None):
  mine, placement = config_lib.split_variants(arg, VARIANTS)
  c = _medusa1().get_config(placement)
  # Medusa-2 differs from Medusa-1 only here. The backbone trains through LoRA adapters (the
  # released recipe: rank 32, alpha 16): no Adam moments for its 6.7B weights.
  c.train.trainable = (("medusa/vocab_ids", None), ("medusa/.*", "heads"), ("lora/.*", "backbone"),
                       ("base/.*", None))
  c.train.lora.rank = 32
  c.train.lora.alpha = 16.0
  c.train.group_lr_mult = (("heads", 1.0), ("backbone", 0.25))
  c.train.lr = 2e-3
  c.train.heads_only_steps = c.train.steps // 4
  c.train.backbone_warmup_steps = 40
  c.train.lm_weight = 1.0
  c.train.lm_loss = "ce"
  c.train.lambda0 = 0.2
  # The loader stores weights in config.dtype and the trained backbone stays in it: keep it float32
  # so that small updates are not rounded away (bf16 has 8 significant bits).
  c.dtype = "float32"
  # The backward pass runs through all 32 layers and the model has no per-layer remat yet, so every
  # layer's activations are kept: 1 row of 1024 tokens per device (fit check on 8 devices: ~62 GiB
  # per device, XLA:CPU's estimate; 2048 tokens: ~101 GiB).
  c.train.batch_size = c.train.batch_size // 4
  c.train.seq_len = 1024
  return config_lib.apply_variants(c, mine, VARIANTS, "configs/vicuna7b_medusa2.py")
