"""Few-row GEMM probe: one decode step's projections (SmolLM2-135M's shapes, 538 MB of float32
weights) at 1..64 rows, through every path this machine has, timed in turns in one process.

Paths:
  * ``floor``: the same chain with each projection replaced by a broadcast (what is left: the
    elementwise work and the ~120 calls' dispatch, common to every JAX path);
  * ``xla``: XLA's own dot (``x @ w``);
  * ``kernel``: the project's kernel as the package builds it (``medusa_jax/backends/cpu/cpu_matmul.cc``);
  * candidates: other kernel sources (``--candidate A.cc,B.cc``, same FFI signature), by file stem,
    e.g. an earlier version of the project's kernel: ``git show REV:medusa_jax/backends/cpu/cpu_matmul.cc > v1.cc``
    (``medusa_jax/csrc/cpu_matmul.cc`` in revisions before the backends subpackage);
  * ``mkl``: MKL's packed GEMM (``cblas_sgemm_pack`` once, ``cblas_sgemm_compute`` per call), if
    ``libmkl_rt`` is found (``--mkl``, or the ``mkl`` wheel's ``lib/`` under this Python's prefix);
  * ``dnnl``: oneDNN's matmul with weights in its chosen layout, if its headers and library are
    found (``--dnnl-prefix``, or this Python's prefix).

The JAX paths run the step as a jitted chain (``cpu_kernel.step_paths``); ``kernel_c`` (the
project's kernel again) and the libraries run the same 121 GEMMs back to back from C (threads:
``--lib-threads``; the libraries' through OpenMP), without the chain's other work (``floor``). Each path's row results are also checked
bit for bit against 1-row calls (greedy Medusa needs a row's result independent of its call).

  .venv/bin/python experiments/few_row_gemm_probe.py [--rows 1,2,4,8,16,32,64] [--repeats 7] [--peak]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import hardware
from medusa_jax.backends.cpu import kernel as cpu_kernel

HERE = os.path.dirname(os.path.abspath(__file__))


def _find(patterns):
  for pat in patterns:
    hits = sorted(glob.glob(pat))
    if hits:
      return hits[0]
  return None


def build_helper(dnnl_prefix: str | None, out_dir: str) -> tuple[ctypes.CDLL, bool]:
  src = os.path.join(HERE, "few_row_gemm_probe.cc")
  kernel = cpu_kernel._SRC  # pylint: disable=protected-access
  cmd = ["g++", *cpu_kernel._FLAGS, "-I", jax.ffi.include_dir(), f'-DPROBE_KERNEL_SRC="{kernel}"', src]  # pylint: disable=protected-access
  dnnl = bool(dnnl_prefix and os.path.exists(os.path.join(dnnl_prefix, "include", "oneapi", "dnnl", "dnnl.hpp"))
              and _find([os.path.join(dnnl_prefix, "lib", "libdnnl.so*")]))
  if dnnl:
    lib = os.path.join(dnnl_prefix, "lib")
    if not os.path.exists(os.path.join(lib, "libdnnl.so")):
      cmd += [_find([os.path.join(lib, "libdnnl.so.*")])]
    else:
      cmd += ["-L", lib, "-ldnnl"]
    cmd += ["-DPROBE_DNNL", "-I", os.path.join(dnnl_prefix, "include"), f"-Wl,-rpath,{lib}"]
  out = os.path.join(out_dir, "probe.so")
  subprocess.run(cmd + ["-o", out], check=True)
  return ctypes.CDLL(out), dnnl


def build_candidate(src: str, out_dir: str) -> ctypes.CDLL:
  out = os.path.join(out_dir, os.path.basename(src) + ".so")
  subprocess.run(["g++", *cpu_kernel._FLAGS, "-I", jax.ffi.include_dir(), src, "-o", out], check=True)  # pylint: disable=protected-access
  return ctypes.CDLL(out)


def ffi_matmul(target):
  def mm(x, packed, out_features):
    M, NP = x.shape[0], packed.shape[0]
    y = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((M, NP * cpu_kernel.PANEL), jnp.float32))(x, packed)
    return y[:, :out_features]
  return mm


@contextlib.contextmanager
def realtime(on: bool):
  """With ``on`` (Linux, root): every thread of this process at round-robin real-time priority 1 for
  the timed section, so that other work on a shared machine does not preempt it (the kernel still
  leaves others 5% of each second)."""
  tids = [int(t) for t in os.listdir("/proc/self/task")] if on else []
  done = []
  try:
    for tid in tids:
      try:
        os.sched_setscheduler(tid, os.SCHED_RR, os.sched_param(1))
        done.append(tid)
      except OSError:
        pass
    if on:
      print(f"real-time priority for {len(done)} of {len(tids)} threads while timing")
    yield
  finally:
    for tid in done:
      try:
        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
      except OSError:
        pass


def bitwise_jax(mm, is_packed, rows) -> bool:
  """Rows of an n-row call equal the same rows called alone (a gate|up-shaped projection)."""
  rng = np.random.default_rng(3)
  w = rng.standard_normal((576, 3072)).astype(np.float32) * 0.05
  x = rng.standard_normal((max(rows), 576)).astype(np.float32)
  wj = cpu_kernel.pack(w) if is_packed else jnp.asarray(w)
  f = jax.jit(lambda a, b: mm(a, b, 3072))
  ok = True
  for n in rows:
    full = np.asarray(f(x[:n], wj))
    for r in {0, n // 2, n - 1}:
      ok &= bool(np.array_equal(np.asarray(f(x[r:r + 1], wj))[0], full[r]))
  return ok


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--rows", default="1,2,4,8,16,32,64")
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--candidate", help="other kernel sources to time, comma-separated (FFI symbol MedusaCpuMatmul; "
                                      "each named by its file's stem)")
  ap.add_argument("--mkl", help="path of libmkl_rt.so (default: the mkl wheel's, under this Python's prefix)")
  ap.add_argument("--dnnl-prefix", default=sys.prefix, help="oneDNN's prefix (include/ and lib/)")
  ap.add_argument("--lib-threads", type=int, default=os.cpu_count(), help="the libraries' OpenMP threads")
  ap.add_argument("--paths", default="floor,xla,kernel,candidate,kernel_c,mkl,dnnl", help="which paths to time")
  ap.add_argument("--realtime", action="store_true",
                  help="time at real-time priority (Linux, root), on a machine other work keeps busy")
  ap.add_argument("--peak", action="store_true", help=f"also time xla and kernel at {cpu_kernel.PEAK_ROWS} rows")
  args = ap.parse_args(argv)
  rows = tuple(int(r) for r in args.rows.split(","))
  wanted = set(args.paths.split(","))
  os.environ.setdefault("MKL_THREADING_LAYER", "GNU")
  os.environ.setdefault("OMP_NUM_THREADS", str(args.lib_threads))
  tmp = tempfile.mkdtemp(prefix="gemm_probe_")
  helper, have_dnnl = build_helper(args.dnnl_prefix, tmp)
  matmuls = {}
  if "xla" in wanted:
    matmuls["xla"] = (lambda a, w, n: a @ w, False)
  if "floor" in wanted:  # the chain without the projections' work: what is not the weights' cost
    matmuls["floor"] = (lambda a, w, n: a[:, :1] * w[0, :n], False)
  if "kernel" in wanted and cpu_kernel._load():  # pylint: disable=protected-access
    matmuls["kernel"] = (cpu_kernel.matmul, True)
  candidates = []
  for src in (args.candidate.split(",") if args.candidate and "candidate" in wanted else []):
    name = os.path.splitext(os.path.basename(src))[0]
    candidates.append(name)
    cand = build_candidate(src, tmp)
    jax.ffi.register_ffi_target(f"probe_{name}", jax.ffi.pycapsule(cand.MedusaCpuMatmul), platform="cpu")
    matmuls[name] = (ffi_matmul(f"probe_{name}"), True)

  print(f"{hardware.cpu_model()}, {os.cpu_count()} cores; jax {jax.__version__}; "
        f"{cpu_kernel.STEP_BYTES / 1e6:.0f} MB of weights, {len(cpu_kernel.STEP_SHAPES)} projections per step")
  # Each candidate gets its own copy of the weights: the project's kernel backs the copy it reads by
  # huge pages, which would speed up any other path reading that copy too.
  runs = cpu_kernel.step_paths(rows, {k: v for k, v in matmuls.items() if k not in candidates})
  for name in candidates:
    runs.update(cpu_kernel.step_paths(rows, {name: matmuls[name]}))
  bitwise = {name: bitwise_jax(mm, p, rows) for name, (mm, p) in matmuls.items() if name != "floor"}

  shapes = (ctypes.c_int64 * (2 * len(cpu_kernel.STEP_SHAPES)))(*[v for kn in cpu_kernel.STEP_SHAPES for v in kn])
  helper.probe_set_shapes(len(cpu_kernel.STEP_SHAPES), shapes, max(rows))
  for fn in ("probe_mkl_pass", "probe_dnnl_pass", "probe_kernel_pass"):
    getattr(helper, fn).restype = ctypes.c_double
    getattr(helper, fn).argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
  gate_up = 2  # index of a gate|up projection in STEP_SHAPES, for the bitwise check

  def lib_bitwise(fn):
    out1, outn = np.zeros(3072, np.float32), np.zeros(max(rows) * 3072, np.float32)
    fn(1, gate_up, out1.ctypes.data)
    ok = True
    for n in rows:  # the helper's input rows are fixed, so compare row 0
      fn(n, gate_up, outn.ctypes.data)
      ok &= bool(np.array_equal(outn[:3072], out1))
    return ok

  if "kernel_c" in wanted:
    helper.probe_kernel_init(args.lib_threads)
    runs["kernel_c"] = lambda n: helper.probe_kernel_pass(n, -1, None)
    bitwise["kernel_c"] = lib_bitwise(helper.probe_kernel_pass)
    for n in rows:
      runs["kernel_c"](n)
  mkl = args.mkl or _find([os.path.join(sys.prefix, "lib", "libmkl_rt.so*")])
  if "mkl" in wanted and mkl:
    if helper.probe_mkl_init(mkl.encode(), args.lib_threads) == 0:
      runs["mkl"] = lambda n: helper.probe_mkl_pass(n, -1, None)
      bitwise["mkl"] = lib_bitwise(helper.probe_mkl_pass)
      for n in rows:
        runs["mkl"](n)
    else:
      print(f"mkl: {mkl} did not load")
  elif "mkl" in wanted:
    print("mkl: no libmkl_rt found (pip install mkl, or --mkl PATH)")
  if "dnnl" in wanted and have_dnnl:
    # oneDNN's primitives (and its copy of the weights, 538 MB) are per row count.
    bitwise["dnnl"] = lib_bitwise(helper.probe_dnnl_pass)
    runs["dnnl"] = lambda n: helper.probe_dnnl_pass(n, -1, None)
    for n in rows:
      runs["dnnl"](n)
  elif "dnnl" in wanted:
    print("dnnl: no oneDNN headers and library under --dnnl-prefix")

  with realtime(args.realtime):
    times = cpu_kernel.time_paths(runs, rows, args.repeats)
  helper.probe_free_dnnl()
  peak_ms = None
  if args.peak:
    big = {k: v for k, v in matmuls.items() if k in ("xla", "kernel")}
    big_runs = cpu_kernel.step_paths((cpu_kernel.PEAK_ROWS,), big)
    with realtime(args.realtime):
      pt = cpu_kernel.time_paths(big_runs, (cpu_kernel.PEAK_ROWS,), 3)
    peak_ms = {k: 1e3 * min(v[0]) for k, v in pt.items()}

  med = {k: [1e3 * float(np.median(t)) for t in v] for k, v in times.items()}
  best = {k: [1e3 * float(np.min(t)) for t in v] for k, v in times.items()}
  roof = cpu_kernel.roofline(rows, {k: v for k, v in best.items() if k != "floor"}, peak_ms)
  bw = f"{roof['bandwidth'] / 1e9:.1f} GB/s" if roof["bandwidth"] else "?"
  print(f"roofline (min times): bandwidth {bw}, peak {roof['peak'] / 1e9:.0f} GFLOP/s ({roof['peak_how']})")
  print(f"{'path':>9} {'':>6}" + "".join(f"{n:>8}" for n in rows) + "   bitwise rows")
  print(f"{'bound':>9} {'ms':>6}" + "".join(f"{b:>8.1f}" for b in roof["bound_ms"]))
  for name in times:
    print(f"{name[:9]:>9} {'min':>6}" + "".join(f"{t:>8.1f}" for t in best[name]) + f"   {'' if name not in bitwise else 'yes' if bitwise[name] else 'NO'}")
    print(f"{'':>9} {'median':>6}" + "".join(f"{t:>8.1f}" for t in med[name]))
    print(f"{'':>9} {'GB/s':>6}" + "".join(f"{cpu_kernel.STEP_BYTES / t / 1e6:>8.1f}" for t in best[name]))
    print(f"{'':>9} {'GFLOP/s':>6}" + "".join(f"{cpu_kernel.step_flops(n) / t / 1e6:>8.1f}" for n, t in zip(rows, best[name])))
    print(f"{'':>9} {'xbound':>6}" + "".join(f"{t / b:>8.2f}" for t, b in zip(best[name], roof["bound_ms"])))
    if 1 in rows:
      i1 = rows.index(1)
      print(f"{'':>9} {'x1row':>6}" + "".join(f"{t / best[name][i1]:>8.2f}" for t in best[name]))
  if peak_ms:
    print("peak runs: " + ", ".join(f"{k} {v:.0f} ms" for k, v in peak_ms.items()))


if __name__ == "__main__":
  main()
