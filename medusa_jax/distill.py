"""Self-distillation: the backbone answers ShareGPT prompts, and the heads train on its own replies.

  python -m medusa_jax.distill --config configs/smollm2.py [--workdir runs/distill/NAME]
  python -m medusa_jax.distill --config configs/smollm2.py --config.distill.num_prompts=4096 \
      --config.distill.temperature=0.3

Heads trained on another model's text learn to predict that model, not ours (the Medusa paper,
"Self-distillation"). So the backbone replies to the first user turn of ShareGPT conversations
itself, and the dataset is those one-turn conversations. Only conversations in the *train* split
(``data.is_heldout`` is False) are answered: heldout ids are left for calibration and evaluation.
MT-Bench is never read here.

Replies are appended to ``WORKDIR/replies.jsonl`` one batch at a time, one ShareGPT-style record
per line (``{"id", "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}``), so a killed
run resumes where it stopped; raising ``num_prompts`` later reuses every reply already there. The
replies are then materialised as a TFDS dataset named by ``dataset_name(config)`` under
``config.data.data_dir``, which is what ``train.py`` reads when ``config.data.source='distilled'``.

Interruptions: SIGTERM or SIGINT lets the batch in progress finish and reach the disk (flushed and
fsynced), logs a line and exits 0 without building the dataset; a kill -9 can cut the last record
short, and ``read_replies`` drops such a line. Either way the same command resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import re
import time
from typing import Iterator, Sequence

from absl import flags
import jax

from medusa_jax import bundled
from medusa_jax import data
from medusa_jax import decode
from medusa_jax import preemption
from medusa_jax import runtime

_log = logging.getLogger("medusa_jax.distill")  # not __name__: that is __main__ under -m

REPLIES_FILE = "replies.jsonl"
SETTINGS_FILE = "settings.json"


@dataclasses.dataclass(frozen=True)
class Prompt:
  id: str
  text: str
  tokens: tuple[int, ...]  # rendered with the chat template, generation prompt included


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------

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


def dataset_name(config) -> str:
  """The TFDS dataset name of a distillation run, e.g.
  ``distill_smollm2_135m_instruct_t0_g256_p256_h0p02_n1024_l512``.

  It encodes the settings tag (model, temperature, max_new_tokens, max_prompt_len, heldout
  fraction, seed when sampling), ``num_prompts`` and ``config.data.max_len``, so runs with other
  settings never collide (``data.build_dataset`` refuses a name built with other settings).
  """
  return (f"distill_{settings_tag(config)}_n{int(config.distill.num_prompts)}"
          f"e{int(config.distill.num_eval_prompts)}_l{int(config.data.max_len)}")


def default_workdir(config) -> str:
  """Where the replies go by default; shared by every ``num_prompts`` of the same settings."""
  return os.path.join("runs", "distill", settings_tag(config))


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------

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
  for record in data.iter_sharegpt(path or bundled.sharegpt_path()):
    cid = record["id"]
    if cid in seen or data.is_heldout(cid, heldout_fraction) != (split == "heldout"):
      continue
    seen.add(cid)
    text = data.first_user_prompt(record)
    if text is None:
      continue
    tokens = runtime.chat_prompt(tokenizer, text)
    if len(tokens) > max_prompt_len:
      continue
    yield Prompt(cid, text, tuple(tokens))


# ----------------------------------------------------------------------------------------------
# Batched generation
# ----------------------------------------------------------------------------------------------

def batched_generate(decoder: decode.Decoder, params, prompts: Sequence[Sequence[int]], batch_size: int,
                     rng) -> Iterator[tuple[list[int], list[list[int]]]]:
  """Generates for all prompts, shortest first; yields ``(indices into prompts, outputs)`` per batch.

  Sorting by length keeps the padding within a batch small and the number of prompt-length
  buckets (compilations) low. A short last batch is filled up with copies of its last prompt, so
  every batch has the same shape and the loop is not compiled again for one odd size.
  """
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  for n, start in enumerate(range(0, len(order), batch_size)):
    idx = order[start:start + batch_size]
    batch = [list(prompts[i]) for i in idx]
    batch += [batch[-1]] * (batch_size - len(batch))
    outs, _ = decoder.generate(params, batch, jax.random.fold_in(rng, n))
    yield idx, outs[:len(idx)]


def reply_text(tokenizer, tokens: Sequence[int], eos_ids: Sequence[int]) -> str:
  """The decoded reply, without its end token (the chat template adds its own when rendering)."""
  tokens = list(tokens)
  if tokens and tokens[-1] in eos_ids:
    tokens = tokens[:-1]
  return tokenizer.decode(tokens, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------
# The replies file
# ----------------------------------------------------------------------------------------------

def read_replies(path: str) -> dict[str, dict]:
  """``{id: record}`` of a replies file; a line cut short by a kill is dropped.

  If the file had such a line (or lacks its final newline), it is rewritten with the whole records
  only, so the next append starts on a fresh line.
  """
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    text = f.read()
  records, bad = {}, 0
  # Records end at "\n" only: str.splitlines() would also cut a reply at U+2028, \x1c, \x85 ...
  # (JSON leaves them unescaped with ensure_ascii=False) and drop it as a broken line.
  for line in text.split("\n"):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
      records[str(rec["id"])] = rec
    except (json.JSONDecodeError, KeyError, TypeError):
      bad += 1
  if bad or (text and not text.endswith("\n")):
    _log.warning("%s: dropping %d incomplete line(s) left by an interrupted run.", path, bad)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records.values())
    os.replace(tmp, path)
  return records


def _check_settings(out_dir: str, config) -> None:
  """Refuses to extend a replies file written with other settings (its replies would be mixed)."""
  settings = {"tag": settings_tag(config), "model": config.model}
  path = os.path.join(out_dir, SETTINGS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      found = json.load(f)
    if found != settings:
      raise ValueError(f"{out_dir} holds replies made with {found}, not {settings}: use another --workdir.")
    return
  with open(path, "w") as f:
    json.dump(settings, f, indent=1)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

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


def generate_replies(config, loaded: runtime.Loaded, prompts: Sequence[Prompt], out_dir: str) -> dict:
  """Answers the prompts not yet in ``out_dir/replies.jsonl``, appending a batch at a time.

  A SIGTERM or SIGINT stops it after the batch in progress is on disk. Returns ``{'prompts',
  'new', 'tokens', 'seconds', 'stopped'}`` for this run (``stopped``: the signal's name, or None).
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  d = config.distill
  path = os.path.join(out_dir, REPLIES_FILE)
  done = read_replies(path)
  todo = [p for p in prompts if p.id not in done]
  stats = {"prompts": len(prompts), "new": len(todo), "tokens": 0, "seconds": 0.0, "stopped": None}
  if not todo:
    return stats
  sampling = decode.Sampling(temperature=float(d.temperature), max_new_tokens=int(d.max_new_tokens))
  decoder = decode.Decoder(loaded.cfg, sampling)
  eos = loaded.cfg.eos_ids
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), len(done))
  bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="distill", unit=" prompt")
  t0 = time.perf_counter()
  with preemption.StopSignals() as stop, open(path, "a", encoding="utf-8") as f:
    dparams = decoder.prepare(loaded.params)
    for idx, outs in batched_generate(decoder, dparams, [p.tokens for p in todo], int(d.batch_size), rng):
      for i, toks in zip(idx, outs):
        p = todo[i]
        rec = {"id": p.id, "conversations": [
            {"from": "human", "value": p.text},
            {"from": "gpt", "value": reply_text(loaded.tokenizer, toks, eos)}]}
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        stats["tokens"] += len(toks)
      # A batch is minutes of work on a CPU: make it durable before starting the next one.
      f.flush()
      os.fsync(f.fileno())
      stats["seconds"] = time.perf_counter() - t0
      bar.update(len(idx))
      bar.set_postfix(tok_s=f"{stats['tokens'] / stats['seconds']:.1f}")
      if stop.received:
        stats["stopped"] = stop.received
        break
  bar.close()
  return stats


def distill(config, loaded: runtime.Loaded, out_dir: str, *, sharegpt_path: str | None = None) -> str | None:
  """Generates the replies (resuming), builds the TFDS dataset and returns its name.

  Stopped by SIGTERM / SIGINT, it logs how far it got and returns None (no dataset yet).

  Args:
    config: a ConfigDict; reads ``config.distill``, ``config.data`` (data_dir, max_len,
      heldout_fraction), ``config.model`` and ``config.seed``.
    loaded: ``runtime.load(config)``: the backbone and its tokenizer (the heads are not used).
    out_dir: where ``replies.jsonl`` lives (see ``default_workdir``).
    sharegpt_path: a ShareGPT JSON file; the bundled ShareGPT V3 by default.
  """
  name = dataset_name(config)
  dc = config.data

  def build(conversations):
    return data.build_dataset(dc.data_dir, conversations, loaded.tokenizer, name=name, max_len=int(dc.max_len),
                              heldout_fraction=float(dc.heldout_fraction), progress_desc="")

  try:
    data.dataset_metadata(dc.data_dir, name)
    built = True
  except FileNotFoundError:
    built = False
  if built:
    build([])  # only checks that it was built with the same settings
    _log.info("Dataset %s already built under %s.", name, dc.data_dir)
    return name
  if loaded.tokenizer is None:
    raise ValueError(f"Model {config.model!r} has no tokenizer: distillation needs its chat template.")
  os.makedirs(out_dir, exist_ok=True)
  _check_settings(out_dir, config)
  prompts = select_prompts(config, loaded.tokenizer, sharegpt_path)
  if not prompts:
    raise ValueError("No ShareGPT prompts to distill: raise config.distill.max_prompt_len?")
  stats = generate_replies(config, loaded, prompts, out_dir)
  replies = read_replies(os.path.join(out_dir, REPLIES_FILE))
  if stats["stopped"]:
    _log.warning("Stopped by %s: %d of %d replies are on disk in %s; run the same command again to resume.",
                 stats["stopped"], sum(p.id in replies for p in prompts), len(prompts), out_dir)
    return None
  conversations = [replies[p.id] for p in prompts]
  build(conversations)
  rate = stats["tokens"] / stats["seconds"] if stats["seconds"] else float("nan")
  _log.info("Distilled %d prompts (%d new): %d new tokens in %.1f s, %.1f tok/s; dataset %s in %s.",
            stats["prompts"], stats["new"], stats["tokens"], stats["seconds"], rate, name, dc.data_dir)
  return name


def main(argv):
  del argv
  from medusa_jax import cli  # pylint: disable=g-import-not-at-top
  runtime.quiet_jax_logs()
  # Our own progress lines stay on (quiet_jax_logs lowers absl's verbosity for the libraries).
  logging.getLogger("medusa_jax").setLevel(logging.INFO)
  config = cli.config()
  loaded = runtime.load(config)
  out_dir = flags.FLAGS.workdir or default_workdir(config)
  name = distill(config, loaded, out_dir)
  if name is None:  # stopped by a signal: the line above says how far it got
    return
  print(f"dataset {name} in {config.data.data_dir} (replies in {out_dir})")


if __name__ == "__main__":
  # Flags are defined only when run as a program: train.py imports this module for dataset_name(),
  # and a second --workdir (or --config) definition would be a DuplicateFlagError there.
  from medusa_jax import cli  # pylint: disable=g-import-not-at-top,unused-import  (defines --config)
  flags.DEFINE_string("workdir", None, "Where replies.jsonl is written and resumed from "
                      "(default runs/distill/<settings>).")
  from medusa_jax import entry  # pylint: disable=g-import-not-at-top
  entry.run(main)
