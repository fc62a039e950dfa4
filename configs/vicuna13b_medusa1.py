"""Medusa-1 on Vicuna-13B v1.3: frozen backbone, 5 heads trained on ShareGPT.

  python -m medusa_jax.fit --config configs/vicuna13b_medusa1.py --devices 8
  python -m medusa_jax.train --config configs/vicuna13b_medusa1.py \
      --config.model=/data/vicuna-13b-v1.3 --workdir runs/vicuna13b_medusa1

As configs/vicuna7b_medusa1.py (same recipe, variants ``:gpu8`` and ``:tpu``, multi-host launch in
docs/scale_out.md) with the 13B architecture: 40 layers of width 5120, 40 heads (8- or 40-way
tensor parallel divides them; 16-way does not, and replicates the attention weights).
"""

from medusa_jax import config as config_lib


def _medusa1():
  return config_lib.sibling_config(__file__, "vicuna7b_medusa1.py")


# config.json of lmsys/vicuna-13b-v1.3.
VICUNA_13B = dict(
    model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
    num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, rope_theta=10000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=2048, bos_token_id=1,
    eos_token_id=2)


def get_config(arg=None):
  m1 = _medusa1()
  c = m1.get_config(arg)
  c.model = "/path/to/vicuna-13b-v1.3"
  c.model_arch.update(VICUNA_13B)
  # Half the 7B batch: the fit check estimates ~67 GiB per device at 4 rows of 2048 tokens.
  c.train.batch_size //= 2
  c.train.steps *= 2
  return c
