"""A CPU matmul for decoding's few-row projections, as an XLA FFI custom call: kernel mechanics only.

A decode step multiplies a few rows (one token per sequence, or a Medusa tree's nodes) by every
weight matrix, so on a CPU it is bound by how fast the weights stream from memory. XLA-CPU streams
them well for one row (a matrix-vector product) but switches to a GEMM kernel from two rows on,
which re-packs the weights on every call. ``csrc/cpu_matmul.cc`` reads weights stored as contiguous
32-column panels (``pack``) once per call whatever the row count up to 8.

Whether that wins, and up to how many rows, depends on the machine: on a 2-core AMD EPYC it beat
XLA's dot at every row count up to 128; on a 2-core Intel Xeon it tied at 1 row and lost from 16
rows on. So the crossover is *measured* (``tune``), on the machine that runs it, by timing one
decode step's projections of SmolLM2's shapes with both at row counts 1..128, and cached beside the
compiled library. ``make setup`` does this (``python -m medusa_jax.cpu_kernels``); otherwise the
first decoder that packs weights does (``max_rows``, about half a minute, once per machine).

This module imports nothing from the package: the model owns the packed layout (which matrices
are packed, fused how: ``model.pack_weights``) and calls ``use_kernel`` / ``matmul`` here.

Settings (environment):
  * ``MEDUSA_JAX_CPU_KERNELS=0`` turns the kernel off (XLA's own dots, e.g. for an A/B benchmark).
  * ``MEDUSA_JAX_KERNEL_MAX_ROWS=n`` overrides the measured crossover (0: never).
  * ``MEDUSA_JAX_KERNEL_THREADS=n`` caps the threads the kernel uses (default: XLA's intra-op pool).
  * ``MEDUSA_JAX_CACHE`` moves the cache (default ``~/.cache/medusa_jax``).
It is used for float32 on a single CPU device only, when a C++17 compiler can build it.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import json
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
TARGET = "medusa_cpu_matmul"
ENV = "MEDUSA_JAX_CPU_KERNELS"
ROWS_ENV = "MEDUSA_JAX_KERNEL_MAX_ROWS"
# Row counts the crossover is measured at: one token, small trees, batched decoding (distillation
# runs at 32 rows), up to a 128-row call.
TUNE_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
_SRC = os.path.join(os.path.dirname(__file__), "csrc", "cpu_matmul.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


class KernelBuildError(RuntimeError):
  pass


def _cache_dir() -> str:
  return os.environ.get("MEDUSA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "medusa_jax")


def _compiler() -> str | None:
  for cxx in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if cxx and shutil.which(cxx):
      return cxx
  return None


def _machine_dir(cxx: str) -> str:
  """The cache directory of this source, compiler, jax and machine: the library and its tuning."""
  with open(_SRC, "rb") as f:
    src = f.read()
  key = hashlib.sha256(b"\0".join([src, cxx.encode(), jax.__version__.encode(), platform.machine().encode(),
                                   platform.node().encode(), " ".join(_FLAGS).encode()])).hexdigest()[:16]
  return os.path.join(_cache_dir(), "kernels", key)


def build(force: bool = False) -> str:
  """Compiles ``csrc/cpu_matmul.cc`` for this machine (``-march=native``); returns the library path.

  The library is cached by a hash of the source, the compiler, jaxlib and the machine, and written
  atomically, so concurrent first uses (test workers) do not see a half-written file.
  """
  cxx = _compiler()
  if cxx is None:
    raise KernelBuildError("no C++ compiler found (set CXX, or install g++ / clang++)")
  path = os.path.join(_machine_dir(cxx), "libmedusa_cpu.so")
  if os.path.exists(path) and not force:
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  proc = subprocess.run([cxx, *_FLAGS, "-I", jax.ffi.include_dir(), _SRC, "-o", tmp], capture_output=True,
                        text=True)
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
  """Whether decoding on this process's default backend may use the kernel (see the module doc)."""
  setting = os.environ.get(ENV, "auto").strip().lower()
  if setting in ("0", "false", "off", "no"):
    return False
  if jax.default_backend() != "cpu" or jax.device_count() != 1:
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
  """Whether the projection of ``x`` (rows = all but its last axis) by the packed matrix ``packed``
  (None: not packed) goes through the kernel: float32, and no more rows than measured to win."""
  return (packed is not None and x.dtype == jnp.float32
          and int(np.prod(x.shape[:-1])) <= max_rows())


# ----------------------------------------------------------------------------------------------
# The measured crossover
# ----------------------------------------------------------------------------------------------

def _tuning_path() -> str | None:
  cxx = _compiler()
  return None if cxx is None else os.path.join(_machine_dir(cxx), "dispatch.json")


def _time_projections(rows, repeats: int) -> list[tuple[float, float]]:
  """Median ms of one decode step's projections (SmolLM2's 30 layers' q|k|v, o, gate|up, down and
  its LM head) at each row count: (XLA's dot, the kernel). Row counts take turns, so that a burst
  of machine noise hits them alike."""
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

  fns = (jax.jit(lambda x, ws, emb: chain(x, ws, emb, lambda a, w, n: a @ w)),
         jax.jit(lambda x, ws, emb: chain(x, ws, emb, matmul)))
  args = ((ws, emb), (packed, emb_p))
  xs = {n: jnp.ones((n, D), jnp.float32) for n in rows}
  for n in rows:  # compile and warm up every shape first
    for fn, a in zip(fns, args):
      fn(xs[n], *a).block_until_ready()
  times = {(n, i): [] for n in rows for i in range(2)}
  for _ in range(repeats):
    for n in rows:
      for i, (fn, a) in enumerate(zip(fns, args)):
        t = time.perf_counter()
        fn(xs[n], *a).block_until_ready()
        times[n, i].append(time.perf_counter() - t)
  return [(1e3 * float(np.median(times[n, 0])), 1e3 * float(np.median(times[n, 1]))) for n in rows]


# A kernel within this fraction of XLA's time counts as a tie, which the kernel wins: one row's
# result must round the same in a vanilla step and in a tree's verify step (greedy Medusa then
# emits exactly vanilla's tokens), so the kernel serves a contiguous range of row counts from 1.
TIE = 0.03


def crossover(rows, times) -> int:
  """The largest measured row count up to which the kernel is at least as fast as XLA's dot at every
  measured count, a tie (within ``TIE``) counting as a win; 0 if it loses already at one row or
  never wins outright. A count between two measured ones uses the smaller's verdict."""
  best, won = 0, False
  for n, (xla_ms, kernel_ms) in zip(rows, times):
    if kernel_ms > xla_ms * (1 + TIE):
      break
    best, won = n, won or kernel_ms < xla_ms
  return best if won else 0


def tune(rows=TUNE_ROWS, repeats: int = 5) -> dict:
  """Measures the crossover on this machine and caches it beside the library; returns the record."""
  if not _load():
    raise KernelBuildError("the kernel did not build or load; see the warning above")
  rows = tuple(sorted(rows))
  times = _time_projections(rows, repeats)
  from medusa_jax import hardware  # pylint: disable=g-import-not-at-top  (a leaf too)
  record = {"max_rows": crossover(rows, times), "rows": list(rows),
            "xla_ms": [round(a, 3) for a, _ in times], "kernel_ms": [round(b, 3) for _, b in times],
            "cpu": hardware.cpu_model(), "threads_env": os.environ.get("MEDUSA_JAX_KERNEL_THREADS"),
            "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
  path = _tuning_path()
  fd, tmp = tempfile.mkstemp(suffix=".json", dir=os.path.dirname(path))
  with os.fdopen(fd, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, path)
  _tuned.cache_clear()
  return record


@functools.cache
def _tuned() -> dict | None:
  path = _tuning_path()
  if path is None or not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def tuning() -> dict:
  """This machine's measured crossover record, measuring it first if it is not cached yet."""
  record = _tuned()
  if record is None:
    log.warning("Measuring where the CPU decode kernel beats XLA's dot on this machine (once; "
                "`python -m medusa_jax.cpu_kernels` does it ahead of time) ...")
    record = tune()
    log.warning("CPU decode kernel: used for projections of up to %d rows here.", record["max_rows"])
  return record


def max_rows() -> int:
  """Projections of at most this many rows use the kernel (``MEDUSA_JAX_KERNEL_MAX_ROWS`` or measured)."""
  forced = os.environ.get(ROWS_ENV)
  if forced is not None and forced.strip():
    return int(forced)
  return int(tuning()["max_rows"])


# ----------------------------------------------------------------------------------------------
# python -m medusa_jax.cpu_kernels [--bench] [--tune]
# ----------------------------------------------------------------------------------------------

def report(record: dict) -> str:
  lines = [f"{'rows':>5} {'XLA dot ms':>11} {'kernel ms':>10} {'XLA/kernel':>11}  path"]
  for n, a, b in zip(record["rows"], record["xla_ms"], record["kernel_ms"]):
    lines.append(f"{n:>5} {a:>11.1f} {b:>10.1f} {a / b:>11.2f}  "
                 + ("kernel" if n <= record["max_rows"] else "XLA"))
  m = record["max_rows"]
  why = ("the kernel was slower than XLA's dot from one row on, or never faster" if m == 0 else
         f"the kernel was at least as fast as XLA's dot (within {TIE:.0%}) at every measured count up to "
         f"{m} rows" + ("" if m == record["rows"][-1] else ", and slower at the next one"))
  lines.append(f"chosen: kernel for projections of <= {m} rows, XLA's dot above ({why}); "
               f"measured {record['measured']} on {record['cpu']}")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(
      prog="python -m medusa_jax.cpu_kernels",
      description="Build the CPU decode kernel (csrc/cpu_matmul.cc) for this machine and measure up to "
                  "how many rows it beats XLA's own dot (cached; decoders dispatch on it).")
  ap.add_argument("--force", action="store_true", help="rebuild the library and measure again")
  ap.add_argument("--tune", action="store_true", help="measure the crossover again")
  ap.add_argument("--bench", action="store_true", help="print the measurements and the choice made from them")
  ap.add_argument("--rows", default=",".join(map(str, TUNE_ROWS)), help="row counts to measure at")
  ap.add_argument("--repeats", type=int, default=5, help="timed calls per row count (the median is used)")
  args = ap.parse_args(argv)
  print(build(force=args.force))
  if not _load():
    raise SystemExit("error: the kernel did not load; see the warning above")
  record = _tuned()
  if record is None or args.tune or args.force or args.bench:
    record = tune(tuple(int(r) for r in args.rows.split(",")), args.repeats)
  print(report(record))


if __name__ == "__main__":
  main()
