"""Medusa-1 on SmolLM2-135M-Instruct: frozen backbone, 4 heads trained on self-distilled ShareGPT.

  python -m medusa_jax.distill --config configs/smollm2_medusa1.py
  python -m medusa_jax.train --config configs/smollm2_medusa1.py --workdir runs/smollm2_medusa1
  python -m medusa_jax.calibrate --config configs/smollm2_medusa1.py --checkpoint runs/smollm2_medusa1/export \
      --nodes 0 --out runs/smollm2_medusa1/tree.json
  python -m medusa_jax.benchmark --config configs/smollm2_medusa1.py --checkpoint runs/smollm2_medusa1/export \
      --tree runs/smollm2_medusa1/tree.json --modes vanilla,medusa --num_prompts 10 --max_new_tokens 128

Variants: ``:soft`` teacher-forced ShareGPT with the backbone's soft labels (no generation; what
``make demo`` trains), ``:full`` the same on all ~8.7M tokens, ``:prefix`` the heads'
prefix-attention layer; they combine, e.g. ``:soft,prefix``.

The self-distilled recipe (no variant) was the demo's until 2026-12-07: its heads accept more per
training token than ``:soft``'s, but generating the replies takes 40+ minutes of a 2-core CPU
(docs/results.md). ``:tiny``: a 2-layer random model, a few steps (the tests' end-to-end run).
"""

from medusa_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.default_config()
  # 4 heads (CPU trees are at most ~4 deep) proposing from the 8192 most frequent reply tokens:
  # the heads' LM projection is the largest cost of training them on a CPU.
  c.heads.num_heads = 4
  c.heads.draft_vocab = 8192
  # Two residual blocks per head and a 3e-3 peak rate: on 1.5k distilled replies (hidden states
  # cached, 400 x 1024 positions) head-1 held-out top-1 went 0.36 -> 0.41 and the teacher-forced
  # chain acceptance 0.62 -> 0.75 tokens/step over one block at 1e-3.
  c.heads.num_layers = 2
  # Heads also read the backbone's next token (not in the paper; heads.py): same data, same steps,
  # eval head top-1 0.43/0.25/0.21 -> 0.50/0.28/0.23; MT-Bench 1.33 -> 1.42 tokens/step (docs/results.md).
  # --config.heads.next_token_input=False trains the paper's heads.
  c.heads.next_token_input = True
  c.train.remat_heads = False
  # The frozen backbone's hidden states computed once, not every step: over half of a step on a CPU.
  c.train.cache_hidden = True
  c.decode.mode = "medusa"
  c.decode.tree = "chain:4"
  c.data.source = "distilled"
  c.data.max_len = 384
  c.data.pack = True  # replies average ~210 tokens with their prompt: unpacked rows were half padding
  c.distill.num_prompts = 2048
  c.distill.max_prompt_len = 176   # + 192 reply tokens fit data.max_len
  c.distill.max_new_tokens = 192
  c.distill.batch_size = 32
  c.train.steps = 320  # ~2 epochs: a packed row holds ~1.6 replies
  c.train.batch_size = 8
  c.train.seq_len = 384
  c.train.lr = 3e-3
  c.train.eval_every = 100
  c.train.checkpoint_every = 50
  return config_lib.apply_variants(c, arg, VARIANTS, "configs/smollm2_medusa1.py")


def soft(c):
  """Teacher-forced soft labels (Hydra++ / EAGLE-1's data): ShareGPT's own replies, no generation;
  each head learns the frozen backbone's distribution of the token it guesses (KL), computed from
  the cached hidden states. ``data.max_tokens`` is the token budget (nested prefixes of one
  dataset of ~8M tokens share one cache); the steps follow it (``train.epochs``).
  experiments/data_curve.py measures the budgets."""
  c.data.source = "sharegpt"
  c.data.max_examples = 24000  # ~8.7M tokens at 384 (ShareGPT examples average ~364 here)
  # 0.5M tokens: make demo's budget (with :prefix, 27-28 minutes end to end on a 2-core Intel Xeon).
  # The data curve (docs/data_curve/table.md) still rises at 1M: head 1's top-1 0.338 -> 0.378 and
  # simulated tokens/step at 16 nodes 1.77 -> 1.85 with the prefix layer, but 1M takes the demo
  # past 45 minutes there; :full takes the whole dataset.
  c.data.max_tokens = 500_000
  c.train.heads_loss = "kl"
  c.train.epochs = 1.0  # the steps follow the budget


def prefix(c):
  """The heads read one decoder layer over the backbone's hidden states (Hydra++; heads.py)."""
  c.heads.prefix_layer = True


def full(c):
  """``:soft`` on the whole rendered dataset (~8.7M tokens; the curve still rose at the largest
  budget measured), for people with time: at a 2-core Intel Xeon's rates (~840 tok/s for the
  hidden states, ~3 s for a training step of 8 x 384 tokens), about 3 hours of hidden states and
  2.5 of training. The cache and the training resume across runs: rerun the same command."""
  soft(c)
  c.data.max_tokens = 0


VARIANTS = {"tiny": config_lib.tiny, "soft": soft, "prefix": prefix, "full": full}
