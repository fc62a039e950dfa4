"""medusa_jax against llama.cpp on the same prompts, weights and machine, in one run.

  .venv/bin/pip install llama-cpp-python==0.3.36   # optional, test-only (it compiles llama.cpp: minutes)
  .venv/bin/python experiments/compare_llamacpp.py --num_prompts 10 --max_new_tokens 128 \
      [--checkpoint runs/smollm2_medusa1/export --tree runs/smollm2_medusa1/tree.json]

The bundled SmolLM2 GGUF is Q4_1; both sides here run its weights dequantised to float32 (llama.cpp
from an F32 GGUF this script writes once under runs/llamacpp/, with the original file's metadata
and tokenizer), greedy, batch 1, the same chat-templated prompt tokens, exactly ``--max_new_tokens``
tokens (end tokens ignored). Decode speed excludes the prompt: llama.cpp's prompt evaluation is
timed alone (one token generated) and taken off. The prompts alternate between the two decoders.
llama.cpp runs in a child process, so a crash there (its Q4_1 path has crashed on one Intel Xeon)
is reported as a skipped row, not a lost run. Without llama-cpp-python the comparison is skipped
with a message and exit status 0.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

import numpy as np


def f32_gguf(src: str, dst: str) -> str:
  """A copy of the GGUF file ``src`` with every tensor dequantised to float32 (same metadata)."""
  if os.path.exists(dst):
    return dst
  import gguf  # pylint: disable=g-import-not-at-top
  reader = gguf.GGUFReader(src)
  arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
  writer = gguf.GGUFWriter(dst + ".tmp", arch)
  for name, field in reader.fields.items():
    if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
      continue
    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.ARRAY:
      sub = field.types[-1]
      vals = [field.parts[i] for i in field.data]
      vals = [str(bytes(v), "utf-8") if sub == gguf.GGUFValueType.STRING else v.tolist()[0] for v in vals]
      writer.add_array(name, vals)
    elif vtype == gguf.GGUFValueType.STRING:
      writer.add_string(name, str(bytes(field.parts[-1]), "utf-8"))
    else:
      writer.add_key_value(name, field.parts[-1].tolist()[0], vtype)
  writer.add_file_type(gguf.LlamaFileType.ALL_F32)
  for t in reader.tensors:
    data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    writer.add_tensor(t.name, data.reshape([int(d) for d in reversed(t.shape)]))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  os.replace(dst + ".tmp", dst)
  return dst


def _llamacpp_worker(path: str, prompts: list[list[int]], max_new: int, threads: int, conn) -> None:
  try:
    from llama_cpp import Llama  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    conn.send({"error": f"llama-cpp-python is not installed ({e}); pip install llama-cpp-python to compare"})
    return
  llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_batch=512, verbose=False, logits_all=False)
  conn.send({"ready": True})
  while True:
    i = conn.recv()
    if i is None:
      return
    tokens = prompts[i]
    out = {}
    for n, key in ((1, "prefill"), (max_new, "total")):
      llm.reset()
      t = time.perf_counter()
      gen = []
      for tok in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, reset=True):
        gen.append(int(tok))
        if len(gen) >= n:
          break
      out[key] = time.perf_counter() - t
      out["tokens"] = gen
    conn.send(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--num_prompts", type=int, default=10)
  ap.add_argument("--max_new_tokens", type=int, default=128)
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  ap.add_argument("--checkpoint", default=None, help="also Medusa with these heads (and --tree)")
  ap.add_argument("--tree", default=None)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  from medusa_jax import bundled, config as config_lib, decode, hardware, medusa, runtime  # pylint: disable=g-import-not-at-top
  from medusa_jax import tree as tree_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.default_config()
  loaded = runtime.load(config, checkpoint=args.checkpoint)
  cfg = loaded.cfg.replace(eos_ids=())  # exactly max_new_tokens, as llama.cpp is asked for
  prompts = [runtime.chat_prompt(loaded.tokenizer, p["text"]) for p in runtime.read_jsonl_prompts("mt_bench", args.num_prompts)]
  sampling = decode.Sampling(max_new_tokens=args.max_new_tokens)
  ours = {"medusa_jax vanilla": decode.Decoder(cfg, sampling)}
  if args.checkpoint:
    spec = medusa.MedusaSpec(heads=loaded.heads, tree=tree_lib.resolve(args.tree or "chain:3", num_heads=loaded.heads.num_heads))
    ours["medusa_jax medusa"] = medusa.make_decoder(cfg, sampling, spec)
  dps, shared = {}, loaded.params
  for k, d in ours.items():
    dps[k] = shared = d.prepare(shared)
    for p in prompts:  # compile every prompt bucket before timing
      d.generate(dps[k], [p])

  os.makedirs(os.path.join("runs", "llamacpp"), exist_ok=True)
  path = f32_gguf(bundled.smollm2_gguf_path(), os.path.join("runs", "llamacpp", "smollm2-135m-instruct-f32.gguf"))
  ctx = mp.get_context("spawn")
  parent, child = ctx.Pipe()
  proc = ctx.Process(target=_llamacpp_worker, args=(path, prompts, args.max_new_tokens, args.threads, child))
  proc.start()
  try:
    msg = parent.recv() if parent.poll(600) else {"error": "llama.cpp did not start within 10 minutes"}
  except EOFError:  # the child died while loading the model
    msg = {"error": f"llama.cpp crashed while loading (exit status {proc.join(30) or proc.exitcode})"}
  skipped = msg.get("error")

  rates = {k: [0, 0.0] for k in ours}
  outputs = {k: [] for k in ours}
  if not skipped:
    rates["llama.cpp F32"] = [0, 0.0]
    parent.send(0)  # warm-up
    parent.recv()
  for i, p in enumerate(prompts):
    for k, d in ours.items():
      state = jax.block_until_ready(d.start(dps[k], [p]))
      t = time.perf_counter()
      state = jax.block_until_ready(d.finish(dps[k], state))
      rates[k][1] += time.perf_counter() - t
      outputs[k].append(decode.outputs(state)[0])
      rates[k][0] += len(outputs[k][-1]) - 1
    if not skipped:
      parent.send(i)
      try:
        r = parent.recv() if parent.poll(600) else None
      except EOFError:
        r = None
      if r is None:  # no partial llama.cpp row: its rate would cover fewer prompts than ours
        skipped = "llama.cpp stopped answering" if proc.is_alive() else f"llama.cpp crashed (exit status {proc.exitcode})"
        rates.pop("llama.cpp F32")
        break
      rates["llama.cpp F32"][0] += len(r["tokens"]) - 1
      outputs.setdefault("llama.cpp F32", []).append(r["tokens"])
      rates["llama.cpp F32"][1] += r["total"] - r["prefill"]
  if proc.is_alive():
    try:
      parent.send(None)
    except (BrokenPipeError, OSError):
      pass
    proc.join(30)
  tok_s = {k: n / s for k, (n, s) in rates.items() if s > 0}
  print(f"{'decoder':<22}{'tok/s':>8}   ({len(prompts)} MT-Bench prompts x {args.max_new_tokens} tokens, greedy, "
        f"float32 weights, batch 1, decode only; {hardware.describe()})")
  for k, v in tok_s.items():
    print(f"{k:<22}{v:>8.1f}")
  if "llama.cpp F32" in tok_s:
    ref = outputs["llama.cpp F32"]
    for k in ours:
      same = np.mean([a == b for a, b in zip(outputs[k], ref)])
      print(f"{k} / llama.cpp: {tok_s[k] / tok_s['llama.cpp F32']:.2f}x  (greedy outputs identical to "
            f"llama.cpp's on {same:.2f} of the prompts)")
  if skipped:
    print(f"llama.cpp skipped: {skipped}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"tok_per_s": tok_s, "skipped": skipped, "hardware": hardware.info()}, f, indent=1)


if __name__ == "__main__":
  main()
