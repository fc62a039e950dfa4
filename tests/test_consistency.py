"""The decoder's inputs to the heads are training's: per-sequence step counts, decoded and simulated.

With any heads, greedy Medusa's output equals vanilla greedy decoding's, so an output comparison
cannot see the heads read the wrong hidden state or the wrong token (an off-by-one in the carried
position, the next token, or a sequential head's path): only how many tokens each step accepts
changes. Calibration measures the heads teacher-forced, exactly as training feeds them
(``calibrate.rank_counts``: the hidden state of the position that produced token j, and the tokens
after it), and ``calibrate.simulate_steps`` walks each greedy generation as the decoder would. So,
for the same generation and tree, the decoder's steps per sequence must equal the simulated ones,
exactly, if and only if both feed the heads the same inputs at every step.

Set-up: a random float64 model (x64, so no argmax or rank near-tie differs between the cached tree
forward and the teacher-forced one) and heads whose LM projections are fitted by least squares to
the tokens they should predict on the greedy generations, plus noise: accepted often, not always.
The next-token and path projections are large, so a head's guess depends on the token it reads.
Batch 4, ragged prompts; one sequence stops at an EOS mid-way, the others at ``max_new_tokens``,
so both ways a last step is cut short are compared. The decoder's steps per sequence are counted
from its stream (the loop's own jitted step): a step emits at least one token for every sequence
still running and none for a finished one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax import calibrate
from medusa_jax import decode
from medusa_jax import heads as heads_lib
from medusa_jax import medusa
from medusa_jax import model as model_lib
from medusa_jax import tree as tree_lib
from medusa_jax.heads import HeadsConfig
from medusa_jax.model import ModelConfig

CFG = ModelConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                  max_seq_len=512, bos_id=None, eos_ids=(), dtype="float64", param_dtype="float64")
PROMPTS = [np.random.default_rng(11).integers(0, 64, n).tolist() for n in (6, 10, 3, 13)]
MAX_NEW = 41
TREE = tree_lib.resolve("mc_sim_7b_63", num_heads=4, max_topk=CFG.vocab_size)
# The next-token / path projections' std: embedding rows are ~0.1 per coordinate, so this makes a
# head's token term about as large as h_t (unit RMS after the final norm).
TOKEN_SCALE = 2.0
# Noise on the fitted LM heads, relative to their std: at 1.0 each head's top-1 is right about half
# the time, so steps accept anything from nothing to the whole depth.
NOISE = 1.0
KINDS = {"medusa": HeadsConfig(num_heads=4, shared_lm_head=False),
         "next_token_input": HeadsConfig(num_heads=4, shared_lm_head=False, next_token_input=True),
         "sequential": HeadsConfig(num_heads=4, shared_lm_head=False, kind="sequential"),
         # The prefix layer: decoding runs it over the accepted rows with its own cache, training and
         # calibration over the whole teacher-forced sequence.
         "prefix_layer": HeadsConfig(num_heads=4, shared_lm_head=False, prefix_layer=True)}


def _random_base(seed):
  """Random float64 backbone params in NumPy (no op-by-op JAX compiles): unit norms, matrices of
  std 0.1, five times init's 0.02, so that attention and the MLP matter."""
  rng = np.random.default_rng(seed)
  is_spec = lambda x: isinstance(x, tuple) and isinstance(x[0], tuple)
  return jax.tree_util.tree_map_with_path(
      lambda path, spec: np.ones(spec[0]) if path[-1].key.endswith("norm") else rng.normal(0, 0.1, spec[0]),
      model_lib.param_shapes(CFG), is_leaf=is_spec)


@functools.lru_cache(maxsize=None)
def _backbone():
  """(params, greedy generations, EOS, teacher-forced final hidden states [B, L, D] of prompt +
  generation). The EOS is a token that PROMPTS[0]'s generation emits mid-way for the first time and
  no other generation emits; the generations are those with that EOS (the ones without it, cut
  after its first occurrence: greedy decoding emits the same tokens up to it)."""
  base = _random_base(3)
  gens, _ = medusa.make_decoder(CFG, decode.Sampling(max_new_tokens=MAX_NEW)).generate({"base": base}, PROMPTS)
  for i in range(MAX_NEW // 4, MAX_NEW - 4):
    eos = gens[0][i]
    if eos not in gens[0][:i] and all(eos not in g for g in gens[1:]):
      gens = [gens[0][:i + 1]] + gens[1:]
      break
  else:
    raise AssertionError(f"no usable EOS in {gens}")
  seqs = [p + g for p, g in zip(PROMPTS, gens)]
  L = max(map(len, seqs))
  tokens, lengths = decode.pad_prompts(seqs, L)
  hidden = jax.jit(lambda base, tokens, lengths: model_lib.forward(
      CFG, base, tokens, jnp.broadcast_to(jnp.arange(L), tokens.shape), model_lib.causal_mask(lengths, L),
      logits=False)[1])(base, tokens, lengths)
  return base, gens, eos, hidden


def _fitted_heads(hcfg, seed):
  """Random blocks (and next-token / path projections), LM heads fitted by least squares to the
  token each head should predict, reading the true following tokens (teacher forcing), plus noise."""
  M, D, V = hcfg.num_heads, CFG.dim, CFG.vocab_size
  base, gens, _, hidden = _backbone()
  rng = np.random.default_rng(seed)
  med = {"w": rng.normal(0, 0.1, (M, 1, D, D)), "b": rng.normal(0, 0.1, (M, 1, D))}
  if hcfg.next_token_input:
    med["tok_w"] = rng.normal(0, TOKEN_SCALE, (M, D, D))
  if hcfg.kind == "sequential":
    med["path_w"] = rng.normal(0, TOKEN_SCALE, (M, M, D, D))
  seqs = [p + g for p, g in zip(PROMPTS, gens)]
  L = hidden.shape[1]
  if hcfg.prefix_layer:  # every matrix random (a trained-looking layer), unit norms
    med["prefix"] = {k: np.ones(shape) if k.endswith("norm") else rng.normal(0, 0.1, shape)
                     for k, (shape, _) in heads_lib.prefix_shapes(CFG).items()}
    hidden = jax.jit(functools.partial(heads_lib.heads_input, hcfg, CFG))(
        {"base": base, "medusa": med}, hidden, jnp.broadcast_to(jnp.arange(L), hidden.shape[:2]),
        model_lib.causal_mask(jnp.array([len(s) for s in seqs]), L))
  tokens, _ = decode.pad_prompts(seqs, L + M + 1)
  path = np.stack([tokens[:, 1 + j:1 + j + L] for j in range(M)], -1)  # [B, L, M]: tokens t+1 .. t+M
  states = np.asarray(heads_lib.head_states(hcfg, CFG, {"base": base, "medusa": med}, hidden, jnp.asarray(path)))
  feats, targets = [[] for _ in range(M)], [[] for _ in range(M)]
  for b, (prompt, s) in enumerate(zip(PROMPTS, seqs)):
    for t in range(len(prompt) - 1, len(s)):
      for m in range(M):
        if t + m + 2 < len(s):  # head m+1 at position t predicts token t+m+2
          feats[m].append(states[b, t, m])
          targets[m].append(s[t + m + 2])
  lm_head = np.stack([np.linalg.lstsq(np.array(x), np.eye(V)[y], rcond=None)[0] for x, y in zip(feats, targets)])
  med["lm_head"] = lm_head + NOISE * lm_head.std() * rng.normal(size=lm_head.shape)
  return med


def _decoded_steps(dec, params, prompts):
  """(outputs, steps per sequence, steps of the batch) of the decoder's own jitted step."""
  chunks = list(dec.stream(params, prompts))
  outs = [sum((c[b] for c in chunks), []) for b in range(len(prompts))]
  # chunks[0] is the prefill's; a step emits >= 1 token for each live sequence, none for a done one.
  steps = [sum(1 for c in chunks[1:] if c[b]) for b in range(len(prompts))]
  return outs, steps, len(chunks) - 1


@pytest.mark.parametrize("kind", list(KINDS))
def test_decoded_steps_equal_simulated_steps(kind):
  hcfg = KINDS[kind]
  with jax.enable_x64(True):
    base, want, eos, _ = _backbone()
    params = {"base": base, "medusa": _fitted_heads(hcfg, seed=list(KINDS).index(kind))}
    cfg = CFG.replace(eos_ids=(eos,))
    sampling = decode.Sampling(max_new_tokens=MAX_NEW)
    spec = medusa.MedusaSpec(heads=hcfg, tree=TREE)
    got, steps, batch_steps = _decoded_steps(medusa.make_decoder(cfg, sampling, spec), params, PROMPTS)
    ranks: list = []
    counts = calibrate.rank_counts(cfg, hcfg, params, PROMPTS, want, num_ranks=CFG.vocab_size, batch_size=3,
                                   ranks_out=ranks)
  assert got == want
  # Both ways a generation ends: an EOS mid-way (its accepted run cut there) and max_new_tokens.
  assert want[0][-1] == eos and len(want[0]) < MAX_NEW - 4
  assert all(len(w) == MAX_NEW for w in want[1:])
  # Teacher forcing reproduces the generation: the positions line up, and no near-tie flips a rank.
  assert counts[0, 0] == counts[0].sum() == sum(map(len, want))
  assert [len(r) for r in ranks] == [len(w) - 1 for w in want]

  simulated = calibrate.simulate_steps(ranks, TREE.choices)
  assert steps == simulated.tolist(), (kind, steps, simulated.tolist())
  assert batch_steps == max(steps)
  # Not vacuous: every sequence accepted candidates, and the heads were also wrong at times.
  tokens = [len(w) - 1 for w in want]
  assert all(s < n for s, n in zip(steps, tokens)), (steps, tokens)
  assert sum(tokens) / sum(steps) < TREE.depth, (steps, tokens)
  assert calibrate.simulate_tokens_per_step(ranks, TREE.choices) == pytest.approx(sum(tokens) / sum(steps))
