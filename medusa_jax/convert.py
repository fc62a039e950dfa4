"""Weight formats: HF safetensors directories and GGUF files in, HF safetensors out.

Weights are read from safetensors, GGUF or Orbax only; pickled checkpoints (``pytorch_model.bin``)
are refused. Every loader checks each tensor's shape against the config and names the offender.
Medusa heads in the original release's format have their own module, ``release_heads.py``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from medusa_jax import bundled
from medusa_jax import model as model_lib
from medusa_jax.model import ModelConfig, param_shapes

_SUPPORTED_HF = ("llama", "mistral", "qwen2")
RANDOM_TINY = "random-tiny"


class WeightsError(ValueError):
  """A weights file that is missing, of an unsupported kind, or disagrees with its config."""


# ----------------------------------------------------------------------------------------------
# HF config <-> ModelConfig
# ----------------------------------------------------------------------------------------------

def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  mt = hf.get("model_type", "")
  if mt not in _SUPPORTED_HF:
    raise WeightsError(f"Unsupported architecture model_type={mt!r}; supported: {', '.join(_SUPPORTED_HF)} "
                       "(Llama-family decoders).")
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
  scaling = None
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "llama3":
    scaling = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
               int(rope["original_max_position_embeddings"]))
  elif rope_type not in ("default", None):
    raise WeightsError(f"Unsupported RoPE scaling type {rope_type!r} (supported: default, llama3).")
  eos = hf.get("eos_token_id", 2)
  eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
  H = hf["num_attention_heads"]
  context = int(hf.get("max_position_embeddings", 8192))
  # Within its window, sliding-window attention is plain causal attention; beyond it this decoder
  # would attend to tokens the model never saw together, so the context is capped at the window.
  window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
  window = int(window) if window and int(window) < context else None
  kw = dict(
      vocab_size=hf["vocab_size"], dim=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=H, num_kv_heads=hf.get("num_key_value_heads") or H,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // H, mlp_dim=hf["intermediate_size"],
      rope_theta=float(theta), rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=bool(hf.get("attention_bias", mt == "qwen2")),
      max_seq_len=window or context, sliding_window=window, bos_id=hf.get("bos_token_id"),
      eos_ids=eos, name=mt)
  kw.update(overrides)
  return ModelConfig(**kw)


def config_to_hf(cfg: ModelConfig) -> dict:
  mt = cfg.name if cfg.name in _SUPPORTED_HF else "llama"
  arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[mt]
  out = {
      "architectures": [arch], "model_type": mt, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.mlp_dim, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_seq_len,
      "bos_token_id": cfg.bos_id, "eos_token_id": list(cfg.eos_ids) if len(cfg.eos_ids) != 1 else cfg.eos_ids[0],
      "hidden_act": "silu", "torch_dtype": "float32",
  }
  if mt != "qwen2":
    out["attention_bias"] = cfg.qkv_bias
  if cfg.sliding_window:
    out["sliding_window"] = cfg.sliding_window
  if cfg.rope_scaling is not None:
    f, lo, hi, orig = cfg.rope_scaling
    out["rope_scaling"] = {"rope_type": "llama3", "factor": f, "low_freq_factor": lo,
                           "high_freq_factor": hi, "original_max_position_embeddings": orig}
  return out


# ----------------------------------------------------------------------------------------------
# Name mapping: (our path, HF name, to_ours(array[HF layout]) -> array[our layout], to_hf)
# ----------------------------------------------------------------------------------------------

def _hf_mapping(cfg: ModelConfig):
  D, H, K, E = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  ident = (lambda a: a, lambda a: a)
  T = (lambda a: a.T, lambda a: a.T)
  def proj(n):  # [n*E, D] -> [D, n, E]
    return (lambda a: a.T.reshape(D, n, E), lambda a: a.reshape(D, n * E).T)
  def bias(n):
    return (lambda a: a.reshape(n, E), lambda a: a.reshape(n * E))
  m = [(("embed",), "model.embed_tokens.weight", ident), (("final_norm",), "model.norm.weight", ident)]
  if not cfg.tie_embeddings:
    m.append((("lm_head",), "lm_head.weight", T))
  for i in range(cfg.num_layers):
    p, h = f"layers_{i}", f"model.layers.{i}."
    m += [
        ((p, "attn_norm"), h + "input_layernorm.weight", ident),
        ((p, "wq"), h + "self_attn.q_proj.weight", proj(H)),
        ((p, "wk"), h + "self_attn.k_proj.weight", proj(K)),
        ((p, "wv"), h + "self_attn.v_proj.weight", proj(K)),
        ((p, "wo"), h + "self_attn.o_proj.weight", (lambda a: a.T.reshape(H, E, D), lambda a: a.reshape(H * E, D).T)),
        ((p, "mlp_norm"), h + "post_attention_layernorm.weight", ident),
        ((p, "w_gate"), h + "mlp.gate_proj.weight", T),
        ((p, "w_up"), h + "mlp.up_proj.weight", T),
        ((p, "w_down"), h + "mlp.down_proj.weight", T),
    ]
    if cfg.qkv_bias:
      m += [((p, "bq"), h + "self_attn.q_proj.bias", bias(H)),
            ((p, "bk"), h + "self_attn.k_proj.bias", bias(K)),
            ((p, "bv"), h + "self_attn.v_proj.bias", bias(K))]
  return m


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _expected_shape(cfg, path):
  return _get(param_shapes(cfg), path)[0]


def _assemble(cfg: ModelConfig, get_tensor, source: str, dtype) -> dict:
  """Builds the base params, reading HF-layout tensors by name with ``get_tensor``."""
  base: dict = {}
  for path, name, (to_ours, _) in _hf_mapping(cfg):
    a = get_tensor(name)
    if a is None:
      raise WeightsError(f"{source}: tensor {name!r} is missing (expected by the {cfg.name} config).")
    try:
      a = to_ours(np.asarray(a))
    except ValueError as e:
      raise WeightsError(f"{source}: tensor {name!r} of shape {np.shape(a)} does not fit the config "
                         f"(expected {_expected_shape(cfg, path)} in our layout): {e}") from None
    want = _expected_shape(cfg, path)
    if a.shape != want:
      raise WeightsError(f"{source}: tensor {name!r} has shape {a.shape} after conversion, the config "
                         f"expects {want}. Is this checkpoint from another model?")
    _set(base, path, a.astype(dtype))
  return base


# ----------------------------------------------------------------------------------------------
# HF safetensors directories
# ----------------------------------------------------------------------------------------------

def _safetensor_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(path, x) for x in files]
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single):
    return [single]
  if any(x.endswith((".bin", ".pt", ".pth")) for x in os.listdir(path)):
    raise WeightsError(f"{path} holds only pickled PyTorch weights; medusa_jax loads safetensors, GGUF or "
                       "Orbax only (pickle can run arbitrary code). Convert with "
                       "`model.save_pretrained(dir, safe_serialization=True)`.")
  raise WeightsError(f"No model.safetensors or model.safetensors.index.json in {path}.")


def load_hf(path: str, dtype="float32", **config_overrides) -> tuple[ModelConfig, dict]:
  """Loads an HF model directory (config.json + safetensors, single or sharded)."""
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isdir(path) or not os.path.exists(cfg_file):
    raise WeightsError(f"{path} is not an HF model directory (no config.json).")
  with open(cfg_file) as f:
    cfg = config_from_hf(json.load(f), **config_overrides)
  handles = [safe_open(fn, framework="numpy") for fn in _safetensor_files(path)]
  where = {k: h for h in handles for k in h.keys()}
  base = _assemble(cfg, lambda n: where[n].get_tensor(n) if n in where else None, path, dtype)
  return cfg, base


def save_hf(path: str, cfg: ModelConfig, base: dict) -> None:
  """Exports backbone params to an HF directory (config.json + model.safetensors, fp32)."""
  os.makedirs(path, exist_ok=True)
  tensors = {}
  for p, name, (_, to_hf) in _hf_mapping(cfg):
    tensors[name] = np.ascontiguousarray(to_hf(np.asarray(_get(base, p), np.float32)))
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg), f, indent=2)


# ----------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------

_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def _gguf_field(reader, key, default=None):
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF rotate-half layout)."""
  rows = w.shape[0]
  return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str, dtype="float32", **config_overrides) -> tuple[ModelConfig, dict]:
  """Loads (and dequantises) a Llama-family GGUF file."""
  # Deferred: gguf is needed only for .gguf files (HF directories and Orbax exports load without it).
  import gguf  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise WeightsError(f"GGUF file not found: {path}")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # pylint: disable=broad-except
    raise WeightsError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}).") from None
  arch = _gguf_field(reader, "general.architecture")
  if arch not in ("llama", "qwen2", "mistral"):
    raise WeightsError(f"{path}: unsupported GGUF architecture {arch!r} (supported: llama, qwen2, mistral).")
  tensors = {t.name: t for t in reader.tensors}
  if "rope_freqs.weight" in tensors:
    raise WeightsError(f"{path}: per-frequency RoPE factors (rope_freqs) are not supported; load the HF "
                       "directory of this model instead.")
  a = lambda k, d=None: _gguf_field(reader, f"{arch}.{k}", d)
  H = int(a("attention.head_count"))
  D = int(a("embedding_length"))
  vocab = a("vocab_size") or len(_gguf_field(reader, "tokenizer.ggml.tokens", []))
  eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
  hf = {
      "model_type": arch, "vocab_size": int(vocab), "hidden_size": D,
      "num_hidden_layers": int(a("block_count")), "num_attention_heads": H,
      "num_key_value_heads": int(a("attention.head_count_kv", H)),
      "head_dim": int(a("rope.dimension_count", D // H)), "intermediate_size": int(a("feed_forward_length")),
      "rope_theta": float(a("rope.freq_base", 10000.0)),
      "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
      "tie_word_embeddings": "output.weight" not in tensors,
      "attention_bias": "blk.0.attn_q.bias" in tensors,
      "max_position_embeddings": int(a("context_length", 8192)),
      "sliding_window": a("attention.sliding_window"),
      "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": int(eos) if eos is not None else None,
  }
  cfg = config_from_hf(hf, **config_overrides)
  by_hf = {}
  for name in tensors:
    if name in _GGUF_TOP:
      by_hf[_GGUF_TOP[name]] = name
    elif name.startswith("blk."):
      _, i, rest = name.split(".", 2)
      if rest in _GGUF_LAYER:
        by_hf[f"model.layers.{i}.{_GGUF_LAYER[rest]}"] = name

  def get(hf_name):
    if hf_name not in by_hf:
      return None
    t = tensors[by_hf[hf_name]]
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    w = w.reshape([int(x) for x in reversed(t.shape)])
    if hf_name.endswith("q_proj.weight") or hf_name.endswith("q_proj.bias"):
      w = _unpermute_rope(w, cfg.num_heads)
    elif hf_name.endswith("k_proj.weight") or hf_name.endswith("k_proj.bias"):
      w = _unpermute_rope(w, cfg.num_kv_heads)
    return w

  return cfg, _assemble(cfg, get, path, dtype)


# ----------------------------------------------------------------------------------------------
# One entry point
# ----------------------------------------------------------------------------------------------

def load_model(spec: str, dtype="float32", **config_overrides) -> tuple[ModelConfig, dict, Any]:
  """Loads ``(config, base params, tokenizer or None)`` from a short name, an HF dir or a GGUF file.

  ``spec`` is ``smollm2-135m-instruct`` (the bundled default), ``random-tiny`` (a tiny random model
  with SmolLM2's tokenizer, for tests), a directory with config.json and safetensors, or a ``.gguf``
  file.
  """
  if spec == bundled.SMOLLM2:
    spec = bundled.smollm2_gguf_path()
  if spec == RANDOM_TINY:
    # A 2-layer random Llama with SmolLM2's vocabulary and tokenizer: fast end-to-end tests of the
    # data, training and decoding plumbing. Its outputs are meaningless.
    cfg = ModelConfig(vocab_size=49152, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      mlp_dim=128, rope_theta=100000.0, tie_embeddings=True, max_seq_len=2048, bos_id=1,
                      eos_ids=(2,), name="llama")
    cfg = cfg.replace(**config_overrides)
    base = jax.tree.map(np.asarray, model_lib.init_params(cfg, jax.random.PRNGKey(0)))
    return cfg, base, bundled.smollm2_tokenizer()
  if spec.endswith(".gguf"):
    cfg, base = load_gguf(spec, dtype, **config_overrides)
    return cfg, base, bundled.load_gguf_tokenizer(os.path.abspath(spec))
  if os.path.isdir(spec):
    cfg, base = load_hf(spec, dtype, **config_overrides)
    tok = None
    if any(os.path.exists(os.path.join(spec, f)) for f in ("tokenizer.json", "tokenizer.model")):
      tok = bundled.load_tokenizer(spec)
    return cfg, base, tok
  if not os.path.exists(spec):
    raise WeightsError(f"Model {spec!r} not found: give '{bundled.SMOLLM2}', an HF model directory or a "
                       ".gguf file.")
  raise WeightsError(f"Cannot load {spec!r}: only HF safetensors directories, .gguf files and Orbax "
                     "checkpoints are supported (never pickle).")
