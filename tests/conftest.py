"""Shared fixtures: tiny random HF checkpoints and the bundled SmolLM2, each built at most once.

Fixtures
--------
``tiny_llama_dir(kind='llama', max_shard_size=None, seed=0, **hf_config_overrides) -> str``
    A factory (session-scoped, memoised on its arguments) that saves a tiny random
    ``LlamaForCausalLM`` (``kind='qwen2'``: ``Qwen2ForCausalLM``) with ``save_pretrained``
    (safetensors) and returns the directory. Weights are re-drawn with a large scale (and random
    norms and biases) so that a wrong layout or formula shows up far above the parity tolerances.
``tiny`` -> (cfg, params={'base': ...})
    The default tiny Llama (GQA, untied embeddings) loaded by ``convert.load_hf``.
``smollm2`` -> (cfg, params={'base': ...}, tokenizer)
    The bundled SmolLM2-135M-Instruct GGUF loaded by ``convert.load_model``.
``smollm2_hf``
    transformers' own fp32 load of the same GGUF file (torch, eval mode).
``smollm2_chat_prompt`` -> list[int]
    A real chat prompt built with the tokenizer's chat template.
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import pytest

# Small enough to compile in a second, large enough to exercise GQA (4 query heads, 2 kv heads).
TINY_HF = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
               tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
               eos_token_id=2)

CHAT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def _randomize(model, seed: int, scale: float = 0.2) -> None:
  """Re-draws every weight: HF's init (std 0.02, unit norms, zero biases) would hide layout bugs."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
      p.copy_(1.0 + 0.2 * noise if "norm" in name else scale * noise)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
  """Factory: ``make(kind='llama', max_shard_size=None, seed=0, **hf_config_overrides) -> dir``."""
  import transformers  # pylint: disable=g-import-not-at-top
  made: dict = {}

  def make(kind: str = "llama", max_shard_size=None, seed: int = 0, **overrides) -> str:
    key = repr((kind, max_shard_size, seed, sorted(overrides.items())))
    if key in made:
      return made[key]
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    hf_cfg = cls[0](**{**TINY_HF, **overrides})
    model = cls[1](hf_cfg)
    _randomize(model, seed)
    path = str(tmp_path_factory.mktemp(f"tiny_{kind}"))
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    made[key] = path
    return path

  return make


@pytest.fixture(scope="session")
def tiny(tiny_llama_dir):
  """(cfg, params) of the default tiny Llama, loaded through our converter."""
  from medusa_jax import convert  # pylint: disable=g-import-not-at-top
  cfg, base = convert.load_hf(tiny_llama_dir())
  return cfg, {"base": jax.tree.map(jnp.asarray, base)}


@pytest.fixture(scope="session")
def smollm2():
  """(cfg, params={'base': ...}, tokenizer) of the bundled SmolLM2-135M-Instruct (fp32)."""
  from medusa_jax import bundled, convert  # pylint: disable=g-import-not-at-top
  cfg, base, tok = convert.load_model(bundled.SMOLLM2)
  return cfg, {"base": jax.tree.map(jnp.asarray, base)}, tok


@pytest.fixture(scope="session")
def smollm2_hf():
  """transformers' own fp32 load of the bundled GGUF file: the reference for parity tests."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from medusa_jax import bundled  # pylint: disable=g-import-not-at-top
  transformers.utils.logging.set_verbosity_error()
  path = bundled.smollm2_gguf_path()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  return model.eval()


@pytest.fixture(scope="session")
def smollm2_chat_prompt(smollm2):
  """Token ids of a real chat prompt (system + user turn + assistant header)."""
  tok = smollm2[2]
  text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
  return [int(i) for i in tok.encode(text, add_special_tokens=False)]


@pytest.fixture(scope="session")
def tiny_chat_dir(tiny_llama_dir, tmp_path_factory):
  """A tiny random Llama with SmolLM2's vocabulary and tokenizer (chat template), as an HF dir."""
  from medusa_jax import bundled  # pylint: disable=g-import-not-at-top
  src = tiny_llama_dir(vocab_size=49152, max_position_embeddings=2048)
  path = str(tmp_path_factory.mktemp("tiny_chat") / "model")
  shutil.copytree(src, path)
  bundled.smollm2_tokenizer().save_pretrained(path)
  return path
