"""The CPU decode kernel as a projection backend (``medusa_jax.backends``): the few-row projections
of float32 decoding on one CPU device, up to the row count measured to win on the machine.

``kernel`` builds, measures and runs the kernel (``python -m medusa_jax.backends.cpu`` builds it and
measures the crossover ahead of time; ``--bench`` prints the roofline and why each row count chose
its path). Here is its side of the seam: its copy of a projection group is the group's weights side
by side, [in, sum of outputs], in the kernel's 32-column panels (``kernel.pack``), so one call reads
q, k and v (or gate and up) once.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import backends
from medusa_jax.backends.cpu import kernel

NAME = "cpu_kernel"


def _pack_group(ws) -> backends.Prepared:
  fused = jnp.concatenate([w.reshape(w.shape[0], -1) for w in ws], axis=1)
  return backends.Prepared(kernel.pack(fused), NAME, tuple(w.shape[1:] for w in ws))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _pack(projections, cfg, params):
  return jax.tree.map(_pack_group, projections(cfg, params), is_leaf=lambda g: isinstance(g, tuple))


def prepare(projections, cfg, params):
  """The packed copy of ``projections(cfg, params)`` (see ``backends.prepare``), about the size of
  their weights; None where the kernel is not used: not float32, turned off or unbuilt
  (``kernel.enabled``), weights sharded over a mesh, or slower than XLA's dot even for one row here.
  It also settles the kernel's measured row crossover now (``kernel.max_rows``), outside any trace."""
  ws = jax.tree.leaves(params)
  if cfg.compute_dtype != jnp.float32 or any(w.dtype != jnp.float32 for w in ws) or not kernel.enabled():
    return None
  if any(len(w.sharding.device_set) > 1 for w in ws if hasattr(w, "sharding")):
    return None  # sharded over a mesh: the custom call has no partitioning rule
  if kernel.max_rows() < 1:
    return None  # measured slower than XLA's dot even for one row on this machine
  return _pack(projections, cfg, params)


def takes(x) -> bool:
  """float32, and no more rows than measured to win."""
  return x.dtype == jnp.float32 and int(np.prod(x.shape[:-1])) <= kernel.max_rows()


matmul = kernel.matmul

ATTENTION_ENV = "MEDUSA_JAX_CPU_ATTENTION"


def attention(q, k, v, mask):
  """Decoding's attention over the cache in the kernel library (``kernel.attention``: one call per
  layer, reading only the rows written so far), for as many new rows as the projections take (a long
  prefill keeps XLA's batched matmuls); float32 only. ``MEDUSA_JAX_CPU_ATTENTION=0`` leaves it to XLA
  (an A/B switch; the projections keep the kernel)."""
  if os.environ.get(ATTENTION_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
    return None
  if any(a.dtype != jnp.float32 for a in (q, k, v)) or q.shape[0] * q.shape[1] > kernel.max_rows():
    return None
  return kernel.attention(q, k, v, mask)
