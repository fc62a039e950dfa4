"""Multi-device checks for tests/test_sharding.py, run in a subprocess with 8 fake CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python tests/sharding_multidevice.py OUT.json

The pytest process already has JAX with one device, and XLA reads the device count only once, at
start-up: hence a separate process. Every check compares a sharded run with the same run on one
device (a 1-device mesh in this same process) and writes plain numbers to OUT.json; the test file
asserts on them. One process for all checks pays JAX's start-up and the tiny model's compilations once.

Checks:
  train      the trainer's own jitted step (TrainPlacement, Medusa-2: backbone + heads, CE + heads
             loss) for 2 steps on meshes (data, fsdp, tensor) = (8,1,1), (2,2,2), (1,1,8): losses and
             parameters vs one device; the shardings actually used.
  decode     greedy Medusa decoding (Decoder with a DecodePlacement) on (1,1,8) and (2,1,4) vs one device.
  checkpoint Orbax training checkpoint written under (8,1,1), restored under (1,1,8) and (2,2,2) with
             the target shardings (the abstract tree is the restore target).
  shares     process_shard: which rows each host of a pretend 2-host machine must load.
  xla_bug    a partitioning bug of the pinned XLA that the configs here work around (check_xla_bug).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import checkpoint as ckpt_lib
from medusa_jax import config as config_lib
from medusa_jax import decode
from medusa_jax import medusa
from medusa_jax import heads as heads_lib
from medusa_jax import model as model_lib
from medusa_jax import optim
from medusa_jax import runtime
from medusa_jax import sharding
from medusa_jax import trainer
from medusa_jax import tree as tree_lib
from medusa_jax.model import ModelConfig

# Dimensions the meshes divide (8 query heads, MLP 128, vocabulary 256), except the 4 kv heads on an
# 8-way tensor axis: those are replicated, the fallback every config relies on.
CFG = ModelConfig(vocab_size=256, dim=64, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8, mlp_dim=128,
                  eos_ids=(255,), max_seq_len=512)
HCFG = heads_lib.HeadsConfig(num_heads=3, num_layers=1, shared_lm_head=False)
TRAIN_MESHES = ("data=8,fsdp=1,tensor=1", "data=2,fsdp=2,tensor=2", "data=1,fsdp=1,tensor=8")
DECODE_MESHES = ("data=1,fsdp=1,tensor=8", "data=2,fsdp=1,tensor=4")
ONE = "data=1,fsdp=1,tensor=1"


def safe_rules(rules):
  """The config's rules with ``embed_out`` (the Medusa blocks' output width) replicated: see xla_bug."""
  return tuple((k, None if k == "embed_out" else v) for k, v in rules)


def config():
  c = config_lib.default_config()
  c.mesh.rules = safe_rules(c.mesh.rules)
  c.heads.num_heads, c.heads.shared_lm_head = HCFG.num_heads, HCFG.shared_lm_head
  t = c.train
  t.steps, t.batch_size, t.seq_len, t.lr, t.warmup_steps = 2, 8, 16, 1e-2, 1
  t.trainable = (("medusa/.*", "heads"), ("base/.*", "backbone"))
  t.heads_only_steps, t.backbone_warmup_steps = 0, 1
  t.lm_weight, t.lm_loss, t.lambda0 = 1.0, "ce", 0.2
  return c


def mesh_for(c, shape):
  devices = jax.devices()[:1] if shape == ONE else jax.devices()
  return sharding.make_mesh(c, devices, shape=shape)


def batches(c):
  rng = np.random.default_rng(0)
  B, L = c.train.batch_size, c.train.seq_len
  out = []
  for _ in range(c.train.steps):
    n = rng.integers(L // 2, L + 1, B)  # right padding of various lengths
    seg = (np.arange(L)[None] < n[:, None]).astype(np.int32)
    out.append({"tokens": rng.integers(0, CFG.vocab_size, (B, L)).astype(np.int32),
                "loss_mask": (seg * (rng.random((B, L)) < 0.8)).astype(np.int32), "segment_ids": seg,
                "positions": np.where(seg > 0, np.arange(L)[None], 0).astype(np.int32)})
  return out


def spec_of(x) -> list:
  return [None if a is None else (a if isinstance(a, str) else list(a)) for a in x.sharding.spec]


def train_on(c, shape, data):
  """The trainer's own pieces, as train_and_evaluate wires them, on one mesh."""
  mesh = mesh_for(c, shape)
  rules = sharding.rules_of(c)
  params = sharding.init_params(CFG, HCFG, jax.random.PRNGKey(0), mesh, rules)  # sharded init
  split = optim.split_for_training(c.train, params)
  tparams, frozen, tx = split.tparams, split.frozen, split.tx
  placement = sharding.TrainPlacement(c, mesh, CFG, HCFG, tparams, frozen)
  placement.check_batch(c.train.batch_size)
  sc = dataclasses.replace(trainer.step_config(c, CFG, HCFG), rows=placement.rows)
  tparams, frozen = placement.put(tparams, frozen)
  state = optim.init_state(tx, placement, tparams)
  step_fn = trainer.jit_train_step(sc, tx, placement, False)
  losses = []
  for b in data:
    state, metrics = step_fn(state, frozen, placement.put_batch(b), None)
    losses.append([float(metrics["loss"]), float(metrics["heads_loss"]), float(metrics["lm/loss"])])
  tparams, opt_state = state.params, state.opt_state
  return {"losses": losses, "tparams": tparams, "opt_state": opt_state, "placement": placement, "tx": tx,
          "specs": {"wq": spec_of(tparams["base"]["layers_0"]["wq"]), "wk": spec_of(tparams["base"]["layers_0"]["wk"]),
                    "w_gate": spec_of(tparams["base"]["layers_0"]["w_gate"]),
                    "heads_lm": spec_of(tparams["medusa"]["lm_head"]),
                    # Adam's moments of every [D, F] weight (the MLP's gate and up projections).
                    "moments_DxF": [spec_of(x) for x in jax.tree.leaves(opt_state) if x.shape == (CFG.dim, CFG.mlp_dim)]}}


def max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check_train(c, out):
  data = batches(c)
  ref = train_on(c, ONE, data)
  out["train"] = {"ref_losses": ref["losses"], "meshes": {}}
  runs = {}
  for shape in TRAIN_MESHES:
    runs[shape] = got = train_on(c, shape, data)
    out["train"]["meshes"][shape] = {
        "losses": got["losses"], "param_diff": max_diff(got["tparams"], ref["tparams"]),
        "opt_diff": max_diff(got["opt_state"], ref["opt_state"]), "specs": got["specs"]}
  return runs[TRAIN_MESHES[0]]


def check_checkpoint(c, src, out):
  """Saved under (8,1,1), restored under other meshes with their shardings as the target."""
  state = {"params": src["tparams"], "opt_state": src["opt_state"]}
  meta = {"cfg": CFG, "trainable": [list(r) for r in c.train.trainable], "heads": dataclasses.asdict(HCFG),
          "model": "test"}
  res = {}
  with tempfile.TemporaryDirectory() as wd:
    ck = ckpt_lib.TrainCheckpoints(wd, every=1, keep=2, meta=meta)
    ck.save(2, state, {"position": 7}, force=True)
    ck.close()
    for shape in TRAIN_MESHES[1:]:
      mesh = mesh_for(c, shape)
      abstract = sharding.abstract_params(CFG, HCFG)
      label_map = optim.labels(abstract, c.train.trainable)
      t_abs, f_abs = optim.partition(abstract, label_map)
      pl = sharding.TrainPlacement(c, mesh, CFG, HCFG, t_abs, f_abs)
      target = {"params": sharding.with_shardings(t_abs, pl.t_shard),
                "opt_state": sharding.with_shardings(jax.eval_shape(src["tx"].init, t_abs), pl.opt_shardings(src["tx"]))}
      ck = ckpt_lib.TrainCheckpoints(wd, every=1, keep=2, meta=meta)
      restored, data_state = ck.restore(ck.latest_step(), target)
      ck.close()
      same_sharding = all(a.sharding == t.sharding for a, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)))
      res[shape] = {"diff": max_diff(restored, state), "same_sharding": same_sharding, "data_state": data_state,
                    "wq": spec_of(restored["params"]["base"]["layers_0"]["wq"])}
  out["checkpoint"] = res


def check_decode(out):
  base = model_lib.init_params(CFG, jax.random.PRNGKey(1))
  base = jax.tree.map(lambda x: x * 5.0 if x.ndim > 1 else x, base)  # sharper logits: no near-ties
  params = {"base": base, "medusa": runtime.random_heads(HCFG, CFG, base, seed=2, scale=0.5)}
  params = jax.tree.map(np.asarray, params)
  spec = medusa.MedusaSpec(heads=HCFG, tree=tree_lib.resolve("dense:2,3", num_heads=HCFG.num_heads))
  sampling = decode.Sampling(max_new_tokens=24)
  prompts = [np.random.default_rng(3).integers(0, 255, n).tolist() for n in (7, 12)]
  ref_tokens, ref_state = medusa.make_decoder(CFG, sampling, spec).generate(jax.tree.map(jnp.asarray, params), prompts)
  c = config()
  res = {"ref": ref_tokens, "ref_steps": int(ref_state.steps), "meshes": {}}
  for shape in DECODE_MESHES:
    pl = sharding.DecodePlacement.from_config(c, CFG, HCFG, shape=shape)
    p_sh = pl.put(params, pl.params(params))
    dec = medusa.make_decoder(CFG, sampling, spec, placement=pl)
    tokens, state = dec.generate(p_sh, prompts)
    streamed = [[], []]
    for new in dec.stream(p_sh, prompts):
      for b, t in enumerate(new):
        streamed[b] += t
    res["meshes"][shape] = {"tokens": tokens, "streamed": streamed, "steps": int(state.steps),
                            "cache_k": spec_of(state.cache["layers"][0]["k"]), "tokens_spec": spec_of(state.tokens_BxT),
                            "wq": spec_of(p_sh["base"]["layers_0"]["wq"]),
                            "heads_lm": spec_of(p_sh["medusa"]["lm_head"])}
  out["decode"] = res


def check_xla_bug(out):
  """XLA (jax 0.10.2) partitions ``y + y @ w.T`` with y = h @ w wrongly when h's rows are split over
  (data, fsdp) and w [D, D] over (fsdp, tensor): the Medusa block's gradient w.r.t. its input is then
  wrong by O(1) (the losses still agree). The configs used here replicate ``embed_out`` to avoid it;
  this records whether the bug is still there (the test is an xfail that turns into an error, and
  the workaround can go, once a JAX upgrade fixes it)."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config(), shape="data=2,fsdp=2,tensor=2")
  rng = np.random.default_rng(0)
  h = rng.standard_normal((8, 4, 16)).astype(np.float32)
  w = (0.3 * rng.standard_normal((16, 16))).astype(np.float32)
  f = lambda h, w: (h @ w) + (h @ w) @ w.T
  got = jax.jit(f)(jax.device_put(h, NamedSharding(mesh, P(("data", "fsdp")))),
                   jax.device_put(w, NamedSharding(mesh, P("fsdp", "tensor"))))
  out["xla_bug_error"] = float(np.abs(np.asarray(got) - f(h, w)).max())


def check_shares(out):
  """Rows per pretend host: devices 0-3 on host 0, 4-7 on host 1."""
  c = config_lib.default_config()
  res = {}
  for shape in ("data=2,fsdp=4,tensor=1", "data=8,fsdp=1,tensor=1", "data=1,fsdp=4,tensor=2",
                "data=1,fsdp=1,tensor=8"):
    mesh = sharding.make_mesh(c, shape=shape)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding._batch_axes(mesh, sharding.rules_of(c)), None))  # pylint: disable=protected-access
    res[shape] = [list(sharding.process_shard(batch, 0, process_of=lambda d: d.id // 4, me=h)) for h in (0, 1)]
  out["shares"] = res


def main(path):
  assert jax.device_count() == 8, jax.devices()
  jax.config.update("jax_default_matmul_precision", "highest")
  out, t0 = {}, time.perf_counter()
  c = config()
  run_8x1x1 = check_train(c, out)
  out["time_train"] = time.perf_counter() - t0
  check_checkpoint(c, run_8x1x1, out)
  out["time_checkpoint"] = time.perf_counter() - t0
  check_decode(out)
  out["time_decode"] = time.perf_counter() - t0
  check_shares(out)
  check_xla_bug(out)
  out["time_total"] = time.perf_counter() - t0
  with open(path, "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  main(sys.argv[1])
