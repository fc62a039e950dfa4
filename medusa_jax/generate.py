r"""Chat with a model from the command line, streaming the reply (vanilla or Medusa decoding).

  python -m medusa_jax.generate --config configs/smollm2.py --prompt "Why is the sky blue?"
  python -m medusa_jax.generate --config configs/smollm2.py --mode medusa --checkpoint runs/m1/export \
      --tree runs/m1/tree.json --prompt "..."
"""

from __future__ import annotations

import sys
import time

from absl import flags

from medusa_jax import cli
from medusa_jax import entry

_PROMPT = flags.DEFINE_string("prompt", None, "The user message to answer.")


def main(argv):
  del argv
  if not _PROMPT.value:
    raise ValueError('--prompt is required: the message to answer, e.g. --prompt "Why is the sky blue?".')
  config = cli.config()
  if config.decode.mode == "medusa":
    cli.check_medusa(config)
  # JAX and the model's libraries load only now (seconds): a mistake above, or --help, costs none of it.
  import jax  # pylint: disable=g-import-not-at-top
  from medusa_jax import decode, medusa, runtime  # pylint: disable=g-import-not-at-top
  runtime.quiet_jax_logs()
  loaded = runtime.load(config, heads=cli.HEADS.value, checkpoint=cli.CHECKPOINT.value)
  spec = medusa.spec_from(config, loaded.heads) if config.decode.mode == "medusa" else None
  decoder = medusa.make_decoder(loaded.cfg, decode.sampling_from(config), spec)
  prompt = runtime.chat_prompt(loaded.tokenizer, _PROMPT.value)
  shown, tokens = "", []
  t0 = time.perf_counter()
  steps = 0
  for new in decoder.stream(loaded.params, [prompt], jax.random.PRNGKey(config.seed)):
    tokens += new[0]
    steps += 1
    text = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
      sys.stdout.write(text[len(shown):])
      sys.stdout.flush()
      shown = text
  dt = time.perf_counter() - t0
  sys.stdout.write("\n")
  print(f"[{len(tokens)} tokens, {steps - 1} decoding steps, {dt:.2f} s incl. compilation; "
        f"mode={config.decode.mode}]", file=sys.stderr)


def run_cli():
  """The console script (`medusa-generate`): `main` with one-line errors."""
  entry.run(main)


if __name__ == "__main__":
  run_cli()
