"""Vanilla greedy decoding: medusa_jax vs transformers (PyTorch, fp32), same model, prompts and run.

  .venv/bin/python experiments/compare_hf.py --num_prompts 10 --max_new_tokens 128

Both decode the first turns of the bundled MT-Bench questions one at a time (batch 1), greedy, and
stop at exactly ``max_new_tokens`` (EOS is ignored on both sides so they do the same work). The
model is SmolLM2-135M-Instruct from the bundled GGUF file, dequantised to fp32 by each library.
Prints tokens/s of both and their ratio; torch is a test-only dependency (requirements-test.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from medusa_jax import bundled, convert, decode, hardware, runtime


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--num_prompts", type=int, default=10)
  ap.add_argument("--max_new_tokens", type=int, default=128)
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  ap.add_argument("--out", default=None, help="write the figures as JSON here")
  args = ap.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)

  cfg, base, tok = convert.load_model(bundled.SMOLLM2)
  cfg = cfg.replace(eos_ids=())  # decode exactly max_new_tokens, like HF with eos ignored
  params = {"base": jax.tree.map(jax.numpy.asarray, base)}
  prompts = [runtime.chat_prompt(tok, p["text"]) for p in runtime.read_jsonl_prompts("mt_bench", args.num_prompts)]
  path = bundled.smollm2_gguf_path()
  hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                            dtype=torch.float32).eval()

  dec = decode.Decoder(cfg, decode.Sampling(max_new_tokens=args.max_new_tokens))
  params = dec.prepare(params)  # once: the CPU kernel's packed copy of the backbone
  for p in prompts:  # compile every prompt bucket before timing
    dec.generate(params, [p])

  def ours(p):
    out, _ = dec.generate(params, [p])
    return len(out[0])

  def theirs(p):
    with torch.no_grad():
      ids = torch.tensor([p])
      out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                        min_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return out.shape[1] - ids.shape[1]

  theirs(prompts[0])  # warm-up
  totals = {"medusa_jax": [0, 0.0], "transformers": [0, 0.0]}
  for p in prompts:  # alternate prompt by prompt: machine noise hits both alike
    for name, fn in (("medusa_jax", ours), ("transformers", theirs)):
      t = time.perf_counter()
      n = fn(p)
      totals[name][0] += n
      totals[name][1] += time.perf_counter() - t
  rates = {k: n / s for k, (n, s) in totals.items()}
  ratio = rates["medusa_jax"] / rates["transformers"]
  print(f"{'':14}{'tokens':>8}{'seconds':>10}{'tok/s':>9}")
  for k, (n, s) in totals.items():
    print(f"{k:14}{n:8d}{s:10.2f}{rates[k]:9.1f}")
  print(f"medusa_jax / transformers: {ratio:.2f}x  ({args.num_prompts} MT-Bench prompts x {args.max_new_tokens} "
        f"tokens, greedy, fp32, batch 1, prefill included; {hardware.info()['cpu']})")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"tok_per_s": rates, "ratio": ratio, "totals": totals, "hardware": hardware.info(),
                 "num_prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens}, f, indent=1)


if __name__ == "__main__":
  main()
