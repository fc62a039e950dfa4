"""Prompts: ShareGPT first turns by split, the ones self-distillation answers, and its dataset's name.

``sharegpt_prompts`` yields the first user turn of each ShareGPT conversation in one split (train or
heldout, by ``data.is_heldout``), rendered with the chat template. Self-distillation answers
``select_prompts(config, ...)`` (train split, plus a few heldout ones for the eval loss only);
calibration reads heldout prompts from the start of the split; benchmarks read
``heldout_eval_prompts``, past the first ``HELDOUT_RESERVED``, which nothing tunes on.

``distilled_dataset_name(config)`` names the TFDS dataset the replies become: it encodes every
setting that decides which prompts are answered and how (``settings_tag``), so training finds the
dataset of its config without running distillation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
import re
from typing import Iterator

from medusa_jax import bundled
from medusa_jax import chat
from medusa_jax import data
from medusa_jax import runtime
from medusa_jax import sharegpt

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Prompt:
  id: str
  text: str
  tokens: tuple[int, ...]  # rendered with the chat template, generation prompt included


# Held-out prompts [0, HELDOUT_RESERVED) may be used for calibration and the eval loss; benchmark
# prompts "nobody tunes on" come after them.
HELDOUT_RESERVED = 64


def _model_tag(spec: str) -> str:
  """A filesystem-safe short name for ``config.model``."""
  if spec == bundled.SMOLLM2:
    return re.sub(r"[^a-z0-9]+", "_", spec.lower())
  stem = os.path.basename(os.path.normpath(spec))
  stem = re.sub(r"\.gguf$", "", stem, flags=re.I)
  stem = re.sub(r"[^a-z0-9]+", "_", stem.lower()).strip("_")[:32] or "model"
  # Two checkpoints are often both called 'export' or 'hf': the hash of the spec tells them apart.
  return f"{stem}_{hashlib.sha256(spec.encode('utf-8')).hexdigest()[:6]}"


def _number(x: float) -> str:
  return f"{float(x):g}".replace(".", "p").replace("-", "m")


def settings_tag(config) -> str:
  """Everything that decides a reply: model, prompt filter, length, temperature (and seed if > 0).

  ``num_prompts`` is left out: a larger run extends a smaller one with the same replies.
  """
  d = config.distill
  tag = (f"{_model_tag(config.model)}_t{_number(d.temperature)}_g{int(d.max_new_tokens)}"
         f"_p{int(d.max_prompt_len)}_h{_number(config.data.heldout_fraction)}")
  if float(d.temperature) > 0:
    tag += f"_s{int(config.seed)}"
  return tag


def distilled_dataset_name(config) -> str:
  """The TFDS dataset name of a distillation run, e.g.
  ``distill_smollm2_135m_instruct_t0_g256_p256_h0p02_n1024e32_l512``.

  It encodes the settings tag (model, temperature, max_new_tokens, max_prompt_len, heldout
  fraction, seed when sampling), ``num_prompts`` and ``config.data.max_len``, so runs with other
  settings never collide (``data.build_dataset`` refuses a name built with other settings).
  """
  return (f"distill_{settings_tag(config)}_n{int(config.distill.num_prompts)}"
          f"e{int(config.distill.num_eval_prompts)}_l{int(config.data.max_len)}")


def sharegpt_prompts(tokenizer, *, split: str, heldout_fraction: float, max_prompt_len: int,
                     path: str | None = None) -> Iterator[Prompt]:
  """First user turns of the ShareGPT conversations in one split, in file order.

  Args:
    tokenizer: renders each prompt with its chat template (``runtime.chat_prompt``).
    split: 'train' (distillation) or 'heldout' (calibration), by ``data.is_heldout``.
    heldout_fraction: ``config.data.heldout_fraction``.
    max_prompt_len: prompts longer than this many tokens, template included, are skipped.
    path: a ShareGPT JSON file; the bundled ShareGPT V3 by default.
  """
  if split not in ("train", "heldout"):
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
  seen = set()
  for record in sharegpt.iter_sharegpt(path or bundled.sharegpt_path()):
    cid = record["id"]
    if cid in seen or data.is_heldout(cid, heldout_fraction) != (split == "heldout"):
      continue
    seen.add(cid)
    text = chat.first_user_prompt(record)
    if text is None:
      continue
    tokens = runtime.chat_prompt(tokenizer, text)
    if len(tokens) > max_prompt_len:
      continue
    yield Prompt(cid, text, tuple(tokens))


def select_prompts(config, tokenizer, path: str | None = None) -> list[Prompt]:
  """``num_prompts`` train-split prompts, plus ``num_eval_prompts`` held-out ones.

  The held-out replies land in the dataset's heldout split (same id rule) and serve only for the
  eval loss during training; nothing is trained or tuned on them.
  """
  d = config.distill
  prompts = list(itertools.islice(
      sharegpt_prompts(tokenizer, split="train", heldout_fraction=config.data.heldout_fraction,
                       max_prompt_len=int(d.max_prompt_len), path=path), int(d.num_prompts)))
  if len(prompts) < d.num_prompts:
    _log.warning("Only %d train-split ShareGPT prompts of at most %d tokens exist; asked for %d.",
                 len(prompts), d.max_prompt_len, d.num_prompts)
  if d.num_eval_prompts:
    prompts += list(itertools.islice(
        sharegpt_prompts(tokenizer, split="heldout", heldout_fraction=config.data.heldout_fraction,
                         max_prompt_len=int(d.max_prompt_len), path=path), int(d.num_eval_prompts)))
  return prompts


def heldout_eval_prompts(config, tokenizer, num: int, path: str | None = None) -> list[Prompt]:
  """Held-out prompts that nothing tunes on: past the ones calibration may read (HELDOUT_RESERVED)."""
  return list(itertools.islice(
      sharegpt_prompts(tokenizer, split="heldout", heldout_fraction=config.data.heldout_fraction,
                       max_prompt_len=int(config.distill.max_prompt_len), path=path),
      HELDOUT_RESERVED, HELDOUT_RESERVED + num))
