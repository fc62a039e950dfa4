"""A CPU matmul for decoding's few-row projections, as an XLA FFI custom call.

A decode step multiplies 1 to ~64 rows (one token per sequence, or a Medusa tree's nodes) by every
weight matrix, so on a CPU it is bound by how fast the weights stream from memory. XLA-CPU streams
them well for one row (a matrix-vector product) but switches to a GEMM kernel from two rows on,
which re-packs the weights: on the 2-core Zen 4 this project measures on, 2 rows cost ~1.25x one
row and 8 rows ~1.4x (``python -m medusa_jax.cpu_kernels --bench``). ``csrc/cpu_matmul.cc`` reads
weights stored as contiguous 32-column panels once per call whatever the row count up to 8, which
makes one row faster than XLA's and a small tree cost little more than one row.

Use:
  * ``decode_params(cfg, params)`` adds packed copies of the backbone's matrices (``*_p`` keys) to
    a params pytree, once, outside jit; ``model.forward`` uses them when present. Training never
    sees them. Decoders do this themselves (``decode.Decoder``).
  * It is active for float32 on a single CPU device, when the library builds (a C++17 compiler;
    compiled on first use, cached under ``$MEDUSA_JAX_CACHE`` or ``~/.cache/medusa_jax``).
    ``MEDUSA_JAX_CPU_KERNELS=0`` turns it off (XLA's own dots, e.g. for an A/B benchmark);
    ``MEDUSA_JAX_KERNEL_THREADS=n`` caps the threads it uses (default: XLA's intra-op pool).
  * Prefill-sized calls (more than ``MAX_ROWS`` rows) keep XLA's dot on the unpacked weights.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

PANEL = 32
MAX_ROWS = 128  # measured faster than XLA up to here (--bench); larger calls (prefill) keep XLA
TARGET = "medusa_cpu_matmul"
ENV = "MEDUSA_JAX_CPU_KERNELS"
_SRC = os.path.join(os.path.dirname(__file__), "csrc", "cpu_matmul.cc")


class KernelBuildError(RuntimeError):
  pass


def _cache_dir() -> str:
  return os.environ.get("MEDUSA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "medusa_jax")


def _compiler() -> str | None:
  for cxx in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if cxx and shutil.which(cxx):
      return cxx
  return None


def build(force: bool = False) -> str:
  """Compiles ``csrc/cpu_matmul.cc`` for this machine (``-march=native``); returns the library path.

  The library is cached by a hash of the source, the compiler, jaxlib and the machine, and written
  atomically, so concurrent first uses (test workers) do not see a half-written file.
  """
  cxx = _compiler()
  if cxx is None:
    raise KernelBuildError("no C++ compiler found (set CXX, or install g++ / clang++)")
  with open(_SRC, "rb") as f:
    src = f.read()
  flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", "-I", jax.ffi.include_dir()]
  key = hashlib.sha256(b"\0".join([src, cxx.encode(), jax.__version__.encode(), platform.machine().encode(),
                                   platform.node().encode(), " ".join(flags).encode()])).hexdigest()[:16]
  path = os.path.join(_cache_dir(), "kernels", key, "libmedusa_cpu.so")
  if os.path.exists(path) and not force:
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  proc = subprocess.run([cxx, *flags, _SRC, "-o", tmp], capture_output=True, text=True)
  if proc.returncode != 0:
    os.unlink(tmp)
    raise KernelBuildError(f"{cxx} failed to build {_SRC}:\n{proc.stderr[-2000:]}")
  os.replace(tmp, path)
  return path


@functools.cache
def _load() -> bool:
  try:
    lib = ctypes.cdll.LoadLibrary(build())
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.MedusaCpuMatmul), platform="cpu")
    return True
  except (KernelBuildError, OSError) as e:
    log.warning("CPU decode kernel unavailable, using XLA's dots instead: %s", e)
    return False


def enabled() -> bool:
  """Whether decoding on this process's default backend uses the kernel (see the module doc)."""
  setting = os.environ.get(ENV, "auto").strip().lower()
  if setting in ("0", "false", "off", "no"):
    return False
  if jax.default_backend() != "cpu":
    return False
  return _load()


def pack(w_DxF) -> jax.Array:
  """[D, F] -> [ceil(F/32), D, 32] contiguous column panels (zero-padded on the right)."""
  D, F = w_DxF.shape
  pad = -F % PANEL
  w = jnp.pad(jnp.asarray(w_DxF, jnp.float32), ((0, 0), (0, pad)))
  return w.reshape(D, -1, PANEL).transpose(1, 0, 2)


def matmul(x, packed, out_features: int):
  """``x[..., D] @ W`` for W packed by ``pack``; float32, any leading shape."""
  lead, D = x.shape[:-1], x.shape[-1]
  M = int(np.prod(lead)) if lead else 1
  NP = packed.shape[0]
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((M, NP * PANEL), jnp.float32))
  y = call(x.reshape(M, D).astype(jnp.float32), packed)
  if NP * PANEL != out_features:
    y = y[:, :out_features]
  return y.reshape(*lead, out_features)


def use_kernel(x, packed) -> bool:
  """Whether a projection of ``x`` (rows = all but the last axis) should go through the kernel."""
  return packed is not None and int(np.prod(x.shape[:-1])) <= MAX_ROWS and x.dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# Packed copies of a backbone's matrices
# ----------------------------------------------------------------------------------------------

def _layer_packed(p) -> dict:
  D = p["wq"].shape[0]
  qkv = jnp.concatenate([p["wq"].reshape(D, -1), p["wk"].reshape(D, -1), p["wv"].reshape(D, -1)], axis=1)
  wo = p["wo"].reshape(-1, p["wo"].shape[-1])
  return {"qkv_p": pack(qkv), "wo_p": pack(wo), "gate_up_p": pack(jnp.concatenate([p["w_gate"], p["w_up"]], 1)),
          "down_p": pack(p["w_down"])}


def is_packed(params) -> bool:
  base = params.get("base", params)
  return "lm_head_p" in base


@functools.partial(jax.jit, static_argnums=0)
def _pack_backbone(cfg, base):
  new = dict(base)
  for i in range(cfg.num_layers):
    new[f"layers_{i}"] = {**base[f"layers_{i}"], **_layer_packed(base[f"layers_{i}"])}
  from medusa_jax import model as model_lib  # pylint: disable=g-import-not-at-top  (model imports this module)
  new["lm_head_p"] = pack(model_lib.lm_head_weight(cfg, base))
  return new


# (cfg, the backbone leaves it was made from, packed backbone): the decoders of one model (vanilla
# and Medusa in a benchmark, calibration's step timers) share one packed copy.
_last = None


def decode_params(cfg, params):
  """``params`` ({base, medusa} or a bare backbone) with packed copies added, when ``enabled()``
  and the weights are float32; otherwise ``params`` itself. Idempotent; the packed backbone is
  made once for the most recent backbone and reused."""
  global _last
  base = params.get("base", params) if isinstance(params, dict) else None
  if base is None or is_packed(params) or not enabled():
    return params
  if base["embed"].dtype != jnp.float32 or cfg.compute_dtype != jnp.float32:
    return params
  leaves = jax.tree.leaves(base)
  if any(len(leaf.sharding.device_set) > 1 for leaf in leaves if hasattr(leaf, "sharding")):
    return params  # sharded over a mesh: the custom call has no partitioning rule
  if _last is None or _last[0] != cfg or len(_last[1]) != len(leaves) or any(
      a is not b for a, b in zip(_last[1], leaves)):
    _last = (cfg, leaves, _pack_backbone(cfg, base))
  return {**params, "base": _last[2]} if "base" in params else _last[2]


# ----------------------------------------------------------------------------------------------
# python -m medusa_jax.cpu_kernels [--bench]
# ----------------------------------------------------------------------------------------------

def _bench(rows: list[int], repeats: int) -> None:
  """Times SmolLM2's per-step projections (30 layers + LM head) with XLA's dot and the kernel."""
  L, D, F, V = 30, 576, 1536, 49152
  rng = np.random.default_rng(0)
  shapes = [(D, 960), (D, D), (D, 2 * F), (F, D)]
  ws = [[jnp.asarray(rng.standard_normal(s, np.float32) * 0.02) for s in shapes] for _ in range(L)]
  emb = jnp.asarray(rng.standard_normal((D, V), np.float32) * 0.02)
  packed = [[pack(w) for w in layer] for layer in ws]
  emb_p = pack(emb)

  def chain(x, ws, emb, mm):
    for (qkv, o, gu, dn) in ws:
      a = mm(x, qkv, 960)[:, :D]
      x = x + 0.01 * mm(a, o, D)
      g = mm(x, gu, 2 * F)
      x = x + 0.01 * mm(jax.nn.silu(g[:, :F]) * g[:, F:], dn, D)
    return jnp.argmax(mm(x, emb, V), -1)

  xla = jax.jit(lambda x, ws, emb: chain(x, ws, emb, lambda a, w, n: a @ w))
  ker = jax.jit(lambda x, ws, emb: chain(x, ws, emb, matmul))
  print(f"{'rows':>5} {'XLA dot ms':>11} {'kernel ms':>10} {'ratio':>6}")
  for n in rows:
    x = jnp.ones((n, D), jnp.float32)
    out = []
    for fn, w, e in ((xla, ws, emb), (ker, packed, emb_p)):
      fn(x, w, e).block_until_ready()
      ts = []
      for _ in range(repeats):
        t = time.perf_counter()
        fn(x, w, e).block_until_ready()
        ts.append(time.perf_counter() - t)
      out.append(1e3 * float(np.median(ts)))
    print(f"{n:>5} {out[0]:>11.1f} {out[1]:>10.1f} {out[0] / out[1]:>6.2f}", flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser(
      prog="python -m medusa_jax.cpu_kernels",
      description="Build the CPU decode kernel (csrc/cpu_matmul.cc) for this machine, and optionally "
                  "time SmolLM2's per-step projections with it against XLA's own dot.")
  ap.add_argument("--force", action="store_true", help="rebuild even if a cached library exists")
  ap.add_argument("--bench", action="store_true", help="time XLA dot vs the kernel per row count")
  ap.add_argument("--rows", default="1,2,4,8,16,32,64", help="row counts for --bench")
  ap.add_argument("--repeats", type=int, default=20)
  args = ap.parse_args(argv)
  print(build(force=args.force))
  if args.bench:
    if not _load():
      raise SystemExit("the kernel did not load; see the warning above")
    _bench([int(r) for r in args.rows.split(",")], args.repeats)


if __name__ == "__main__":
  main()
