"""Projection backends: the seam through which decoding's weight projections (and, optionally, its
attention over the KV cache) may leave XLA's ops.

The core (``model``, ``heads``, ``medusa``) keeps every weight in its plain layout, [in, out...], the
one that suits TPU, GPU and XLA-CPU alike, and sends each projection a backend may serve through
``project``. It names them in groups: the plain weights that read the same input (q, k and v; gate
and up), which a backend may fuse into one call. A backend keeps its own copy of such groups, in
its own layout, made once per set of params by ``prepare`` (``decode.Decoder.prepare`` calls it;
training never sees a copy), and decides at trace time which calls it takes (``takes``: say, few
enough rows). Every other call is XLA's dot on the plain weights, exactly as without a backend.

A backend is a module, named in ``BACKENDS``, with:

  ``prepare(projections, cfg, params)``  as ``prepare`` below, or None where it is not used
                                         (turned off, unbuilt, not its dtype, weights on a mesh);
  ``takes(x)``                whether it serves a projection of ``x`` (rows: all but the last axis);
  ``matmul(x, data, out)``    ``x[..., in]`` times its copy ``data`` of a group: [..., out], the
                              group's outputs side by side;
  ``attention(q, k, v, mask)``  optional: a decoding layer's attention over its KV cache (``attend``),
                              or None where it does not take the call.

The only one is the CPU decode kernel (``backends.cpu``). This module imports nothing from the package:
the backends are imported when first asked for.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Sequence

import flax.struct
import jax

# Name -> module, in order of preference.
BACKENDS = {"cpu_kernel": "medusa_jax.backends.cpu"}


@flax.struct.dataclass
class Prepared:
  """A backend's copy of one projection group: ``data`` in the backend's layout, the backend's name,
  and each weight's output shape (its shape past the input axis). The name and the shapes are
  static: ``project`` dispatches on them when it is traced."""
  data: jax.Array
  backend: str = flax.struct.field(pytree_node=False)
  shapes: tuple[tuple[int, ...], ...] = flax.struct.field(pytree_node=False)


def _module(name: str):
  return importlib.import_module(BACKENDS[name])


def prepare(projections: Callable, cfg, params):
  """The first backend's copy of the projection groups ``projections(cfg, params)`` (a pytree whose
  leaves are the groups, tuples of plain [in, ...] weights that read one input of
  ``cfg.compute_dtype``): the same pytree with a ``Prepared`` per group. None where no backend is
  used; XLA's dots then serve every projection.

  ``projections`` and ``cfg`` are hashable: a backend makes the groups inside its own jitted copy,
  compiled once per ``cfg``, so their reshapes and transposes (the tied embedding's) are never
  materialised on their own, and cost nothing at all where no backend is used."""
  for name in BACKENDS:
    copies = _module(name).prepare(projections, cfg, params)
    if copies is not None:
      return copies
  return None


def takes(x, prepared: Prepared | None) -> bool:
  """Whether ``project`` sends the projection of ``x`` by the group ``prepared`` (None: no copy) to
  its backend; decided when it is traced, from ``x``'s shape and dtype."""
  return prepared is not None and _module(prepared.backend).takes(x)


def project(x, ws: Sequence[jax.Array], prepared: Prepared | None = None, preferred_element_type=None) -> tuple:
  """``x[..., in]`` times each weight of the group ``ws`` (plain [in, ...] weights, cast to ``x``'s
  dtype): a tuple of [..., *w.shape[1:]] arrays. Through the backend that made ``prepared`` (its
  copy of ``ws``, or None) where it takes the call; else XLA's dot, accumulating in
  ``preferred_element_type``."""
  if takes(x, prepared):
    sizes = [math.prod(shape) for shape in prepared.shapes]
    y = _module(prepared.backend).matmul(x, prepared.data, sum(sizes))
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return tuple(y[..., s:s + n].reshape(*x.shape[:-1], *shape)
                 for s, n, shape in zip(starts, sizes, prepared.shapes))
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  return tuple(jax.lax.dot_general(x, w.astype(x.dtype), dims, preferred_element_type=preferred_element_type)
               for w in ws)


def attend(q_BxLxHxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS, prepared: Prepared | None):
  """A decoding layer's grouped-query attention over its cache through the backend that made
  ``prepared`` (one of the layer's groups; None: no backend), or None where it has no attention or
  does not take the call; the caller then runs XLA's. Same contract as ``model``'s: q [B, L, H, E],
  k and v [B, K, S, E], bool mask [B, L, S]; [B, L, H, E]."""
  if prepared is None:
    return None
  fn = getattr(_module(prepared.backend), "attention", None)
  return None if fn is None else fn(q_BxLxHxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS)
