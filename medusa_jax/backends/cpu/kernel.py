"""A CPU matmul for decoding's few-row projections, as an XLA FFI custom call: kernel mechanics only.

A decode step multiplies a few rows (one token per sequence, or a Medusa tree's nodes) by every
weight matrix. On a CPU that is bound by how fast the weights stream from memory up to the ridge
(about 10 rows on a 2-core Zen 4), and by the FMA units past it. XLA-CPU streams the weights well
for one row (a matrix-vector product) but switches to a GEMM kernel from two rows on, which
re-packs them on every call. ``cpu_matmul.cc`` reads weights stored as contiguous 32-column
panels (``pack``) once per call whatever the row count, with register-blocked row tiles of up to
12 rows that keep the FMA units busy past the ridge (its header says how).

Whether that wins, and up to how many rows, depends on the machine: on a 2-core AMD EPYC it beats
XLA's dot at every row count up to 128; on a 2-core Intel Xeon (AVX-512 and AMX) the previous
8-row kernel tied at 1 row and lost from 16 rows on. So the crossover is *measured* (``tune``), on
the machine that runs it, by timing one decode step's projections of SmolLM2's shapes with both at
row counts 1..128, and cached beside the compiled library. ``make setup`` does this (``python -m
medusa_jax.backends.cpu``); otherwise the first decoder that packs weights does (``max_rows``, about
half a minute, once per machine). ``--bench`` measures again and prints the roofline: per row
count and path, ms, GB/s, GFLOP/s and the fraction of the bound max(bytes / bandwidth, flops /
peak), the bandwidth being one pass over the weights at 1 row (best path) and the peak a
``PEAK_ROWS``-row step (best path).

The libraries this was measured against (``experiments/few_row_gemm_probe.py``): MKL's packed GEMM
(pip ``mkl``) runs its generic, non-AVX path on AMD CPUs (2-5x slower) and a row's result depends
on the other rows in the call; oneDNN's matmul keeps rows independent and tied the kernel from 16
rows on, but was slower below (1.4x at one row); both need an OpenMP runtime, which stalls when
other work shares the cores.

This module imports nothing from the package but ``hardware`` (a leaf: the CPU's name in the tuning
record). ``backends.cpu`` makes it a projection backend: it packs the projection groups the model
defines (which matrices, fused how: ``model.projections``) with ``pack`` and sends the calls it takes
to ``matmul``.

The same library holds decoding's attention over the KV cache (``attention``, ``cpu_attention.cc``):
one call per layer that reads only the cache rows attended to, not the cache's whole capacity.

Settings (environment):
  * ``MEDUSA_JAX_CPU_KERNELS=0`` turns the kernel off (XLA's own dots, e.g. for an A/B benchmark).
  * ``MEDUSA_JAX_CPU_ATTENTION=0`` leaves the attention to XLA (``backends.cpu.attention``).
  * ``MEDUSA_JAX_KERNEL_MAX_ROWS=n`` overrides the measured crossover (0: never).
  * ``MEDUSA_JAX_KERNEL_THREADS=n`` caps the threads the kernel uses (default: XLA's intra-op pool).
  * ``MEDUSA_JAX_KERNEL_HUGEPAGES=0`` keeps the kernel from backing the weights by huge pages.
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

from medusa_jax import hardware

log = logging.getLogger(__name__)

PANEL = 32
TARGET = "medusa_cpu_matmul"
ENV = "MEDUSA_JAX_CPU_KERNELS"
ROWS_ENV = "MEDUSA_JAX_KERNEL_MAX_ROWS"
# Row counts the crossover is measured at: one token, small trees, batched decoding (distillation
# runs at 32 rows), up to a 128-row call.
TUNE_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
_SRC = os.path.join(os.path.dirname(__file__), "cpu_matmul.cc")
# The decode attention (``attention``) is built into the same library; both include the header.
_SRCS = (_SRC, os.path.join(os.path.dirname(__file__), "cpu_attention.cc"))
_HEADER = os.path.join(os.path.dirname(__file__), "cpu_pool.h")
ATTENTION_TARGET = "medusa_cpu_attention"
# -ffp-contract=fast: the portable (non-AVX-512) build's updates become FMAs too, the same for every
# row block, as the AVX-512 build's intrinsics are.
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-w")


class KernelBuildError(RuntimeError):
  pass


def _cache_dir() -> str:
  return os.environ.get("MEDUSA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "medusa_jax")


def _compiler() -> str | None:
  for cxx in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if cxx and shutil.which(cxx):
      return cxx
  return None


def _machine_dir(cxx: str, srcs=(*_SRCS, _HEADER)) -> str:
  """The cache directory of these sources, compiler, jax and machine: the library (all sources) and
  the matmul's tuning (keyed by ``cpu_matmul.cc`` and its header: a change to the attention keeps it)."""
  parts = []
  for path in srcs:
    with open(path, "rb") as f:
      parts.append(f.read())
  key = hashlib.sha256(b"\0".join([*parts, cxx.encode(), jax.__version__.encode(), platform.machine().encode(),
                                   platform.node().encode(), " ".join(_FLAGS).encode()])).hexdigest()[:16]
  return os.path.join(_cache_dir(), "kernels", key)


def build(force: bool = False) -> str:
  """Compiles ``cpu_matmul.cc`` and ``cpu_attention.cc`` for this machine (``-march=native``); returns the library path.

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
  proc = subprocess.run([cxx, *_FLAGS, "-I", jax.ffi.include_dir(), *_SRCS, "-o", tmp], capture_output=True,
                        text=True)
  if proc.returncode != 0:
    os.unlink(tmp)
    errors = [line for line in proc.stderr.splitlines() if "error" in line] or proc.stderr.splitlines() or ["?"]
    raise KernelBuildError(f"{cxx} failed to build {' and '.join(_SRCS)}: {errors[0].strip()}\n{proc.stderr[-2000:]}")
  os.replace(tmp, path)
  return path


@functools.cache
def _load() -> bool:
  try:
    lib = ctypes.cdll.LoadLibrary(build())
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.MedusaCpuMatmul), platform="cpu")
    jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.MedusaCpuAttention), platform="cpu")
    return True
  except (KernelBuildError, OSError) as e:
    first, _, rest = str(e).partition("\n")
    log.warning("CPU decode kernel unavailable, using XLA's dots instead: %s", first)
    if rest:
      log.debug("%s", rest)
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


def attention(q_BxLxHxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS):
  """Grouped-query attention of the L new rows over a cache (``cpu_attention.cc``): float32 q
  [B, L, H, E], k and v [B, K, S, E], bool mask [B, L, S]; [B, L, H, E]. Reads only the cache rows
  up to the last one each query row attends to; a row attending to nothing gets zeros."""
  call = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q_BxLxHxE.shape, jnp.float32))
  return call(q_BxLxHxE.astype(jnp.float32), k_BxKxSxE.astype(jnp.float32), v_BxKxSxE.astype(jnp.float32),
              mask_BxLxS.astype(jnp.bool_))


# ----------------------------------------------------------------------------------------------
# The measured crossover and the roofline
# ----------------------------------------------------------------------------------------------

# One decode step's projections of SmolLM2-135M, as (in, out) features: 30 layers of q|k|v, o,
# gate|up and down, then the tied LM head. 538 MB of float32 weights.
LAYERS, DIM, MLP, QKV, VOCAB = 30, 576, 1536, 960, 49152
STEP_SHAPES = ((DIM, QKV), (DIM, DIM), (DIM, 2 * MLP), (MLP, DIM)) * LAYERS + ((DIM, VOCAB),)
STEP_PARAMS = sum(k * n for k, n in STEP_SHAPES)
STEP_BYTES = 4 * STEP_PARAMS
# The roofline's compute peak is measured as a GEMM of this many rows (well past the ridge).
PEAK_ROWS = 256


def step_flops(rows: int) -> int:
  return 2 * rows * STEP_PARAMS


def _tuning_path() -> str | None:
  cxx = _compiler()
  return None if cxx is None else os.path.join(_machine_dir(cxx, (_SRC, _HEADER)), "dispatch.json")


def _step_fn(mm):
  """One decode step's projections (``STEP_SHAPES``) chained as a forward does, through ``mm(x, w,
  out_features)``: each projection reads the previous one's output, so none can be skipped."""
  def step(x, ws, emb):
    for (qkv, o, gu, dn) in ws:
      a = mm(x, qkv, QKV)[:, :DIM]
      x = x + 0.01 * mm(a, o, DIM)
      g = mm(x, gu, 2 * MLP)
      x = x + 0.01 * mm(jax.nn.silu(g[:, :MLP]) * g[:, MLP:], dn, DIM)
    return jnp.argmax(mm(x, emb, VOCAB), -1)
  return jax.jit(step)


def step_paths(rows, matmuls: dict) -> dict:
  """Compiled, warmed-up step functions: ``{name: run(n)}`` that runs one step of ``n`` rows (any of
  ``rows``) and blocks. ``matmuls`` maps a name to ``(mm, packed)``: ``mm(x, w, out_features)``
  and whether it takes the weights packed by ``pack`` (else plain [in, out] arrays)."""
  rng = np.random.default_rng(0)
  plain = [jnp.asarray(rng.standard_normal(s, np.float32) * 0.02) for s in STEP_SHAPES]
  packed = [pack(w) for w in plain] if any(p for _, p in matmuls.values()) else None
  group = lambda ws: ([ws[i:i + 4] for i in range(0, 4 * LAYERS, 4)], ws[-1])
  xs = {n: jnp.ones((n, DIM), jnp.float32) for n in rows}
  runs = {}
  for name, (mm, is_packed) in matmuls.items():
    fn, (ws, emb) = _step_fn(mm), group(packed if is_packed else plain)
    for n in rows:
      fn(xs[n], ws, emb).block_until_ready()
    runs[name] = lambda n, fn=fn, ws=ws, emb=emb: fn(xs[n], ws, emb).block_until_ready()
  return runs


def time_paths(runs: dict, rows, repeats: int) -> dict:
  """``{name: [[seconds] * repeats per row count]}``. Paths and row counts take turns within each
  repeat, so that a burst of machine noise hits them alike."""
  times = {name: [[] for _ in rows] for name in runs}
  for _ in range(repeats):
    for i, n in enumerate(rows):
      for name, run in runs.items():
        t = time.perf_counter()
        run(n)
        times[name][i].append(time.perf_counter() - t)
  return times


def _kernel_and_xla():
  return {"xla": (lambda a, w, n: a @ w, False), "kernel": (matmul, True)}


def _time_projections(rows, repeats: int) -> list[tuple[float, float]]:
  """Median ms of one decode step's projections at each row count: (XLA's dot, the kernel)."""
  times = time_paths(step_paths(rows, _kernel_and_xla()), rows, repeats)
  return [(1e3 * float(np.median(a)), 1e3 * float(np.median(b))) for a, b in zip(times["xla"], times["kernel"])]


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


def tune(rows=TUNE_ROWS, repeats: int = 5, peak: bool = True) -> dict:
  """Measures the crossover on this machine (and, with ``peak``, the roofline's compute peak: both
  paths at ``PEAK_ROWS`` rows) and caches it beside the library; returns the record."""
  if not _load():
    raise KernelBuildError("the kernel did not build or load; see the warning above")
  rows = tuple(sorted(rows))
  times = _time_projections(rows, repeats)
  record = {"max_rows": crossover(rows, times), "rows": list(rows),
            "xla_ms": [round(a, 3) for a, _ in times], "kernel_ms": [round(b, 3) for _, b in times],
            "cpu": hardware.cpu_model(), "threads_env": os.environ.get("MEDUSA_JAX_KERNEL_THREADS"),
            "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
  if peak:
    big = time_paths(step_paths((PEAK_ROWS,), _kernel_and_xla()), (PEAK_ROWS,), max(2, repeats // 2))
    record["peak_rows"] = PEAK_ROWS
    record["peak_ms"] = {name: round(1e3 * float(np.min(t[0])), 3) for name, t in big.items()}
  path = _tuning_path()
  os.makedirs(os.path.dirname(path), exist_ok=True)
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
                "`python -m medusa_jax.backends.cpu` does it ahead of time) ...")
    record = tune(peak=False)
    log.warning("CPU decode kernel: used for projections of up to %d rows here.", record["max_rows"])
  return record


def max_rows() -> int:
  """Projections of at most this many rows use the kernel (``MEDUSA_JAX_KERNEL_MAX_ROWS`` or measured)."""
  forced = os.environ.get(ROWS_ENV)
  if forced is not None and forced.strip():
    return int(forced)
  return int(tuning()["max_rows"])


# ----------------------------------------------------------------------------------------------
# python -m medusa_jax.backends.cpu [--bench] [--tune] (__main__.py)
# ----------------------------------------------------------------------------------------------

def roofline(rows, times_ms: dict, peak_ms: dict | None = None, peak_rows: int = PEAK_ROWS) -> dict:
  """The roofline of measured step times ``{path: [ms per row count]}``: the memory bandwidth (one
  pass over the weights: the best path at 1 row; None without a 1-row measurement), the compute
  peak (the best path at ``peak_rows`` rows, from ``peak_ms``; else the best GFLOP/s measured) and,
  per row count, the bound max(bytes / bandwidth, flops / peak) in ms."""
  rows = list(rows)
  bw = None
  if 1 in rows:
    i = rows.index(1)
    bw = STEP_BYTES / (1e-3 * min(t[i] for t in times_ms.values()))
  if peak_ms:
    peak_path = min(peak_ms, key=peak_ms.get)
    peak = step_flops(peak_rows) / (1e-3 * peak_ms[peak_path])
    peak_how = f"{peak_rows} rows, {peak_path} {peak_ms[peak_path]:.0f} ms"
  else:
    peak, peak_how = max((step_flops(n) / (1e-3 * t[i]), f"{n} rows, {p} {t[i]:.0f} ms")
                         for p, t in times_ms.items() for i, n in enumerate(rows))
  bound = [max(STEP_BYTES / bw if bw else 0.0, step_flops(n) / peak) * 1e3 for n in rows]
  return {"bandwidth": bw, "peak": peak, "peak_how": peak_how, "bound_ms": bound}


def _why(n: int, xla_ms: float, kernel_ms: float, m: int) -> str:
  if n > m:
    return "XLA (beyond the crossover)" if kernel_ms <= xla_ms * (1 + TIE) else "XLA (kernel slower)"
  if kernel_ms < xla_ms:
    return f"kernel ({xla_ms / kernel_ms:.2f}x faster)"
  return f"kernel (tie within {TIE:.0%})"


def report(record: dict) -> str:
  """The measured record as a table (ms, GB/s, GFLOP/s and fraction of the roofline bound of each
  path per row count) with the roofline and the dispatch chosen from it, and why."""
  rows, m = record["rows"], record["max_rows"]
  paths = {"XLA dot": record["xla_ms"], "kernel": record["kernel_ms"]}
  peak_ms = record.get("peak_ms")
  roof = roofline(rows, {"xla": record["xla_ms"], "kernel": record["kernel_ms"]}, peak_ms,
                  record.get("peak_rows", PEAK_ROWS))
  lines = []
  if roof["bandwidth"]:
    lines.append(f"memory bandwidth {roof['bandwidth'] / 1e9:.1f} GB/s (one pass over the {STEP_BYTES / 1e6:.0f} MB "
                 f"of weights, 1 row, best path); compute peak {roof['peak'] / 1e9:.0f} GFLOP/s "
                 f"({roof['peak_how']}); bound = max(bytes/bandwidth, flops/peak)")
  head = f"{'rows':>5} {'bound ms':>8}"
  for name in paths:
    head += f" | {name + ' ms':>10} {'GB/s':>5} {'GFLOP/s':>7} {'of bound':>8}"
  lines.append(head + " | path chosen (why)")
  for i, n in enumerate(rows):
    line = f"{n:>5} {roof['bound_ms'][i]:>8.1f}"
    for t in paths.values():
      s = 1e-3 * t[i]
      line += f" | {t[i]:>10.1f} {STEP_BYTES / s / 1e9:>5.1f} {step_flops(n) / s / 1e9:>7.1f} {roof['bound_ms'][i] / t[i]:>8.0%}"
    lines.append(line + " | " + _why(n, record["xla_ms"][i], record["kernel_ms"][i], m))
  if peak_ms:
    lines.append("peak: " + ", ".join(f"{'XLA dot' if p == 'xla' else p} {t:.0f} ms = "
                                      f"{step_flops(record.get('peak_rows', PEAK_ROWS)) / t / 1e6:.0f} GFLOP/s"
                                      for p, t in peak_ms.items())
                 + f" at {record.get('peak_rows', PEAK_ROWS)} rows")
  k = dict(zip(rows, record["kernel_ms"]))
  if 1 in k:
    ratios = ", ".join(f"{n} rows {k[n] / k[1]:.2f}x" for n in (2, 4, 8, 16, 32, 64) if n in k)
    lines.append(f"kernel against its 1-row time: {ratios}")
  why = ("the kernel was slower than XLA's dot from one row on, or never faster" if m == 0 else
         f"the kernel was at least as fast as XLA's dot (within {TIE:.0%}) at every measured count up to "
         f"{m} rows" + ("" if m == rows[-1] else ", and slower at the next one"))
  lines.append(f"chosen: kernel for projections of <= {m} rows, XLA's dot above ({why}); "
               f"measured {record['measured']} on {record['cpu']}")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(
      prog="python -m medusa_jax.backends.cpu",
      description="Build the CPU decode kernel (cpu_matmul.cc) for this machine and measure up to "
                  "how many rows it beats XLA's own dot (cached; decoders dispatch on it).")
  ap.add_argument("--force", action="store_true", help="rebuild the library and measure again")
  ap.add_argument("--tune", action="store_true", help="measure the crossover again")
  ap.add_argument("--bench", action="store_true",
                  help="measure again and print the roofline: per row count and path, ms, GB/s, GFLOP/s and "
                       "the fraction of the bound, and the choice made from them")
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
