"""Tests of scale-out (medusa_jax/sharding.py, medusa_jax/fit.py, configs/vicuna*.py).

The multi-device tests need 8 devices, and XLA fixes the device count when JAX starts — this
process already has one. So one subprocess (tests/sharding_multidevice.py, with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``) runs every sharded-vs-one-device
comparison and writes its numbers to JSON; a second one runs the fit check of the real Vicuna-7B
config (2 layers, to keep compilation short) through ``python -m medusa_jax.fit`` started from a
process where JAX is already loaded, which exercises its re-exec. Both start once per module, in
parallel, and the tests below read their results.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from medusa_jax import config as config_lib
from medusa_jax import convert
from medusa_jax import fit
from medusa_jax import heads as heads_lib
from medusa_jax import runtime
from medusa_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_MESHES = ("data=8,fsdp=1,tensor=1", "data=2,fsdp=2,tensor=2", "data=1,fsdp=1,tensor=8")
DECODE_MESHES = ("data=1,fsdp=1,tensor=8", "data=2,fsdp=1,tensor=4")
VICUNA = ("vicuna7b_medusa1", "vicuna7b_medusa2", "vicuna13b_medusa1")
FIT_ARGS = ["--config", "configs/vicuna7b_medusa1.py", "--devices", "8", "--config.model_arch.num_hidden_layers=2",
            "--config.train.batch_size=8", "--config.train.seq_len=128", "--prompt_len", "64"]


def load_config(name: str, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


# ----------------------------------------------------------------------------------------------
# The subprocesses, started once and in parallel
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharding")
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  worker = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "sharding_multidevice.py"),
                             str(out / "multi.json")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  # JAX imported first (one device): fit must notice and re-run itself with 8 fake devices.
  code = ("import sys, runpy, jax; assert jax.device_count() == 1; "
          f"sys.argv = ['medusa_jax.fit'] + {FIT_ARGS + ['--json', str(out / 'fit.json')]!r}; "
          "runpy.run_module('medusa_jax.fit', run_name='__main__')")
  env1 = {k: v for k, v in env.items() if k != "XLA_FLAGS"}
  fitproc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env1, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  logs = {"multi": worker.communicate(timeout=900)[0], "fit": fitproc.communicate(timeout=900)[0]}
  res = {"logs": logs}
  for name, proc in (("multi", worker), ("fit", fitproc)):
    path = out / f"{name}.json"
    res[name] = json.loads(path.read_text()) if proc.returncode == 0 and path.exists() else None
  return res


def _need(runs, name):
  if runs[name] is None:
    pytest.fail(f"the {name} subprocess failed:\n{runs['logs'][name][-4000:]}")
  return runs[name]


# ----------------------------------------------------------------------------------------------
# Mesh shapes and specs (no devices needed)
# ----------------------------------------------------------------------------------------------

def test_parse_mesh_and_rest_of_devices():
  c = config_lib.default_config()
  assert sharding.parse_mesh("data=2, fsdp=4,tensor=1") == (("data", 2), ("fsdp", 4), ("tensor", 1))
  assert sharding.mesh_shape(c, 8) == (("data", "fsdp", "tensor"), (8, 1, 1))
  assert sharding.mesh_shape(c, 64, shape="data=-1,fsdp=16,tensor=1")[1] == (4, 16, 1)
  assert sharding.mesh_shape(c, 8, shape=(("data", 1), ("fsdp", 1), ("tensor", -1)))[1] == (1, 1, 8)
  for bad, msg in (("data=-1,fsdp=-1", "at most one"), ("data=3,fsdp=-1", "does not divide"),
                   ("data=2,fsdp=2", "uses 4 devices"), ("data2", "axis=size"), ("data=0", "bad entry")):
    with pytest.raises(ValueError, match=msg):
      sharding.mesh_shape(c, 8, shape=bad)


def test_spec_for_shards_by_rules_and_replicates_what_does_not_divide():
  rules = sharding.rules_of(config_lib.default_config())
  mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
  assert sharding.spec_for(("embed", "heads", "head_dim"), (64, 8, 16), rules, mesh) == jax.sharding.PartitionSpec(
      "fsdp", "tensor", None)
  # 9 heads (SmolLM2) on a 2-way tensor axis: replicated, not an error.
  assert sharding.spec_for(("embed", "heads", "head_dim"), (576, 9, 64), rules, mesh) == jax.sharding.PartitionSpec(
      "fsdp", None, None)
  # The batch takes both data axes; a batch of 1 is replicated.
  assert sharding.spec_for(("batch", None), (8, 16), rules, mesh) == jax.sharding.PartitionSpec(("data", "fsdp"), None)
  assert sharding.spec_for(("batch", None), (1, 16), rules, mesh) == jax.sharding.PartitionSpec(None, None)
  # A mesh axis is used once per array.
  assert sharding.spec_for(("embed", "embed"), (64, 64), (("embed", "fsdp"),), mesh) == jax.sharding.PartitionSpec(
      "fsdp", None)


def test_vicuna7b_shardings_from_abstract_params():
  """The real 7B tree, abstractly: 6.74 B backbone params, each device holds 1/8 of them (fsdp=8)."""
  c = load_config("vicuna7b_medusa1")
  cfg, wdtype = fit.model_config(c)
  hcfg = heads_lib.config_from(c)
  params = sharding.abstract_params(cfg, hcfg, wdtype)
  assert fit.param_count(params["base"]) == 6_738_415_616  # Vicuna-7B / Llama-7B
  assert params["base"]["layers_0"]["wq"].dtype == np.dtype("bfloat16")
  assert params["medusa"]["lm_head"].shape == (5, 4096, 32000) and params["medusa"]["w"].dtype == np.float32
  mesh = AbstractMesh((1, 8, 1), ("data", "fsdp", "tensor"))
  sh = sharding.param_shardings(cfg, hcfg, params, mesh, sharding.rules_of(c))
  assert sh["base"]["layers_0"]["w_down"].spec == jax.sharding.PartitionSpec(None, "fsdp")
  nbytes = lambda x: x.size * x.dtype.itemsize
  # Replicated: the norms and the heads' biases (no 'embed' axis); everything else is split 8 ways.
  whole = sum(nbytes(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
              if p[-1].key.endswith("norm") or p[-1].key == "b")
  total = sum(nbytes(x) for x in jax.tree.leaves(params))
  assert sharding.shard_bytes(params, sh) == (total - whole) // 8 + whole


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VICUNA)
@pytest.mark.parametrize("variant", [None, "gpu8", "tpu"])
def test_vicuna_configs_load(name, variant):
  c = load_config(name, variant)
  c.lock()
  assert c.model.startswith("/path/to/vicuna-")
  assert c.model_arch.model_type == "llama" and c.heads_dir == ""
  assert c.dtype in ("bfloat16", "float32") and c.train.remat_heads
  devices = 16 if variant == "tpu" else 8
  names, sizes = sharding.mesh_shape(c, devices)
  per = dict(zip(names, sizes))
  assert c.train.batch_size % (per["data"] * per["fsdp"]) == 0
  assert sharding.mesh_shape(c, devices, shape=c.mesh.decode_shape)[1] == (1, 1, devices)
  assert dict(sharding.rules_of(c))["embed_out"] is None  # the XLA workaround (see test_xla_partitioner_bug)
  with pytest.raises(ValueError, match="Unknown variant"):
    load_config(name, "v3-8")


def test_vicuna13b_architecture():
  cfg, _ = fit.model_config(load_config("vicuna13b_medusa1"))
  assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.mlp_dim, cfg.vocab_size) == (5120, 40, 40, 13824, 32000)
  assert cfg.norm_eps == 1e-6 and cfg.rope_theta == 10000.0 and not cfg.tie_embeddings


def test_placeholder_model_path_fails_clearly():
  c = load_config("vicuna7b_medusa1")
  with pytest.raises(convert.WeightsError, match="/path/to/vicuna-7b-v1.3.*not found"):
    runtime.load(c)


def test_fit_architecture_from_a_model_dir(tiny_llama_dir):
  c = config_lib.default_config()
  c.model = tiny_llama_dir()
  cfg, wdtype = fit.model_config(c)
  assert (cfg.dim, cfg.num_layers, cfg.vocab_size) == (64, 2, 256) and wdtype == np.float32
  c.model = "/nonexistent/model"
  with pytest.raises(convert.WeightsError, match="model_arch"):
    fit.model_config(c)


def test_batch_must_split_over_the_data_axes():
  c = config_lib.default_config()
  cfg = convert.config_from_hf(dict(model_type="llama", hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, vocab_size=32))
  tparams = {"medusa": {"w": jax.ShapeDtypeStruct((1, 1, 8, 8), np.float32)}}
  pl = sharding.TrainPlacement(c, AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor")), cfg,
                               heads_lib.HeadsConfig(1, 1), tparams, {})
  assert pl.batch_divisor == 4
  pl.check_batch(8)
  with pytest.raises(ValueError, match="batch_size=6 .* multiple of 4"):
    pl.check_batch(6)
  one = sharding.TrainPlacement(c, sharding.make_mesh(c), cfg, heads_lib.HeadsConfig(1, 1), tparams, {})
  assert one.data_shard() == (0, 1)  # one process reads the whole batch


# ----------------------------------------------------------------------------------------------
# 8 fake devices: sharded == one device
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mesh", TRAIN_MESHES)
def test_train_steps_match_one_device(runs, mesh):
  t = _need(runs, "multi")["train"]
  got = t["meshes"][mesh]
  np.testing.assert_allclose(got["losses"], t["ref_losses"], rtol=0, atol=1e-5)
  assert got["param_diff"] <= 1e-5, got["param_diff"]
  assert got["opt_diff"] <= 1e-5, got["opt_diff"]


def test_train_shardings_follow_the_rules(runs):
  m = _need(runs, "multi")["train"]["meshes"]
  s = m["data=2,fsdp=2,tensor=2"]["specs"]
  assert s["wq"] == ["fsdp", "tensor", None]
  assert s["wk"] == ["fsdp", "tensor", None]        # 4 kv heads split 2 ways
  assert s["w_gate"] == ["fsdp", "tensor"]
  assert s["heads_lm"] == [None, "fsdp", "tensor"]
  assert s["moments_DxF"] and all(x == ["fsdp", "tensor"] for x in s["moments_DxF"])  # Adam follows params
  s = m["data=1,fsdp=1,tensor=8"]["specs"]
  assert s["wq"] == [None, "tensor", None] and s["wk"] == [None, None, None]  # 4 kv heads: replicated on 8
  assert all(x is None for x in m["data=8,fsdp=1,tensor=1"]["specs"]["w_gate"])  # pure data parallel


@pytest.mark.parametrize("mesh", DECODE_MESHES)
def test_sharded_medusa_decoding_matches_one_device(runs, mesh):
  d = _need(runs, "multi")["decode"]
  got = d["meshes"][mesh]
  assert got["tokens"] == d["ref"] and got["streamed"] == d["ref"]
  assert got["steps"] == d["ref_steps"] and all(len(t) == 24 for t in d["ref"])
  assert got["wq"] == [None, "tensor", None] and got["heads_lm"] == [None, None, "tensor"]
  if mesh == "data=2,fsdp=1,tensor=4":  # batch 2 over data, 4 kv heads over tensor
    assert got["cache_k"] == ["data", "tensor", None, None] and got["tokens_spec"] == ["data", None]


@pytest.mark.parametrize("mesh", TRAIN_MESHES[1:])
def test_checkpoint_restores_under_another_mesh(runs, mesh):
  r = _need(runs, "multi")["checkpoint"][mesh]
  assert r["diff"] == 0.0 and r["same_sharding"] and r["data_state"] == {"position": 7}
  assert r["wq"] == {"data=2,fsdp=2,tensor=2": ["fsdp", "tensor", None],
                     "data=1,fsdp=1,tensor=8": [None, "tensor", None]}[mesh]


def test_each_host_reads_the_rows_its_devices_hold(runs):
  s = _need(runs, "multi")["shares"]
  # Devices 0-3 on host 0, 4-7 on host 1 (pretend): rows split between the hosts ...
  for mesh in ("data=2,fsdp=4,tensor=1", "data=8,fsdp=1,tensor=1", "data=1,fsdp=4,tensor=2"):
    assert s[mesh] == [[0, 2], [1, 2]], mesh
  # ... unless the batch is not split (tensor parallel only): both hosts read the same rows.
  assert s["data=1,fsdp=1,tensor=8"] == [[0, 1], [0, 1]]


@pytest.mark.xfail(strict=True, reason="XLA in jax 0.10.2 partitions h@w + (h@w)@w.T wrongly on a "
                   "(data, fsdp, tensor) mesh; configs replicate embed_out to avoid it. When this passes, "
                   "the bug is fixed: restore ('embed_out', 'tensor') and remove this test.")
def test_xla_partitioner_bug(runs):
  assert _need(runs, "multi")["xla_bug_error"] < 1e-4


# ----------------------------------------------------------------------------------------------
# The fit check
# ----------------------------------------------------------------------------------------------

def test_fit_check_vicuna7b(runs):
  r = _need(runs, "fit")
  D, F, V, L = 4096, 11008, 32000, 2
  assert r["devices"] == 8 and r["platform"] == "cpu" and r["model"]["num_layers"] == L
  assert r["base_params"] == 2 * V * D + D + L * (4 * D * D + 3 * D * F + 2 * D)
  assert r["heads_params"] == 5 * (D * D + D + D * V)
  t = r["train"]
  assert t["mesh"] == "data=1,fsdp=8,tensor=1" and t["rows_per_device"] == 1
  norms, biases = (2 * L + 1) * D, 5 * D  # replicated; the rest is split 8 ways
  assert t["held"]["frozen"] == 2 * ((r["base_params"] - norms) // 8 + norms)       # bf16 weights
  assert t["held"]["trainable"] == 4 * ((r["heads_params"] - biases) // 8 + biases)  # float32 heads
  assert t["held"]["optimizer"] >= 2 * t["held"]["trainable"]    # Adam's two moments
  # Donation: the updated params and optimizer state reuse their input buffers.
  assert t["step"]["temp"] > 0 and t["step"]["alias"] >= 0.9 * t["step"]["output"]
  d = r["decode"]
  assert d["mesh"] == "data=1,fsdp=1,tensor=8" and set(d["programs"]) == {"prefill", "vanilla step", "medusa step"}
  assert d["tree_nodes"] == 64 and all(p["argument"] > 0 for p in d["programs"].values())
  assert "train step  mesh data=1,fsdp=8,tensor=1" in runs["logs"]["fit"]
