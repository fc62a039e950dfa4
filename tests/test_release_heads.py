"""Tests of the release heads format (medusa_jax/release_heads.py: load / save).

The reference is the original PyTorch head module, rebuilt here from the release's description:
``nn.Sequential(*[ResBlock(D)] * n, nn.Linear(D, V, bias=False))`` per head (or the ResBlocks alone,
on the backbone's LM head), its state dict saved with safetensors. Loading it must give the same
head logits through ``heads.logits`` as the torch module computes.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax import convert
from medusa_jax import heads as heads_lib
from medusa_jax import model as model_lib
from medusa_jax import release_heads
from medusa_jax.heads import HeadsConfig
from medusa_jax.model import ModelConfig

CFG = ModelConfig(vocab_size=40, dim=12, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=6, mlp_dim=16)


def _base(cfg=CFG, seed=0):
  base = model_lib.init_params(cfg, jax.random.PRNGKey(seed))
  return jax.tree.map(np.asarray, base)


def _random_heads(hcfg, cfg=CFG, seed=0):
  """Non-zero heads (the zero init would make a transposed weight invisible)."""
  rng = np.random.default_rng(seed)
  M, n, D, V = hcfg.num_heads, hcfg.num_layers, cfg.dim, cfg.vocab_size
  p = {"w": rng.normal(0, 0.3, (M, n, D, D)).astype(np.float32),
       "b": rng.normal(0, 0.3, (M, n, D)).astype(np.float32)}
  if not hcfg.shared_lm_head:
    p["lm_head"] = rng.normal(0, 0.3, (M, D, V)).astype(np.float32)
  return p


# ----- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["per_head_lm_head", "shared_lm_head"])
def test_round_trip_is_bit_exact(tmp_path, shared):
  hcfg = HeadsConfig(num_heads=3, num_layers=2, shared_lm_head=shared)
  med = _random_heads(hcfg)
  release_heads.save(str(tmp_path), hcfg, CFG, med, base_model_name_or_path="tiny/base")

  with open(tmp_path / "config.json") as f:
    mc = json.load(f)
  assert mc == {"medusa_num_heads": 3, "medusa_num_layers": 2, "base_model_name_or_path": "tiny/base"}
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  stored = load_file(str(tmp_path / release_heads.HEADS_FILE))
  # The release's key names and torch's out x in layout.
  assert stored["1.0.linear.weight"].shape == (CFG.dim, CFG.dim)
  np.testing.assert_array_equal(stored["1.0.linear.weight"], med["w"][1, 0].T)
  np.testing.assert_array_equal(stored["2.1.linear.bias"], med["b"][2, 1])
  assert ("0.2.weight" in stored) == (not shared)
  if not shared:
    np.testing.assert_array_equal(stored["2.2.weight"], med["lm_head"][2].T)
  assert len(stored) == 3 * (2 * 2 + (0 if shared else 1))

  hcfg2, med2 = release_heads.load(str(tmp_path), CFG)
  assert hcfg2 == hcfg
  assert sorted(med2) == sorted(med)
  for k in med:
    assert med2[k].dtype == np.float32
    np.testing.assert_array_equal(med2[k], med[k])


# ----- the original PyTorch module --------------------------------------------------------------


def _torch_heads(M, n, D, V, per_head_lm_head, repeat_one_block, seed):
  """The release's head module with random weights (ResBlock as in FasterDecoding/Medusa)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  class ResBlock(nn.Module):

    def __init__(self, hidden):
      super().__init__()
      self.linear = nn.Linear(hidden, hidden)
      self.act = nn.SiLU()

    def forward(self, x):
      return x + self.act(self.linear(x))

  torch.manual_seed(seed)

  def blocks():
    # The release writes [ResBlock(D)] * n: one block repeated n times, saved under n names.
    return [ResBlock(D)] * n if repeat_one_block else [ResBlock(D) for _ in range(n)]

  tail = [nn.Linear(D, V, bias=False)] if per_head_lm_head else []
  module = nn.ModuleList([nn.Sequential(*blocks(), *tail) for _ in range(M)])
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(0.4 * torch.randn(p.shape))  # non-zero weights AND biases
  return module.eval()


@pytest.mark.parametrize("per_head,repeat_one_block,n,torch_dtype", [
    (True, True, 2, "float32"),     # medusa_model.py: per-head LM head, the shared-block bug
    (False, False, 1, "float32"),   # the legacy layout: ResBlocks on the backbone's LM head
    (True, False, 2, "float16"),    # half-precision files, as published
    (False, False, 2, "bfloat16"),  # NumPy cannot read bf16 safetensors: the JAX route
], ids=["per_head_repeated_block", "shared_legacy", "per_head_fp16", "shared_bf16"])
def test_loads_the_original_pytorch_heads(tmp_path, per_head, repeat_one_block, n, torch_dtype):
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  M, D, V = 3, CFG.dim, CFG.vocab_size
  module = _torch_heads(M, n, D, V, per_head, repeat_one_block, seed=1)
  dt = getattr(torch, torch_dtype)
  module = module.to(dt).float()  # round the weights to the file's precision, compute in fp32
  # clone(): a repeated block's tensors share storage, which safetensors refuses to write as is.
  state = {k: v.detach().clone().to(dt).contiguous() for k, v in module.state_dict().items()}
  if repeat_one_block:
    assert set(state) >= {"0.0.linear.weight", "0.1.linear.weight"}
  save_file(state, str(tmp_path / release_heads.HEADS_FILE))
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"medusa_num_heads": M, "medusa_num_layers": n, "base_model_name_or_path": "x"}, f)

  hcfg, med = release_heads.load(str(tmp_path), CFG)
  assert hcfg == HeadsConfig(num_heads=M, num_layers=n, shared_lm_head=not per_head)
  if repeat_one_block:  # separate, equal weights: the same function as the repeated block
    np.testing.assert_array_equal(med["w"][:, 0], med["w"][:, 1])

  base = _base()
  hidden = np.random.default_rng(2).normal(0, 1, (2, 3, D)).astype(np.float32)
  with torch.no_grad():
    h = torch.from_numpy(hidden)
    outs = []
    for head in module:
      x = head(h)
      if not per_head:
        x = x @ torch.from_numpy(np.array(model_lib.lm_head_weight(CFG, base)))
      outs.append(x.numpy())
  want = np.stack(outs, axis=2)  # [B, L, M, V]
  got = heads_lib.logits(hcfg, CFG, {"base": base, "medusa": jax.tree.map(jnp.asarray, med)}, jnp.asarray(hidden))
  assert got.shape == (2, 3, M, V)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_medusa2_prefixed_keys_load(tmp_path):
  """Medusa-2 exports name the same tensors under 'medusa_head.'."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  hcfg = HeadsConfig(num_heads=2, num_layers=1, shared_lm_head=False)
  med = _random_heads(hcfg)
  release_heads.save(str(tmp_path), hcfg, CFG, med)
  fn = str(tmp_path / release_heads.HEADS_FILE)
  save_file({"medusa_head." + k: v for k, v in load_file(fn).items()}, fn)
  hcfg2, med2 = release_heads.load(str(tmp_path), CFG)
  assert hcfg2 == hcfg
  np.testing.assert_array_equal(med2["lm_head"], med["lm_head"])


# ----- errors -------------------------------------------------------------------------------------


def _saved(tmp_path, shared=False, M=3, n=2):
  hcfg = HeadsConfig(num_heads=M, num_layers=n, shared_lm_head=shared)
  release_heads.save(str(tmp_path), hcfg, CFG, _random_heads(hcfg))
  return str(tmp_path)


def test_shape_mismatch_names_the_tensor_and_expected_shape(tmp_path):
  path = _saved(tmp_path)
  with pytest.raises(convert.WeightsError, match=r"'0\.0\.linear\.weight'.*\(12, 12\).*\(16, 16\)"):
    release_heads.load(path, CFG.replace(dim=16, head_dim=8))
  with pytest.raises(convert.WeightsError, match=r"'0\.2\.weight'.*\(40, 12\).*\(41, 12\)"):
    release_heads.load(path, CFG.replace(vocab_size=41))


def test_config_that_disagrees_with_the_file(tmp_path):
  path = _saved(tmp_path)
  cfg_file = os.path.join(path, "config.json")
  with open(cfg_file, "w") as f:
    json.dump({"medusa_num_heads": 4, "medusa_num_layers": 2}, f)
  with pytest.raises(convert.WeightsError, match=r"medusa_num_heads=4 but the file holds heads \[0, 1, 2\]"):
    release_heads.load(path, CFG)
  with open(cfg_file, "w") as f:
    json.dump({"medusa_num_heads": 3, "medusa_num_layers": 1}, f)
  with pytest.raises(convert.WeightsError, match=r"medusa_num_layers=1 but the file holds residual blocks \[0, 1\]"):
    release_heads.load(path, CFG)
  with open(cfg_file, "w") as f:
    json.dump({"medusa_num_heads": 3}, f)
  with pytest.raises(convert.WeightsError, match="medusa_num_layers"):
    release_heads.load(path, CFG)


def test_missing_tensor_is_named(tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  path = _saved(tmp_path)
  fn = os.path.join(path, release_heads.HEADS_FILE)
  tensors = load_file(fn)
  del tensors["1.1.linear.bias"]
  save_file(tensors, fn)
  with pytest.raises(convert.WeightsError, match=r"'1\.1\.linear\.bias' is missing"):
    release_heads.load(path, CFG)


def test_missing_files(tmp_path):
  with pytest.raises(convert.WeightsError, match="not a Medusa heads directory"):
    release_heads.load(str(tmp_path / "nowhere"), CFG)
  with pytest.raises(convert.WeightsError, match="no config.json"):
    release_heads.load(str(tmp_path), CFG)
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"medusa_num_heads": 2, "medusa_num_layers": 1}, f)
  with pytest.raises(convert.WeightsError, match=r"no medusa_lm_head\.safetensors"):
    release_heads.load(str(tmp_path), CFG)


def test_pickled_heads_are_refused(tmp_path):
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"medusa_num_heads": 2, "medusa_num_layers": 1}, f)
  # Never unpickled: the loader must refuse on the name alone, so any bytes will do.
  (tmp_path / "medusa_lm_head.pt").write_bytes(b"not really a pickle")
  with pytest.raises(convert.WeightsError, match=r"pickled.*medusa_lm_head\.pt.*safetensors only"):
    release_heads.load(str(tmp_path), CFG)


def test_save_checks_shapes(tmp_path):
  hcfg = HeadsConfig(num_heads=2, num_layers=1, shared_lm_head=False)
  med = _random_heads(hcfg)
  with pytest.raises(convert.WeightsError, match="'lm_head'.*needs"):
    release_heads.save(str(tmp_path), hcfg, CFG.replace(vocab_size=41), med)
  del med["lm_head"]
  with pytest.raises(convert.WeightsError, match="no 'lm_head'"):
    release_heads.save(str(tmp_path), hcfg, CFG, med)


def test_save_refuses_a_draft_vocabulary(tmp_path):
  hcfg = HeadsConfig(num_heads=2, num_layers=1, shared_lm_head=True, draft_vocab=8)
  med = {**_random_heads(hcfg), "vocab_ids": np.arange(8, dtype=np.int32)}
  with pytest.raises(convert.WeightsError, match="no draft vocabulary"):
    release_heads.save(str(tmp_path), hcfg, CFG, med)


def test_loaded_heads_decode_beside_an_hf_backbone(tiny, tmp_path):
  """Heads from a release directory plug into Medusa decoding of an HF-loaded backbone."""
  from medusa_jax import decode, medusa, tree as tree_lib  # pylint: disable=g-import-not-at-top
  cfg, params = tiny
  hcfg = HeadsConfig(num_heads=2, num_layers=1, shared_lm_head=False)
  release_heads.save(str(tmp_path), hcfg, cfg, _random_heads(hcfg, cfg))
  hcfg2, med = release_heads.load(str(tmp_path), cfg)
  params = {**params, "medusa": jax.tree.map(jnp.asarray, med)}
  sampling = decode.Sampling(max_new_tokens=12)
  prompts = [[5, 17, 3], [9, 1, 200, 44, 7]]
  cfg = cfg.replace(eos_ids=())
  want, _ = medusa.make_decoder(cfg, sampling).generate(params, prompts)
  spec = medusa.MedusaSpec(heads=hcfg2, tree=tree_lib.resolve("dense:2,2"))
  got, _ = medusa.make_decoder(cfg, sampling, spec).generate(params, prompts)
  assert got == want
