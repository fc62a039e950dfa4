"""Fit check: will a config's train step and decode steps fit the devices of a mesh? No weights needed.

  python -m medusa_jax.fit --config configs/vicuna7b_medusa1.py --devices 8
  python -m medusa_jax.fit --config configs/vicuna7b_medusa1.py --devices 8 --mesh data=2,fsdp=4,tensor=1
  python -m medusa_jax.fit --config configs/vicuna7b_medusa1.py:tpu --devices 16 --only train

Builds the params, optimizer state, batch and decode state abstractly (``jax.eval_shape``: shapes
and shardings, no memory), jits the trainer's own train step and the decoder's own prefill, vanilla
and Medusa steps with their shardings, lowers and compiles them ahead of time, and prints what one
device holds: params and optimizer state (from their shardings) and each program's arguments,
outputs and temporaries (``compiled.memory_analysis()``).

``--devices N`` fakes N CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set
before JAX starts; the command re-runs itself in a subprocess when JAX is already loaded), so a
laptop can check a pod-slice mesh. XLA:CPU's buffer assignment is not a GPU's or a TPU's (other
fusions, no bf16 matmul kernels), so read the temporaries as an estimate; the params and optimizer
numbers are exact. Without ``--devices`` the real local devices are used.

The model's architecture comes from ``config.model_arch`` (its HF ``config.json`` fields) when the
config has one, else from ``config.model``'s ``config.json`` (weights are not read).
"""

from __future__ import annotations

import os
import subprocess
import sys


def _flag(argv, name: str):
  """The value of ``--name=V`` / ``--name V`` in argv, or None (read before absl parses flags)."""
  for i, a in enumerate(argv):
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  return None


def _fake_devices_env(n: int) -> dict:
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  return {"XLA_FLAGS": " ".join(kept + [f"--xla_force_host_platform_device_count={n}"]), "JAX_PLATFORMS": "cpu"}


def _prepare_devices(argv) -> None:
  """With --devices N: fake N CPU devices. XLA reads the flag once, when JAX initialises its
  backends, so it must be in the environment first; if JAX is already up, re-run in a subprocess."""
  n = _flag(argv, "devices")
  if n is None:
    return
  env = _fake_devices_env(int(n))
  if "jax" in sys.modules:
    # Deferred: importing JAX before XLA_FLAGS is set would fix the device count; here it is already loaded.
    import jax  # pylint: disable=g-import-not-at-top
    if jax.default_backend() == "cpu" and jax.device_count() == int(n):
      return
    sys.exit(subprocess.call([sys.executable, "-m", "medusa_jax.fit"] + list(argv[1:]), env={**os.environ, **env}))
  os.environ.update(env)


if __name__ == "__main__":
  _prepare_devices(sys.argv)

# pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import json
import time

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from medusa_jax import bundled
from medusa_jax import convert
from medusa_jax import decode
from medusa_jax import entry
from medusa_jax import heads as heads_lib
from medusa_jax import medusa
from medusa_jax import optim
from medusa_jax import runtime
from medusa_jax import sharding
from medusa_jax import trainer
# pylint: enable=g-import-not-at-top,wrong-import-position

GiB = 1024 ** 3


# ----------------------------------------------------------------------------------------------
# The model without weights
# ----------------------------------------------------------------------------------------------

def architecture(config) -> dict:
  """HF config.json fields: ``config.model_arch`` if set, else ``config.model``/config.json."""
  arch = config.get("model_arch", None)
  if arch:
    arch = arch.to_dict() if hasattr(arch, "to_dict") else dict(arch)
    if arch:
      return arch
  path = os.path.join(str(config.model), "config.json")
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  raise convert.WeightsError(
      f"The fit check needs the model's architecture: give the config a model_arch (its HF config.json "
      f"fields, see configs/vicuna7b_medusa1.py) or point --config.model at an HF directory ({path} "
      "does not exist).")


def model_config(config):
  """(ModelConfig, dtype of the loaded backbone weights), as ``runtime.load`` would build them.

  ``convert.load_model`` stores the backbone's weights in ``config.dtype`` and passes the remaining
  overrides to the architecture; this mirrors it without reading any weights.
  """
  overrides = dict(runtime.model_overrides(config))
  weights_dtype = overrides.pop("dtype")
  small = config.model in (convert.RANDOM_TINY, bundled.SMOLLM2) or config.model.endswith(".gguf")
  if config.get("model_arch", None) or not small:
    return convert.config_from_hf(architecture(config), **overrides), jnp.dtype(weights_dtype)
  cfg, _, _ = convert.load_model(config.model, weights_dtype, **overrides)  # small built-in models
  return cfg, jnp.dtype(weights_dtype)


def param_count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation
# ----------------------------------------------------------------------------------------------

def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")}
  # Live at once: the inputs, the outputs that do not reuse (alias) a donated input, the scratch.
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def check_train(config, cfg, hcfg, weights_dtype, mesh) -> dict:
  """Compiles the trainer's step for ``mesh``; returns per-device bytes."""
  tc = config.train
  params = sharding.abstract_params(cfg, hcfg, weights_dtype)
  params = jax.eval_shape(lambda p: trainer.with_adapters(config, cfg, p), params)
  split = optim.split_for_training(tc, params)
  tparams, frozen, tx = split.tparams, split.frozen, split.tx
  placement = sharding.TrainPlacement(config, mesh, cfg, hcfg, tparams, frozen)
  sc = dataclasses.replace(trainer.step_config(config, cfg, hcfg), rows=placement.rows)
  placement.check_batch(tc.batch_size)
  with_teacher = trainer.needs_teacher_copy(sc)
  teacher = None
  if with_teacher:
    teacher = sharding.with_shardings(params["base"], placement.teacher_shardings(params["base"]))
  opt = jax.eval_shape(tx.init, tparams)
  batch = {k: jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len), jnp.int32, sharding=placement.batch)
           for k in ("tokens", "loss_mask", "segment_ids", "positions")}
  state = optim.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=tparams, opt_state=opt)
  state_shardings = placement.step_in_shardings(tx, with_teacher)[0]
  args = (sharding.with_shardings(state, state_shardings), sharding.with_shardings(frozen, placement.f_shard),
          batch, teacher)
  t0 = time.perf_counter()
  compiled = trainer.jit_train_step(sc, tx, placement, with_teacher).lower(*args).compile()
  held = {"trainable": sharding.shard_bytes(tparams, placement.t_shard),
          "optimizer": sharding.shard_bytes(opt, placement.opt_shardings(tx)),
          "frozen": sharding.shard_bytes(frozen, placement.f_shard) if frozen else 0,
          "teacher": sharding.shard_bytes(params["base"], placement._teacher) if with_teacher else 0}  # pylint: disable=protected-access
  return {"mesh": sharding.describe(mesh), "batch": tc.batch_size, "seq_len": tc.seq_len,
          "rows_per_device": tc.batch_size / placement.batch_divisor, "held": held,
          "trainable_params": param_count(tparams), "step": _memory(compiled),
          "compile_s": time.perf_counter() - t0}


def check_decode(config, cfg, hcfg, weights_dtype, mesh, *, batch: int, prompt_len: int) -> dict:
  """Compiles the Medusa prefill, the vanilla step and the Medusa step for ``mesh``."""
  sampling = decode.sampling_from(config)
  spec = medusa.spec_from(config, hcfg)
  placement = sharding.DecodePlacement(cfg, hcfg, mesh, sharding.rules_of(config))
  params = sharding.abstract_params(cfg, hcfg, weights_dtype)
  p_sh = placement.params(params)
  params_in = sharding.with_shardings(params, p_sh)
  out = {"mesh": sharding.describe(mesh), "batch": batch, "prompt_len": prompt_len,
         "tree_nodes": spec.tree.num_nodes, "params": sharding.shard_bytes(params, p_sh), "programs": {}}
  for mode in ("vanilla", "medusa"):
    dec = medusa.make_decoder(cfg, sampling, spec if mode == "medusa" else None, placement=placement)
    dp = jax.eval_shape(dec.prepare, params_in)  # abstract DecodeParams: the heads' loop-invariant weights
    dp = sharding.with_shardings(dp, placement.decode_params(dp))
    P, S = decode.plan_cache(cfg, [prompt_len] * batch, sampling.max_new_tokens, dec.room)
    prefill_j, in_sh = dec.prefill_program(dp, batch, P, S)
    pre_args = (dp, jax.ShapeDtypeStruct((batch, P), jnp.int32, sharding=in_sh[1]),
                jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=in_sh[2]),
                jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=in_sh[3]))
    state = jax.eval_shape(prefill_j, *pre_args)
    state = sharding.with_shardings(state, placement.state(state))
    step_j = dec.state_programs(dp, state)[0]
    t0 = time.perf_counter()
    if mode == "medusa":  # the vanilla prefill is the Medusa one without the heads: check the larger
      out["programs"]["prefill"] = dict(_memory(prefill_j.lower(*pre_args).compile()), capacity=S)
    out["programs"][f"{mode} step"] = dict(_memory(step_j.lower(dp, state).compile()), capacity=S)
    out["programs"][f"{mode} step"]["compile_s"] = time.perf_counter() - t0
    out["cache"] = max(out.get("cache", 0), sharding.shard_bytes(state.cache, placement.state(state).cache))
  return out


def run(config, *, mesh: str | None = None, decode_mesh: str | None = None, decode_batch: int = 1,
        prompt_len: int = 1024, only: str = "all") -> dict:
  """The fit report as a dict (see ``format_report``)."""
  cfg, wdtype = model_config(config)
  hcfg = heads_lib.config_from(config)
  params = sharding.abstract_params(cfg, hcfg, wdtype)
  report = {"devices": jax.device_count(), "platform": jax.default_backend(), "model": dataclasses.asdict(cfg),
            "weights_dtype": str(wdtype), "base_params": param_count(params["base"]),
            "heads_params": param_count(params["medusa"]), "heads": dataclasses.asdict(hcfg)}
  if only in ("all", "train"):
    report["train"] = check_train(config, cfg, hcfg, wdtype, sharding.make_mesh(config, shape=mesh))
  if only in ("all", "decode"):
    report["decode"] = check_decode(config, cfg, hcfg, wdtype, sharding.decode_mesh(config, shape=decode_mesh),
                                    batch=decode_batch, prompt_len=prompt_len)
  return report


def format_report(r: dict) -> str:
  g = lambda b: f"{b / GiB:7.2f}"
  m = r["model"]
  lines = [
      f"devices: {r['devices']} x {r['platform']}"
      + ("  (fake CPU devices: program temporaries are XLA:CPU's, an estimate for GPU/TPU)"
         if r["platform"] == "cpu" else ""),
      f"model: {m['num_layers']} layers, d {m['dim']}, {m['num_heads']} heads ({m['num_kv_heads']} kv), "
      f"mlp {m['mlp_dim']}, vocab {m['vocab_size']}: {r['base_params'] / 1e9:.2f} B params, weights "
      f"{r['weights_dtype']}, compute {m['dtype']}",
      f"heads: {r['heads']['num_heads']} x {r['heads']['num_layers']} block(s), "
      f"{'shared' if r['heads']['shared_lm_head'] else 'per-head'} LM head: {r['heads_params'] / 1e9:.2f} B params",
  ]
  t = r.get("train")
  if t:
    h, s = t["held"], t["step"]
    lines += [
        "",
        f"train step  mesh {t['mesh']}  batch {t['batch']} x {t['seq_len']} ({t['rows_per_device']:g} rows "
        f"per device), {t['trainable_params'] / 1e9:.3f} B trainable params   [GiB per device]",
        f"  trainable params {g(h['trainable'])}   optimizer state {g(h['optimizer'])}   frozen params "
        f"{g(h['frozen'])}   teacher {g(h['teacher'])}   = {g(sum(h.values())).strip()} held between steps",
        f"  compiled step: arguments {g(s['argument'])}   outputs {g(s['output'])} (aliased {g(s['alias']).strip()})"
        f"   temporaries {g(s['temp'])}   peak {g(s['peak'])}   [{t['compile_s']:.0f} s to compile]",
    ]
  d = r.get("decode")
  if d:
    lines += ["",
              f"decoding    mesh {d['mesh']}  batch {d['batch']}, prompt {d['prompt_len']}, Medusa tree of "
              f"{d['tree_nodes']} nodes   [GiB per device]",
              f"  params {g(d['params'])}   KV cache {g(d['cache'])} (at most)"]
    for name, p in d["programs"].items():
      lines.append(f"  {name:<13} (cache {p['capacity']:>5} rows): arguments {g(p['argument'])}   outputs "
                   f"{g(p['output'])}   temporaries {g(p['temp'])}   peak {g(p['peak'])}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def main(argv):
  del argv
  runtime.quiet_jax_logs()
  f = flags.FLAGS
  if f.devices and jax.device_count() != f.devices:
    raise ValueError(f"--devices {f.devices}: JAX has {jax.device_count()} devices (set XLA_FLAGS before JAX starts).")
  t0 = time.perf_counter()
  # A mesh that does not divide, a batch that does not split, no architecture: one-line errors (entry.run).
  report = run(f.config, mesh=f.mesh, decode_mesh=f.decode_mesh, decode_batch=f.decode_batch,
               prompt_len=f.prompt_len, only=f.only)
  print(format_report(report))
  print(f"[{time.perf_counter() - t0:.0f} s]")
  if f.json:
    with open(f.json, "w") as fh:
      json.dump(report, fh, indent=1)


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:variant]); override keys "
                                  "with --config.key=value.", lock_config=True)
  flags.DEFINE_integer("devices", None, "Fake this many CPU devices (default: the real devices).")
  flags.DEFINE_string("mesh", None, "Training mesh, e.g. data=2,fsdp=4,tensor=1 (default: config.mesh.shape).")
  flags.DEFINE_string("decode_mesh", None, "Decoding mesh (default: config.mesh.decode_shape or .shape).")
  flags.DEFINE_integer("decode_batch", 1, "Sequences decoded together.")
  flags.DEFINE_integer("prompt_len", 1024, "Prompt length for the decoding check.")
  flags.DEFINE_enum("only", "all", ["all", "train", "decode"], "Which programs to compile.")
  flags.DEFINE_string("json", None, "Also write the report as JSON here.")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  _define_flags()
  entry.run(main)
