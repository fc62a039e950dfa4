r"""Several training runs in one process (or one set of processes), for tests/test_multiprocess.py.

  python -m medusa_jax.launch -n 2 --devices_per_process 2 -- python tests/multiprocess_train.py RUNS.json

RUNS.json is a list of ``{"config": "configs/x.py:tiny", "workdir": DIR, "overrides": {key: value}}``;
each run is ``trainer.train_and_evaluate(config, workdir)``, what ``python -m medusa_jax.train
--config ... --workdir ... --config.key=value`` calls, one after the other in this process (JAX
imported and, with several processes, ``jax.distributed`` set up once). A value for a tuple-valued
key (``mesh.shape``) is its Python literal, as on the command line. Each process prints
``run <i> done: <the run's return value>`` as JSON.

Why not the CLI: every process of a CLI run pays its imports and small compilations again (about
10 s on a 2-core machine), which the tests' several runs per process count share here.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys

from medusa_jax import runtime
from medusa_jax import trainer


def load(spec: str, overrides: dict):
  """``configs/x.py:variant`` with ``overrides`` applied (dotted keys)."""
  path, _, variant = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("run_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  c = mod.get_config(variant or None)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    if isinstance(node[leaf], tuple) and isinstance(value, str):
      value = ast.literal_eval(value)
    node[leaf] = value
  return c


def main(path: str) -> None:
  runtime.quiet_jax_logs()
  with open(path) as f:
    runs = json.load(f)
  for i, run in enumerate(runs):
    out = trainer.train_and_evaluate(load(run["config"], run["overrides"]), run["workdir"])
    print(f"run {i} done: " + json.dumps({"step": out["step"], "stopped": out["stopped"]}), flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
