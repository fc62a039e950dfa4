"""Tests of the weight formats (medusa_jax/convert.py): parity with transformers, round trips, errors.

Tiny random checkpoints are written by transformers' ``save_pretrained`` (see conftest.py) and read
back by ``convert.load_hf``; logits must match transformers (torch, fp32) within 1e-4. The bundled
SmolLM2 GGUF file, dequantised by us and by transformers, must agree within 1e-3 on a chat prompt.
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax import convert
from medusa_jax import model as model_lib

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

# name -> (kind, hf config overrides); the default tiny config is GQA with untied embeddings.
VARIANTS = {
    "llama_gqa_untied": ("llama", {}),
    "llama_tied_mha": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "qwen2_qkv_bias": ("qwen2", {}),
    "llama3_rope_scaling": ("llama", {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 50000.0}}),
}


def _tokens(vocab, B=2, L=48, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (B, L))


def _torch_logits(path_or_model, tokens):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  m = path_or_model
  if isinstance(m, str):
    m = transformers.AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).eval()
  with torch.no_grad():
    return m(torch.as_tensor(tokens)).logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _our_logits(cfg, base, tokens_BxL):
  B, L = tokens_BxL.shape
  positions = jnp.broadcast_to(jnp.arange(L), (B, L))
  return model_lib.forward(cfg, base, tokens_BxL, positions, model_lib.causal_mask(jnp.full((B,), L), L))[0]


def _assert_logits_close(ours, ref, atol):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  assert np.abs(ref).max() > 1.0, "reference logits are near zero: the comparison would prove little"
  diff = np.abs(ours - ref).max()
  assert diff <= atol, f"max |logits diff| = {diff:.3g} > {atol}"


# ----- tiny random checkpoints written by transformers ----------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_parity(tiny_llama_dir, variant):
  kind, overrides = VARIANTS[variant]
  path = tiny_llama_dir(kind, **overrides)
  cfg, base = convert.load_hf(path)
  assert cfg.tie_embeddings == overrides.get("tie_word_embeddings", False)
  assert cfg.qkv_bias == (kind == "qwen2")
  if "rope_parameters" in overrides:
    assert cfg.rope_scaling == (8.0, 1.0, 4.0, 32) and cfg.rope_theta == 50000.0
  tokens = _tokens(cfg.vocab_size)
  _assert_logits_close(_our_logits(cfg, base, jnp.asarray(tokens)), _torch_logits(path, tokens), 1e-4)


def test_sharded_safetensors_load(tiny_llama_dir):
  path = tiny_llama_dir(max_shard_size="40KB")
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
  cfg, base = convert.load_hf(path)
  cfg1, base1 = convert.load_hf(tiny_llama_dir())
  assert cfg == cfg1
  jax.tree.map(np.testing.assert_array_equal, base, base1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_hf_round_trip(tiny_llama_dir, tmp_path, variant):
  kind, overrides = VARIANTS[variant]
  path = tiny_llama_dir(kind, **overrides)
  cfg, base = convert.load_hf(path)
  out = str(tmp_path / "export")
  convert.save_hf(out, cfg, base)

  # Our loader reads our export back bit for bit, config included.
  cfg2, base2 = convert.load_hf(out)
  assert cfg2 == cfg
  assert jax.tree.structure(base2) == jax.tree.structure(base)
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(base2)):
    assert a.dtype == b.dtype and np.array_equal(a, b)

  # transformers reads our export as the same model: same config, same logits.
  tokens = _tokens(cfg.vocab_size)
  np.testing.assert_array_equal(_torch_logits(out, tokens), _torch_logits(path, tokens))


# ----- the bundled SmolLM2 GGUF file --------------------------------------------------------------


def test_smollm2_gguf_parity(smollm2, smollm2_hf, smollm2_chat_prompt):
  cfg, params, _ = smollm2
  assert (cfg.num_layers, cfg.dim, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
  assert cfg.tie_embeddings and cfg.vocab_size == 49152
  tokens = np.asarray([smollm2_chat_prompt])
  ours = _our_logits(cfg, params["base"], jnp.asarray(tokens))
  _assert_logits_close(ours, _torch_logits(smollm2_hf, tokens), 1e-3)


# ----- errors: missing, refused, unsupported and inconsistent checkpoints ------------------------


def test_load_hf_missing_dir(tmp_path):
  with pytest.raises(convert.WeightsError, match="not an HF model directory"):
    convert.load_hf(str(tmp_path / "nope"))
  with pytest.raises(convert.WeightsError, match="no config.json"):
    convert.load_hf(str(tmp_path))  # exists, but empty


def test_load_hf_refuses_pickle(tiny_llama_dir, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  src = tiny_llama_dir()
  shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
  torch.save({"model.norm.weight": torch.ones(64)}, tmp_path / "pytorch_model.bin")
  with pytest.raises(convert.WeightsError, match=r"pickle.*safetensors|safetensors.*pickle"):
    convert.load_hf(str(tmp_path))


def test_load_hf_no_weights(tiny_llama_dir, tmp_path):
  shutil.copy(os.path.join(tiny_llama_dir(), "config.json"), tmp_path / "config.json")
  with pytest.raises(convert.WeightsError, match="No model.safetensors"):
    convert.load_hf(str(tmp_path))


def test_load_hf_unsupported_architecture(tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(str(tmp_path))
  with pytest.raises(convert.WeightsError, match="model_type='gpt2'.*supported: llama"):
    convert.load_hf(str(tmp_path))


def test_load_hf_unsupported_rope_type(tiny_llama_dir, tmp_path):
  path = _copy_with_config(tiny_llama_dir(), tmp_path, rope_parameters={
      "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
  with pytest.raises(convert.WeightsError, match="RoPE scaling type 'yarn'"):
    convert.load_hf(path)


def _copy_with_config(src, tmp_path, **edits):
  dst = str(tmp_path / "edited")
  shutil.copytree(src, dst)
  with open(os.path.join(dst, "config.json")) as f:
    hf = json.load(f)
  hf.update(edits)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(hf, f)
  return dst


def test_load_hf_shapes_disagree_with_config(tiny_llama_dir, tmp_path):
  path = _copy_with_config(tiny_llama_dir(), tmp_path, intermediate_size=96)
  with pytest.raises(convert.WeightsError, match=r"mlp\.gate_proj\.weight.*\(64, 128\).*\(64, 96\)"):
    convert.load_hf(path)


def test_load_hf_head_count_disagrees_with_config(tiny_llama_dir, tmp_path):
  path = _copy_with_config(tiny_llama_dir(), tmp_path, num_key_value_heads=4)
  with pytest.raises(convert.WeightsError, match=r"k_proj\.weight"):
    convert.load_hf(path)


def test_load_hf_missing_tensor(tiny_llama_dir, tmp_path):
  path = _copy_with_config(tiny_llama_dir(), tmp_path, num_hidden_layers=3)
  with pytest.raises(convert.WeightsError, match=r"model\.layers\.2\..*missing"):
    convert.load_hf(path)


def test_load_gguf_missing_file(tmp_path):
  with pytest.raises(convert.WeightsError, match="GGUF file not found"):
    convert.load_gguf(str(tmp_path / "missing.gguf"))


def test_load_gguf_not_gguf(tmp_path):
  bogus = tmp_path / "bogus.gguf"
  bogus.write_bytes(b"this is not a gguf file at all\n" * 64)
  with pytest.raises(convert.WeightsError, match="not a readable GGUF file"):
    convert.load_gguf(str(bogus))


def test_load_model_unknown_spec(tmp_path):
  with pytest.raises(convert.WeightsError, match="not found"):
    convert.load_model(str(tmp_path / "no-such-model"))
  other = tmp_path / "weights.bin"
  other.write_bytes(b"\0" * 16)
  with pytest.raises(convert.WeightsError, match="never pickle"):
    convert.load_model(str(other))
