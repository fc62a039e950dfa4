r"""Self-distillation: the backbone answers ShareGPT prompts, and the heads train on its own replies.

  python -m medusa_jax.distill --config configs/smollm2.py [--workdir runs/distill/NAME]
  python -m medusa_jax.distill --config configs/smollm2.py --config.distill.num_prompts=4096 \
      --config.distill.temperature=0.3

Heads trained on another model's text learn to predict that model, not ours (the Medusa paper,
"Self-distillation"). So the backbone replies to the first user turn of ShareGPT conversations
itself, and the dataset is those one-turn conversations. Only conversations in the *train* split
(``data.is_heldout`` is False) are answered: heldout ids are left for calibration and evaluation.
MT-Bench is never read here.

Replies are appended to ``WORKDIR/replies.jsonl`` one batch at a time, one ShareGPT-style record
per line (``{"id", "conversations": [{"from": "human", ...}, {"from": "gpt", ...}], "seconds"}``,
the last its share of its batch's wall time, which ``generation_seconds`` sums), so a killed run
resumes where it stopped; raising ``num_prompts`` later reuses every reply already there. The
replies are then materialised as a TFDS dataset under ``config.data.data_dir``, named by
``prompts.distilled_dataset_name(config)``: what ``train.py`` reads when ``config.data.source='distilled'``.

Interruptions: SIGTERM or SIGINT lets the batch in progress finish and reach the disk (flushed and
fsynced), logs a line and exits 0 without building the dataset; a kill -9 can cut the last record
short, and ``read_replies`` drops such a line. Either way the same command resumes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Sequence

from absl import flags
import jax
from tqdm import tqdm

from medusa_jax import data
from medusa_jax import decode
from medusa_jax import entry
from medusa_jax import preemption
from medusa_jax import prompts as prompts_lib
from medusa_jax import runtime

_log = logging.getLogger("medusa_jax.distill")  # not __name__: that is __main__ under -m

REPLIES_FILE = "replies.jsonl"
SETTINGS_FILE = "settings.json"


def default_workdir(config) -> str:
  """Where the replies go by default; shared by every ``num_prompts`` of the same settings."""
  return os.path.join("runs", "distill", prompts_lib.settings_tag(config))


# ----------------------------------------------------------------------------------------------
# The replies file
# ----------------------------------------------------------------------------------------------

def _parse_replies(text: str) -> tuple[dict[str, dict], int]:
  """``({id: record}, number of broken lines)`` of a replies file's text."""
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
  return records, bad


def read_replies(path: str) -> dict[str, dict]:
  """``{id: record}`` of a replies file; a line cut short by a kill is dropped.

  If the file had such a line (or lacks its final newline), it is rewritten with the whole records
  only, so the next append starts on a fresh line.
  """
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    text = f.read()
  records, bad = _parse_replies(text)
  if bad or (text and not text.endswith("\n")):
    _log.warning("%s: dropping %d incomplete line(s) left by an interrupted run.", path, bad)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records.values())
    os.replace(tmp, path)
  return records


def generation_seconds(out_dir: str, ids) -> float | None:
  """Wall seconds the generation of these replies took (each record's share of its batch), or
  None when a reply is missing or was written before replies recorded it."""
  path = os.path.join(out_dir, REPLIES_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:  # read only: a distillation may be appending to it
    replies, _ = _parse_replies(f.read())
  total = 0.0
  for i in ids:
    rec = replies.get(i.decode() if isinstance(i, bytes) else str(i))  # dataset ids are bytes
    if rec is None or "seconds" not in rec:
      return None
    total += float(rec["seconds"])
  return total


def _check_settings(out_dir: str, config) -> None:
  """Refuses to extend a replies file written with other settings (its replies would be mixed)."""
  settings = {"tag": prompts_lib.settings_tag(config), "model": config.model}
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

def generate_replies(config, loaded: runtime.Loaded, prompts: Sequence[prompts_lib.Prompt], out_dir: str) -> dict:
  """Answers the prompts not yet in ``out_dir/replies.jsonl``, appending a batch at a time.

  A SIGTERM or SIGINT stops it after the batch in progress is on disk. Returns ``{'prompts',
  'new', 'tokens', 'seconds', 'stopped'}`` for this run (``stopped``: the signal's name, or None).
  """
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
  t0 = last = time.perf_counter()
  with preemption.StopSignals() as stop, open(path, "a", encoding="utf-8") as f:
    dparams = decoder.prepare(loaded.params)
    for idx, outs in decode.batched_generate(decoder, dparams, [p.tokens for p in todo], int(d.batch_size), rng):
      now = time.perf_counter()
      share, last = (now - last) / max(len(idx), 1), now
      for i, toks in zip(idx, outs):
        p = todo[i]
        rec = {"id": p.id, "conversations": [
            {"from": "human", "value": p.text},
            {"from": "gpt", "value": decode.reply_text(loaded.tokenizer, toks, eos)}],
               "seconds": round(share, 4)}
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
  name = prompts_lib.distilled_dataset_name(config)
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
  prompts = prompts_lib.select_prompts(config, loaded.tokenizer, sharegpt_path)
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
  # Deferred: importing cli defines --config, which train.py defines too (tests import both).
  from medusa_jax import cli  # pylint: disable=g-import-not-at-top
  runtime.quiet_jax_logs()
  # Our own progress lines stay on (quiet_jax_logs lowers absl's verbosity for the libraries).
  logging.getLogger("medusa_jax").setLevel(logging.INFO)
  config = cli.config()
  if config.data.source != "distilled":
    print(f"data.source is {config.data.source!r}: this recipe trains on ShareGPT's own replies, nothing to distil.")
    return
  loaded = runtime.load(config)
  out_dir = flags.FLAGS.workdir or default_workdir(config)
  name = distill(config, loaded, out_dir)
  if name is None:  # stopped by a signal: the line above says how far it got
    return
  print(f"dataset {name} in {config.data.data_dir} (replies in {out_dir})")


def run_cli():
  """The command (`python -m medusa_jax.distill`, the `medusa-distill` script).

  Flags are defined only when run as a program: tests import this module beside train.py, and a
  second --workdir (or --config) definition would be a DuplicateFlagError there.
  """
  from medusa_jax import cli  # pylint: disable=g-import-not-at-top,unused-import  (defines --config)
  flags.DEFINE_string("workdir", None, "Where replies.jsonl is written and resumed from "
                      "(default runs/distill/<settings>).")
  entry.run(main)


if __name__ == "__main__":
  run_cli()
