"""Medusa heads in the original release's format (FasterDecoding/Medusa): read and written.

A heads directory holds ``config.json`` (``medusa_num_heads``, ``medusa_num_layers`` and usually
``base_model_name_or_path``) and ``medusa_lm_head.safetensors``, the state dict of the release's

  nn.ModuleList([nn.Sequential(*[ResBlock(D)] * n, nn.Linear(D, V, bias=False)) for _ in range(M)])

i.e. tensors ``{m}.{j}.linear.weight`` [D, D] (torch's out x in), ``{m}.{j}.linear.bias`` [D] for
j < n, and ``{m}.{n}.weight`` [V, D], the per-head LM head. The older layout has no
``{m}.{n}.weight``: its heads share the backbone's LM head. The layout is told by key presence.
The release's ``[ResBlock(D)] * n`` repeats ONE block; its state dict still names every index,
so loading such a file gives n separate (equal) blocks, which compute the same function.

Only safetensors are read; a directory holding the heads only as pickled PyTorch weights is refused
with the one-line conversion to run in a trusted environment.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from medusa_jax.convert import WeightsError
from medusa_jax.heads import HeadsConfig
from medusa_jax.model import ModelConfig

HEADS_FILE = "medusa_lm_head.safetensors"
CONFIG_FILE = "config.json"
# Medusa-2 exports put the heads inside the full model under this prefix; accept both spellings.
_MEDUSA_PREFIX = "medusa_head."
_PICKLED_HEADS = ("medusa_lm_head.pt", "medusa_lm_head.bin", "medusa_lm_head.pth")


def _read_config(path: str) -> tuple[int, int]:
  cfg_file = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(cfg_file):
    raise WeightsError(f"{path}: no {CONFIG_FILE}; a Medusa heads directory needs one with "
                       "medusa_num_heads and medusa_num_layers.")
  with open(cfg_file) as f:
    try:
      mc = json.load(f)
    except json.JSONDecodeError as e:
      raise WeightsError(f"{cfg_file} is not valid JSON: {e}") from None
  out = []
  for key, lowest in (("medusa_num_heads", 1), ("medusa_num_layers", 0)):
    v = mc.get(key) if isinstance(mc, dict) else None
    if isinstance(v, bool) or not isinstance(v, int) or v < lowest:
      raise WeightsError(f"{cfg_file}: {key} must be an integer >= {lowest}, got {v!r}.")
    out.append(v)
  return out[0], out[1]


def _heads_file(path: str) -> str:
  fn = os.path.join(path, HEADS_FILE)
  if os.path.exists(fn):
    return fn
  pickled = [x for x in _PICKLED_HEADS if os.path.exists(os.path.join(path, x))]
  if pickled:
    raise WeightsError(
        f"{path} holds the heads only as pickled PyTorch weights ({pickled[0]}); medusa_jax reads "
        f"safetensors only (unpickling can run arbitrary code). Convert once, in a trusted environment: "
        f"`safetensors.torch.save_file({{k: v.clone().contiguous() for k, v in torch.load('{pickled[0]}').items()}}, "
        f"'{HEADS_FILE}')`.")
  raise WeightsError(f"{path}: no {HEADS_FILE} (the Medusa heads weights).")


def load(path: str, cfg: ModelConfig, dtype=None):
  """Loads release-format Medusa heads for the backbone described by ``cfg``.

  Args:
    path: a directory with ``config.json`` and ``medusa_lm_head.safetensors``.
    cfg: the backbone's config; every tensor's shape is checked against ``cfg.dim`` and
      ``cfg.vocab_size``.
    dtype: of the returned arrays (default ``cfg.param_dtype``).

  Returns:
    ``(HeadsConfig, medusa params)``: NumPy arrays ``w`` [M, n, D, D] (in x out, the transpose of
    torch's), ``b`` [M, n, D] and, for the per-head layout only, ``lm_head`` [M, D, V]. The heads
    config's ``shared_lm_head`` records the layout found.

  Raises:
    WeightsError: on a missing directory, config or weights file, a pickled weights file, a config
      that disagrees with the tensors present, an unknown or missing tensor, or a shape that does
      not fit the backbone (naming the tensor and the expected shape).
  """
  if not os.path.isdir(path):
    raise WeightsError(f"{path} is not a Medusa heads directory.")
  M, n = _read_config(path)
  fn = _heads_file(path)
  dtype = np.dtype(dtype or cfg.param_dtype)
  D, V = cfg.dim, cfg.vocab_size
  with safe_open(fn, framework="numpy") as handle:
    names = {(k[len(_MEDUSA_PREFIX):] if k.startswith(_MEDUSA_PREFIX) else k): k for k in handle.keys()}
    pattern = re.compile(r"(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)")
    parsed = {}
    for short in names:
      m = pattern.fullmatch(short)
      if m is None:
        raise WeightsError(f"{fn}: unexpected tensor {names[short]!r}; a Medusa heads file holds only "
                           "'{m}.{j}.linear.weight', '{m}.{j}.linear.bias' and '{m}.{n}.weight'.")
      parsed[short] = (int(m.group(1)), int(m.group(2)), m.group(3))
    found_heads = sorted({h for h, _, _ in parsed.values()})
    if found_heads != list(range(M)):
      raise WeightsError(f"{fn}: {CONFIG_FILE} says medusa_num_heads={M} but the file holds heads "
                         f"{found_heads}.")
    found_layers = sorted({j for _, j, kind in parsed.values() if kind != "weight"})
    if found_layers != list(range(n)):
      raise WeightsError(f"{fn}: {CONFIG_FILE} says medusa_num_layers={n} but the file holds residual "
                         f"blocks {found_layers}.")
    per_head = any(kind == "weight" for _, _, kind in parsed.values())
    expected = {}
    for h in range(M):
      for j in range(n):
        expected[f"{h}.{j}.linear.weight"] = (D, D)
        expected[f"{h}.{j}.linear.bias"] = (D,)
      if per_head:
        expected[f"{h}.{n}.weight"] = (V, D)
    extra = sorted(set(parsed) - set(expected))
    if extra:
      raise WeightsError(f"{fn}: tensor {names[extra[0]]!r} does not fit {CONFIG_FILE} "
                         f"(medusa_num_heads={M}, medusa_num_layers={n}).")
    missing = sorted(set(expected) - set(parsed))
    if missing:
      layout = "per-head LM head" if per_head else "shared LM head"
      raise WeightsError(f"{fn}: tensor {missing[0]!r} is missing (layout: {layout}; "
                         f"medusa_num_heads={M}, medusa_num_layers={n}).")

    def get(short):
      sl = handle.get_slice(names[short])
      shape = tuple(sl.get_shape())
      if shape != expected[short]:
        raise WeightsError(
            f"{fn}: tensor {names[short]!r} has shape {shape}, the backbone needs {expected[short]} "
            f"(hidden size {D}, vocabulary {V}). Are these heads for another model?")
      if sl.get_dtype() == "BF16":  # NumPy cannot read bfloat16 from safetensors: go through JAX.
        with safe_open(fn, framework="flax") as fx:
          return np.asarray(fx.get_tensor(names[short])).astype(dtype)
      return handle.get_tensor(names[short]).astype(dtype)

    w = np.zeros((M, n, D, D), dtype)
    b = np.zeros((M, n, D), dtype)
    for h in range(M):
      for j in range(n):
        w[h, j] = get(f"{h}.{j}.linear.weight").T  # torch computes x @ W.T; we compute x @ w
        b[h, j] = get(f"{h}.{j}.linear.bias")
    params = {"w": w, "b": b}
    if per_head:
      params["lm_head"] = np.stack([get(f"{h}.{n}.weight").T for h in range(M)])
  return HeadsConfig(num_heads=M, num_layers=n, shared_lm_head=not per_head), params


def save(path: str, hcfg, cfg: ModelConfig, medusa_params: dict,
                      base_model_name_or_path: str | None = None) -> None:
  """Writes heads in the release's format (``load`` reads them back bit for bit).

  The layout follows ``hcfg.shared_lm_head``: without per-head LM heads the file holds only the
  residual blocks, which then use the backbone's LM head. Tensors are written in float32 (bfloat16
  params are widened exactly). ``base_model_name_or_path`` goes into ``config.json``, where the
  release's loader finds the backbone.
  """
  if getattr(hcfg, "draft_vocab", 0):
    # Dropping vocab_ids would silently let the heads propose tokens they never learnt.
    raise WeightsError(f"The release format has no draft vocabulary; these heads propose only "
                       f"{hcfg.draft_vocab} tokens. Export them with the checkpoint instead.")
  if getattr(hcfg, "kind", "medusa") != "medusa":
    raise WeightsError(f"The release format holds Medusa heads only, not {hcfg.kind} heads (they read the "
                       "drafted path as well as the hidden state). Export them with the checkpoint instead.")
  if getattr(hcfg, "prefix_layer", False):
    raise WeightsError("The release format has no prefix layer (HeadsConfig.prefix_layer): its heads read "
                       "the hidden state directly. Export them with the checkpoint instead.")
  if getattr(hcfg, "next_token_input", False):
    raise WeightsError("The release format has no next-token input (HeadsConfig.next_token_input): its "
                       "heads read only the hidden state. Export them with the checkpoint instead.")
  M, n, D, V = hcfg.num_heads, hcfg.num_layers, cfg.dim, cfg.vocab_size
  want = {"w": (M, n, D, D), "b": (M, n, D)}
  if not hcfg.shared_lm_head:
    want["lm_head"] = (M, D, V)
  for k, shape in want.items():
    if k not in medusa_params:
      raise WeightsError(f"Medusa params have no {k!r} (needed by {hcfg}).")
    if tuple(np.shape(medusa_params[k])) != shape:
      raise WeightsError(f"Medusa param {k!r} has shape {tuple(np.shape(medusa_params[k]))}, {hcfg} with "
                         f"hidden size {D} and vocabulary {V} needs {shape}.")
  arr = {k: np.asarray(medusa_params[k], np.float32) for k in want}
  tensors = {}
  for h in range(M):
    for j in range(n):
      tensors[f"{h}.{j}.linear.weight"] = np.ascontiguousarray(arr["w"][h, j].T)
      tensors[f"{h}.{j}.linear.bias"] = np.ascontiguousarray(arr["b"][h, j])
    if not hcfg.shared_lm_head:
      tensors[f"{h}.{n}.weight"] = np.ascontiguousarray(arr["lm_head"][h].T)
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, HEADS_FILE), metadata={"format": "pt"})
  mc = {"medusa_num_heads": M, "medusa_num_layers": n}
  if base_model_name_or_path is not None:
    mc["base_model_name_or_path"] = base_model_name_or_path
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(mc, f, indent=2)
