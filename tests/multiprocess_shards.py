r"""Which examples each process of a real multi-process run reads, for tests/test_multiprocess.py.

  python -m medusa_jax.launch -n 2 --devices_per_process 2 -- python tests/multiprocess_shards.py \
      --config configs/smollm2_medusa1.py:tiny --config.data.data_dir=DIR ... --out OUT_DIR

Every process starts as the trainer does (``jax.distributed`` from the launcher's environment, the
config's mesh over all processes' devices), builds the trainer's own ``TrainPlacement`` and
``train_data.Feed``, and reads one epoch of the train split through the trainer's loader, packed
and unpacked. It writes OUT_DIR/process_<i>.json: the process count, its data shard and, per
layout, the source index of every example of every batch it read (a batch's distinct ids). No
model is built: the shards follow from the mesh and the config alone.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from medusa_jax import convert
from medusa_jax import data
from medusa_jax import heads as heads_lib
from medusa_jax import sharding
from medusa_jax import train_data

_CONFIG = config_flags.DEFINE_config_file("config", None, "The training config.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Where each process writes process_<i>.json.")


def model_config(config):
  """The model's architecture without its weights (an HF directory's config.json), else the model."""
  path = os.path.join(config.model, "config.json")
  if os.path.isfile(path):
    with open(path) as f:
      return convert.config_from_hf(json.load(f))
  return convert.load_model(config.model)[0]


def main(argv):
  del argv
  config = _CONFIG.value
  sharding.maybe_initialize_distributed(config)
  placement = sharding.TrainPlacement(config, sharding.make_mesh(config), model_config(config),
                                      heads_lib.config_from(config), {}, {})
  # The split as the trainer reads it (built beforehand: no tokenizer here to build it with).
  train = data.load_split(config.data.data_dir, train_data.dataset_name(config), "train")
  out = {"process_count": jax.process_count(), "shard": list(placement.data_shard()), "examples": len(train)}
  for pack in (False, True):
    with config.unlocked():
      config.data.pack = pack
    feed = train_data.Feed(config, placement, {"train": train}, None)
    batches = feed.loader("train", seed=config.seed, num_epochs=1)
    out["packed" if pack else "unpacked"] = [[int(i) - 1 for i in np.unique(b["id"]) if i] for b in batches]
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, f"process_{jax.process_index()}.json"), "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "out"])
  app.run(main)
