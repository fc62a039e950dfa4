"""Every config in configs/ (and every variant its docstring names) loads the way the CLIs load it.

The CLIs define ``config_flags.DEFINE_config_file('config', ..., lock_config=True)`` and read
overrides such as ``--config.train.steps=3`` from the command line; here each parse uses a fresh
``FlagValues`` and the argv it is given. A loaded config must also make sense to the code that
consumes it: its ``train.trainable`` rules cover every parameter, its optimizer groups have learning
rates, its tree fits its heads — checked on abstract shapes (``jax.eval_shape``, no memory).
"""

import glob
import inspect
import os
import re

from absl import flags
import jax
import pytest
from ml_collections import config_flags

from medusa_jax import config as config_lib
from medusa_jax import convert
from medusa_jax import decode
from medusa_jax import heads as heads_lib
from medusa_jax import medusa
from medusa_jax import model as model_lib
from medusa_jax import optim
from medusa_jax import runtime
from medusa_jax import train_data
from medusa_jax import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                      if not os.path.basename(p).startswith("_"))


def _docstring(path: str) -> str:
  """The config module's docstring, from the module loaded by path as configs load each other
  (``ast.parse`` raised a spurious SystemError on CPython 3.11.7 when a finalizer ran mid-parse)."""
  return inspect.cleandoc(config_lib.sibling_config(os.path.join(REPO, path), os.path.basename(path)).__doc__ or "")


def _variants(path: str) -> list[str]:
  """The variants a config's docstring names: ``:tiny``, or ``configs/<this file>.py:tpu`` in a command."""
  doc = _docstring(path)
  found = re.findall(r"``(?:configs/\w+\.py)?:(\w+)``", doc) + re.findall(re.escape(path) + r":(\w+)", doc)
  return sorted(set(found))


CASES = [(p, None) for p in CONFIG_FILES] + [(p, v) for p in CONFIG_FILES for v in _variants(p)]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
  monkeypatch.chdir(REPO)  # the CLIs document relative paths: configs/x.py


def _parse(*args):
  """Parses argv the way medusa_jax.train / generate / benchmark do; returns the loaded config."""
  argv = ["prog", *args]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True,
                                           sys_argv=argv)
  fv(argv)
  return holder.value


def test_configs_are_found():
  assert {"configs/smollm2.py", "configs/smollm2_medusa1.py", "configs/smollm2_medusa2.py"} <= set(CONFIG_FILES)
  assert "tiny" in _variants("configs/smollm2_medusa1.py")


def _model_config(c) -> model_lib.ModelConfig:
  """The config's architecture when it records one (``model_arch``, for models not on disk), else a
  small Llama with SmolLM2's vocabulary (draft vocabularies must fit in it) and every optional
  parameter (untied LM head, qkv biases): parameter paths do not depend on the other sizes."""
  if "model_arch" in c:
    return convert.config_from_hf(c.model_arch.to_dict(), **runtime.model_overrides(c))
  return model_lib.ModelConfig(vocab_size=49152, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                               mlp_dim=128, tie_embeddings=False, qkv_bias=True)


@pytest.mark.parametrize("path,variant", CASES, ids=[f"{p}:{v}" if v else p for p, v in CASES])
def test_config_loads_and_is_consistent(path, variant):
  c = _parse(f"--config={path}" + (f":{variant}" if variant else ""))
  assert c.is_locked
  assert "python -m medusa_jax." in _docstring(path), "put the launch command in the config's docstring"
  # The conversions at the module boundary.
  hcfg = heads_lib.config_from(c)
  decode.sampling_from(c)
  medusa.spec_from(c, hcfg)
  train_data.dataset_name(c)
  # Training: every parameter matched by a rule, every group with a schedule, an optimizer that builds.
  cfg = _model_config(c)
  trainer.step_config(c, cfg, hcfg)
  params = jax.eval_shape(lambda k: trainer.with_adapters(c, cfg, (lambda b: {
      "base": b, "medusa": heads_lib.init_params(hcfg, cfg, b)})(model_lib.init_params(cfg, k))), jax.random.PRNGKey(0))
  label_map = optim.labels(params, c.train.trainable)
  if "lora" in params:  # adapters train; the base weights stay frozen under them
    assert all(label_map[p] is None for p in label_map if p.startswith("base/"))
    assert all(label_map[p] is not None for p in label_map if p.startswith("lora/"))
  assert all(label_map[p] is None for p in label_map if p == "medusa/vocab_ids"), "the draft vocabulary is data"
  assert any(g is not None for p, g in label_map.items() if p.startswith("medusa/")), "the heads must train"
  tparams, _ = optim.partition(params, label_map)
  tx, _ = optim.make_optimizer(c.train, {k: v for k, v in label_map.items() if v is not None}, c.train.steps)
  jax.eval_shape(tx.init, tparams)


def test_override_is_applied_and_typed():
  c = _parse("--config=configs/smollm2_medusa1.py:tiny", "--config.train.steps=3", "--config.heads.num_heads=2",
             "--config.decode.tree=chain:2")
  assert (c.train.steps, c.heads.num_heads, c.decode.tree) == (3, 2, "chain:2")
  assert c.model == "random-tiny"
  with pytest.raises(flags.IllegalFlagValueError, match=r"--config.train.steps=abc"):
    _parse("--config=configs/smollm2_medusa1.py", "--config.train.steps=abc")


@pytest.mark.parametrize("override,typo,fix", [("--config.trian.steps=3", "trian", "train"),
                                               ("--config.train.stpes=3", "stpes", "steps")])
def test_unknown_override_key_fails_clearly(override, typo, fix):
  with pytest.raises((KeyError, AttributeError), match=rf"{typo}[\s\S]*Did you mean \"{fix}\""):
    _parse("--config=configs/smollm2_medusa1.py", override)


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_unknown_variant_fails_clearly(path):
  with pytest.raises(flags.IllegalFlagValueError, match=r"Unknown variant 'bogus'.*\(known: "):
    _parse(f"--config={path}:bogus")
