"""The config schema: defaults and variants (``configs/x.py:tiny,lora``).

Config files in ``configs/`` start from ``default_config()`` and change what they need; the CLIs load
them with ``config_flags.DEFINE_config_file(..., lock_config=True)``, so an unknown key in a file or
an override such as ``--config.trian.steps=3`` fails at once with the list of valid keys. Modules never
see a ConfigDict: each turns the part it reads into its hashable dataclass at the boundary
(``heads.config_from``, ``lora.config_from``, ``decode.sampling_from``, ``medusa.spec_from``,
``runtime.model_overrides``), so this schema imports nothing of the decoding stack.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from medusa_jax import bundled

ConfigDict = ml_collections.ConfigDict


def default_config() -> ConfigDict:
  c = ConfigDict()
  # A short name (the bundled SmolLM2), an HF safetensors directory, or a .gguf file.
  c.model = bundled.SMOLLM2
  c.dtype = "float32"  # fp32 on CPU (bf16 matmuls are ~8x slower on XLA-CPU); bfloat16 on GPU/TPU.
  c.seed = 0
  # Optional: training starts from these heads: the original release's format, or a medusa_jax
  # export (Medusa-2 from a Medusa-1 run: --config.heads_dir=runs/m1/export
  # --config.train.heads_only_steps=0).
  c.heads_dir = ""

  # draft_vocab > 0: heads propose only the N most frequent training tokens (exact verification
  # is unchanged; their LM projection shrinks V/N times, for training and for decoding).
  # next_token_input: heads also read the backbone's next token (not in the paper; heads.py).
  # kind: medusa (the paper's heads) | sequential (Hydra-style: head m also reads its drafted path).
  # prefix_layer: one decoder layer over the backbone's hidden states feeds the heads (Hydra++; heads.py).
  c.heads = ConfigDict(dict(num_heads=5, num_layers=1, shared_lm_head=True, draft_vocab=0,
                            next_token_input=False, kind="medusa", prefix_layer=False))

  c.decode = ConfigDict(dict(
      mode="vanilla",          # vanilla | medusa
      tree="mc_sim_7b_63",     # a named tree, chain:N, dense:k,d, or a JSON file
      acceptance="greedy",     # greedy | typical | sample
      temperature=0.0,
      top_p=1.0,
      typical_epsilon=0.09,
      typical_delta=0.3,
      typical_bonus="greedy",  # typical acceptance's unverified tokens: greedy (the paper) | sample
      max_new_tokens=128,
  ))

  # Training data: ShareGPT rendered with the chat template, assistant tokens in the loss.
  c.data = ConfigDict(dict(
      source="distilled",     # distilled (self-distillation replies) | sharegpt (the original replies)
      data_dir="data",        # TFDS datasets are materialised here (git-ignored)
      max_len=512,            # examples are truncated to this many tokens
      max_examples=0,         # 0 = all
      # The run's token budget: train on the first train-split examples holding this many tokens
      # (truncated to train.seq_len); 0 = all. Budgets share one dataset and one hidden-state cache.
      max_tokens=0,
      heldout_fraction=0.02,  # by a hash of the conversation id; calibration reads held-out prompts
      pack=False,
  ))

  # Self-distillation: the backbone answers ShareGPT first-turn prompts (never MT-Bench).
  c.distill = ConfigDict(dict(
      num_prompts=1024,
      num_eval_prompts=32,    # held-out prompts answered too, for the eval loss only
      max_prompt_len=256,     # prompts longer than this (in tokens) are skipped
      max_new_tokens=256,
      temperature=0.0,        # the paper used 0.3; greedy replies match greedy evaluation
      batch_size=32,
  ))

  c.train = ConfigDict(dict(
      steps=200,
      epochs=0.0,             # > 0: steps follow the data, this many passes over the train split's tokens
      batch_size=8,
      seq_len=512,
      lr=1e-3,                # the heads' peak learning rate (the original scripts: 1e-3)
      warmup_frac=0.1,
      warmup_steps=0,         # >0 overrides warmup_frac
      weight_decay=0.0,
      grad_clip=1.0,
      b1=0.9, b2=0.999,
      head_decay=0.8,         # loss weight of head k: head_decay**k (the paper's 0.8^k)
      # Each head's loss: ce (to the data's token, the paper's), kl (to the backbone's own
      # distribution of that token, from the same forward), or mix ((1 - kl_mix) ce + kl_mix kl).
      heads_loss="ce",
      heads_kl_mix=0.5,
      heads_kl_temperature=1.0,  # the backbone's distribution as a target: softmax(logits / T)
      remat_heads=True,       # recompute each head's [B, L, V] logits in the backward pass (memory)
      # Medusa-1: the frozen backbone's hidden states of every example computed once (on each host)
      # (cached under data.data_dir/hidden) and looked up per batch, instead of a forward per step.
      cache_hidden=False,
      cache_dtype="bfloat16",  # the cache on disk: bfloat16 (half the disk, rel. error <= 2^-9) | float32
      # Which parameters train, as (regex over 'base/layers_0/wq'-style paths, group or None).
      # First match wins; None freezes. Medusa-1 vs Medusa-2 differ only here and in lm_weight.
      trainable=(("medusa/vocab_ids", None), ("medusa/.*", "heads"), ("base/.*", None)),
      group_lr_mult=(("heads", 1.0), ("backbone", 0.25)),  # Medusa-2: heads 4x the backbone
      heads_only_steps=0,     # Medusa-2: this many steps train the heads alone first
      backbone_warmup_steps=40,
      lm_weight=0.0,          # weight of the backbone's own LM loss (Medusa-2: 1.0)
      lm_loss="ce",           # ce (next-token) | kl (to the original backbone, for distilled data)
      # The backbone through LoRA adapters (Medusa-2's released recipe: rank 32, alpha 16); rank 0:
      # no adapters. With rank > 0, train.trainable must give 'lora/.*' a group (and freeze base/).
      lora=ConfigDict(dict(rank=0, alpha=16.0, targets=r"layers_\d+/(wq|wk|wv|wo|w_gate|w_up|w_down)")),
      lambda0=1.0,            # weight of the heads' loss (Medusa-2: 0.2; 0.01 with KL)
      lambda0_schedule="constant",  # constant | sine (ramped over lambda0_ramp_steps)
      lambda0_ramp_steps=0,
      log_every=10,
      eval_every=100,
      eval_batches=4,
      checkpoint_every=100,
      keep_checkpoints=3,
      max_nonfinite_steps=10,  # non-finite loss/grad-norm steps are skipped; this many in a row stop the run
  ))

  # Device mesh: axis sizes (-1 = the rest of the devices) and logical-to-mesh axis rules.
  c.mesh = ConfigDict(dict(
      shape=(("data", -1), ("fsdp", 1), ("tensor", 1)),
      rules=(
          ("batch", ("data", "fsdp")),
          ("embed", "fsdp"),
          ("vocab", "tensor"),
          ("heads", "tensor"),
          ("kv_heads", "tensor"),
          ("mlp", "tensor"),
          ("head_dim", None),
          ("norm", None),
          ("cache_len", None),
          ("medusa_heads", None),
          ("medusa_layers", None),
          ("medusa_path", None),
          ("lora_rank", None),
          # Replicated: jax 0.10.2 computes wrong gradients for the heads' blocks when they are
          # split over tensor while rows are split over fsdp (tests/test_sharding.py keeps a canary).
          ("embed_out", None),
      ),
      distributed_init="auto",  # auto (multi-host TPU/GPU environments) | always | never
  ))
  return c


# ----------------------------------------------------------------------------------------------
# Variants: configs/x.py:tiny, configs/x.py:tiny,lora
# ----------------------------------------------------------------------------------------------

def parse_arg(arg: str | None) -> list[str]:
  """The variant names of ``configs/x.py:a,b`` (``arg`` = 'a,b'), in order; [] for none."""
  return [a.strip() for a in (arg or "").split(",") if a.strip()]


def apply_variants(c: ConfigDict, arg: str | None, variants: dict, where: str) -> ConfigDict:
  """Applies each named variant of ``arg`` to ``c`` in order (``variants[name](c)``; later ones win).

  Every config file ends with this call, so ``:tiny`` and combinations such as ``:tiny,lora`` mean
  the same everywhere; an unknown name is an error listing the known ones.
  """
  for name in parse_arg(arg):
    if name not in variants:
      raise ValueError(f"Unknown variant {name!r} of {where} (known: {', '.join(sorted(variants))}).")
    variants[name](c)
  return c


def split_variants(arg: str | None, names) -> tuple[str, str]:
  """(the variants of ``arg`` in ``names``, the others), each as an ``arg`` string: a config that
  builds on another passes the others on to it."""
  parts = parse_arg(arg)
  return ",".join(p for p in parts if p in names), ",".join(p for p in parts if p not in names)


def tiny(c: ConfigDict) -> None:
  """Shrinks any config to a run the tests finish in seconds: a 2-layer random model with
  SmolLM2's tokenizer, a few short steps; Medusa-2 stages and ramps scaled down with it."""
  c.model = "random-tiny"
  c.data.max_len = 64
  c.distill.num_prompts = 8
  c.distill.max_prompt_len = 48
  c.distill.max_new_tokens = 8
  c.distill.batch_size = 16
  c.train.steps = 6
  c.train.batch_size = 2
  c.train.seq_len = 64
  c.train.log_every = 2
  c.train.eval_every = 3
  c.train.eval_batches = 1
  c.train.checkpoint_every = 2
  for key in ("heads_only_steps", "backbone_warmup_steps", "lambda0_ramp_steps"):
    if c.train[key]:
      c.train[key] = 2
  c.decode.max_new_tokens = 8


def sibling_config(config_file: str, name: str):
  """Loads another file of ``configs/`` as a module, by path: configs are loaded by path (not as a
  package), so a variant such as Medusa-2 builds on its Medusa-1 file this way."""
  spec = importlib.util.spec_from_file_location(name.removesuffix(".py"),
                                                os.path.join(os.path.dirname(config_file), name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod
