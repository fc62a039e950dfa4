"""Shared fixtures: tiny random HF checkpoints, the bundled SmolLM2 and a tiny training run, each built once.

Fixtures
--------
``tiny_llama_dir(kind='llama', max_shard_size=None, seed=0, **hf_config_overrides) -> str``
    A factory (session-scoped, memoised on its arguments) that saves a tiny random
    ``LlamaForCausalLM`` (``kind='qwen2'``: ``Qwen2ForCausalLM``) with ``save_pretrained``
    (safetensors) and returns the directory. Weights are re-drawn with a large scale (and random
    norms and biases) so that a wrong layout or formula shows up far above the parity tolerances.
``tiny`` -> (cfg, params={'base': ...})
    The default tiny Llama (GQA, untied embeddings) loaded by ``convert.load_hf``.
``smollm2`` -> (cfg, params={'base': ...}, tokenizer)
    The bundled SmolLM2-135M-Instruct GGUF loaded by ``convert.load_model``.
``smollm2_hf``
    transformers' own fp32 load of the same GGUF file (torch, eval mode).
``smollm2_chat_prompt`` -> list[int]
    A real chat prompt built with the tokenizer's chat template.
``tiny_chat_dir``
    A tiny random Llama with SmolLM2's vocabulary and tokenizer, as an HF directory.
``projection_backend`` -> 'xla' | 'cpu_kernel'
    Runs a test once per projection backend (``medusa_jax.backends``); see the fixture.

Training (tests/test_train.py and tests/test_faults.py)
-------------------------------------------------------
``train_config(data_dir, name='smollm2_medusa1', **train)``
    A ``configs/NAME.py:tiny`` config on 64 ShareGPT conversations, metrics every step.
``data_dir``
    Its ShareGPT dataset, built once.
``run_a`` -> (config, workdir, return value, TensorBoard scalars)
    One uninterrupted run of ``train_config(data_dir)``, the reference of every interrupted one.
``tb_scalars(workdir)`` / ``without_timing(scalars)``
    The TensorBoard scalars of each run in a workdir; the same without the timing ones.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import pytest

# Small enough to compile in a second, large enough to exercise GQA (4 query heads, 2 kv heads).
TINY_HF = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
               tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
               eos_token_id=2)

CHAT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def _randomize(model, seed: int, scale: float = 0.2) -> None:
  """Re-draws every weight: HF's init (std 0.02, unit norms, zero biases) would hide layout bugs."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
      p.copy_(1.0 + 0.2 * noise if "norm" in name else scale * noise)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
  """Factory: ``make(kind='llama', max_shard_size=None, seed=0, **hf_config_overrides) -> dir``."""
  import transformers  # pylint: disable=g-import-not-at-top
  made: dict = {}

  def make(kind: str = "llama", max_shard_size=None, seed: int = 0, **overrides) -> str:
    key = repr((kind, max_shard_size, seed, sorted(overrides.items())))
    if key in made:
      return made[key]
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    hf_cfg = cls[0](**{**TINY_HF, **overrides})
    model = cls[1](hf_cfg)
    _randomize(model, seed)
    path = str(tmp_path_factory.mktemp(f"tiny_{kind}"))
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    made[key] = path
    return path

  return make


@pytest.fixture(scope="session")
def tiny(tiny_llama_dir):
  """(cfg, params) of the default tiny Llama, loaded through our converter."""
  from medusa_jax import convert  # pylint: disable=g-import-not-at-top
  cfg, base = convert.load_hf(tiny_llama_dir())
  return cfg, {"base": jax.tree.map(jnp.asarray, base)}


@pytest.fixture(scope="session")
def smollm2():
  """(cfg, params={'base': ...}, tokenizer) of the bundled SmolLM2-135M-Instruct (fp32)."""
  from medusa_jax import bundled, convert  # pylint: disable=g-import-not-at-top
  cfg, base, tok = convert.load_model(bundled.SMOLLM2)
  return cfg, {"base": jax.tree.map(jnp.asarray, base)}, tok


@pytest.fixture(scope="session")
def smollm2_hf():
  """transformers' own fp32 load of the bundled GGUF file: the reference for parity tests."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from medusa_jax import bundled  # pylint: disable=g-import-not-at-top
  transformers.utils.logging.set_verbosity_error()
  path = bundled.smollm2_gguf_path()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  return model.eval()


@pytest.fixture(scope="session")
def smollm2_chat_prompt(smollm2):
  """Token ids of a real chat prompt (system + user turn + assistant header)."""
  tok = smollm2[2]
  text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
  return [int(i) for i in tok.encode(text, add_special_tokens=False)]


@pytest.fixture(scope="session")
def tiny_chat_dir(tiny_llama_dir, tmp_path_factory):
  """A tiny random Llama with SmolLM2's vocabulary and tokenizer (chat template), as an HF dir."""
  from medusa_jax import bundled  # pylint: disable=g-import-not-at-top
  src = tiny_llama_dir(vocab_size=49152, max_position_embeddings=2048)
  path = str(tmp_path_factory.mktemp("tiny_chat") / "model")
  shutil.copytree(src, path)
  bundled.smollm2_tokenizer().save_pretrained(path)
  return path


@pytest.fixture(params=["xla", "cpu_kernel"])
def projection_backend(request, monkeypatch):
  """The projection backend a test's decoders use: ``xla``, XLA's dots alone, or ``cpu_kernel``, the
  CPU decode kernel taking every projection of up to 128 rows, whatever crossover this machine
  measured (skipped where it is not used: no C++ compiler, not one CPU device, turned off).

  The decoding equivalence tests run under both: what they pin must not depend on which backend
  computed the projections. ``Decoder.prepare`` picks the backend, so a test under this fixture
  makes (and prepares) its decoders itself, and only float32 models reach the kernel.
  """
  from medusa_jax.backends.cpu import kernel  # pylint: disable=g-import-not-at-top
  if request.param == "xla":
    monkeypatch.setenv(kernel.ENV, "0")
  elif not kernel.enabled():
    pytest.skip("the CPU decode kernel is not used here: not one CPU device, turned off, or it did not build "
                "(see the warning logged)")
  else:
    monkeypatch.setenv(kernel.ROWS_ENV, str(max(kernel.TUNE_ROWS)))
  return request.param


# ----------------------------------------------------------------------------------------------
# Training: the shared tiny run
# ----------------------------------------------------------------------------------------------

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TRAIN_STEPS = 12  # of the shared run
DRAFT_VOCAB = 256


def load_config(name: str, variant: str | None = "tiny"):
  """``configs/NAME.py:VARIANT``, loaded by path as the CLIs load it."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def train_config(data_dir: str, name: str = "smollm2_medusa1", **train):
  """A tiny config on 64 ShareGPT conversations (a fifth held out, so evaluation has batches)."""
  c = load_config(name)
  c.data.source = "sharegpt"
  c.data.max_examples = 64
  c.data.heldout_fraction = 0.2
  c.data.data_dir = data_dir
  c.heads.draft_vocab = DRAFT_VOCAB
  # The backbone's forward every step (the reference; tests/test_train.py checks cache_hidden against it).
  c.train.update(dict(steps=TRAIN_STEPS, lr=0.1, log_every=1, eval_every=1, eval_batches=1, checkpoint_every=4,
                      keep_checkpoints=3, cache_hidden=False))
  c.train.update(train)
  return c


def tiny_train_parts(data_dir: str):
  """``train_config``'s model with random heads, split for training as the trainer splits it:
  (config, model config, heads config, params, optim.Split, trainer.StepConfig)."""
  from medusa_jax import convert, heads as heads_lib, optim, runtime, trainer  # pylint: disable=g-import-not-at-top
  c = train_config(data_dir)
  cfg, base, _ = convert.load_model(c.model)
  hcfg = heads_lib.config_from(c)
  base = jax.tree.map(jnp.asarray, base)
  params = {"base": base, "medusa": runtime.random_heads(hcfg, cfg, base)}
  return c, cfg, hcfg, params, optim.split_for_training(c.train, params), trainer.step_config(c, cfg, hcfg)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The ShareGPT dataset of ``train_config``, built once (training reuses it: same name and settings)."""
  from medusa_jax import convert, data, train_data  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("train_data"))
  c = train_config(path)
  _, _, tok = convert.load_model(c.model)
  data.prepare_sharegpt(path, tok, max_len=c.data.max_len, max_examples=c.data.max_examples,
                        heldout_fraction=c.data.heldout_fraction, name=train_data.dataset_name(c))
  return path


def tb_scalars(workdir: str) -> list[dict]:
  """TensorBoard scalars {(tag, step): value}, one dict per event file, oldest run first.

  TensorBoard itself is not installed: the files are TFRecords (u64 length, u32 crc, an ``Event``
  proto, u32 crc) of tensorboardX's own protos.
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  runs = []
  for path in glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*")):
    with open(path, "rb") as f:
      buf = f.read()
    i, events = 0, []
    while i < len(buf):
      (n,) = struct.unpack("<Q", buf[i:i + 8])
      events.append(event_pb2.Event.FromString(buf[i + 12:i + 12 + n]))
      i += 12 + n + 4
    runs.append((events[0].wall_time, {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value}))
  return [s for _, s in sorted(runs, key=lambda r: r[0])]


def without_timing(scalars: dict) -> dict:
  return {k: v for k, v in scalars.items() if k[0] != "train/steps_per_s"}


@pytest.fixture(scope="session")
def run_a(data_dir, tmp_path_factory):
  """The shared uninterrupted Medusa-1 run: (config, workdir, return value, TensorBoard scalars)."""
  from medusa_jax import trainer  # pylint: disable=g-import-not-at-top
  c = train_config(data_dir)
  workdir = str(tmp_path_factory.mktemp("run_a"))
  out = trainer.train_and_evaluate(c, workdir)
  (scalars,) = tb_scalars(workdir)
  return c, workdir, out, scalars
