"""Tests of vanilla decoding (medusa_jax/decode.py): parity with transformers' greedy generate,
batching, stopping, streaming, sampling, and prompts that do not fit.

Most tests use the tiny random Llama from conftest.py with the EOS moved to a token id that greedy
decoding of the test prompts never produces, so sequences run to ``max_new_tokens`` unless a test
sets an EOS on purpose.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax import bundled
from medusa_jax import decode

NO_EOS = 255  # never produced by greedy decoding of PROMPTS on the tiny model (checked where it matters)
PROMPTS = [np.random.default_rng(1).integers(0, 256, n).tolist() for n in (5, 17, 11)]


def _decoder(cfg, eos=NO_EOS, **sampling):
  return decode.Decoder(cfg.replace(eos_ids=(eos,)), decode.Sampling(**sampling))


def _hf_greedy(model, prompt, max_new_tokens, eos):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(eos),
                         pad_token_id=eos[0])
  return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def greedy16(tiny):
  """Greedy outputs of PROMPTS (batched), 16 new tokens, no EOS reachable."""
  cfg, params = tiny
  out, state = _decoder(cfg, max_new_tokens=16).generate(params, PROMPTS)
  assert all(NO_EOS not in o for o in out)
  return out, state


# ----- parity with transformers --------------------------------------------------------------------


def test_greedy_matches_transformers_tiny(tiny_llama_dir, tiny, greedy16):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir(), dtype=torch.float32).eval()
  out, _ = greedy16
  for prompt, ours in zip(PROMPTS, out):
    assert ours == _hf_greedy(hf, prompt, 16, [NO_EOS])


SMOLLM2_NEW = 32


@pytest.fixture(scope="module")
def smollm2_hf_greedy(smollm2, smollm2_hf, smollm2_chat_prompt):
  """transformers' greedy continuation of the chat prompt, once for every projection backend."""
  return _hf_greedy(smollm2_hf, smollm2_chat_prompt, SMOLLM2_NEW, list(smollm2[0].eos_ids))


def test_greedy_matches_transformers_smollm2(smollm2, smollm2_chat_prompt, smollm2_hf_greedy, projection_backend):
  cfg, params, tok = smollm2
  n, ref = SMOLLM2_NEW, smollm2_hf_greedy
  dec = decode.Decoder(cfg, decode.Sampling(max_new_tokens=n))
  dp = dec.prepare(params)
  assert (dp.prepared is not None) == (projection_backend == "cpu_kernel")
  ours, state = dec.generate(dp, [smollm2_chat_prompt])
  assert ours[0] == ref, (tok.decode(ours[0]), tok.decode(ref))
  assert len(ref) == n  # a story prompt: the comparison covers all 32 tokens, not an early EOS
  assert int(state.steps) == n - 1


# ----- batching, stopping, streaming ---------------------------------------------------------------


def test_batch_equals_one_by_one(tiny, greedy16):
  cfg, params = tiny
  dec = _decoder(cfg, max_new_tokens=16)
  batched, _ = greedy16
  for prompt, expected in zip(PROMPTS, batched):
    alone, _ = dec.generate(params, [prompt])
    assert alone[0] == expected


def test_exactly_max_new_tokens(tiny, greedy16):
  out, state = greedy16
  assert [len(o) for o in out] == [16] * 3
  np.testing.assert_array_equal(state.num_B, [16] * 3)
  assert bool(state.done_B.all()) and int(state.steps) == 15  # the prefill emits the first token
  # Nothing is written past max_new_tokens (the slack row stays padding).
  assert not np.asarray(state.tokens_BxT)[:, 16:].any()
  # A shorter budget gives a prefix of the same greedy output.
  cfg, params = tiny
  for n in (1, 5):
    short, st = _decoder(cfg, max_new_tokens=n).generate(params, PROMPTS)
    assert short == [o[:n] for o in out] and int(st.steps) == n - 1


def _first_new_token(seq, k):
  """A token of ``seq`` at or after position k that does not occur before it, and its position."""
  for i in range(k, len(seq)):
    if seq[i] not in seq[:i]:
      return seq[i], i
  raise AssertionError(f"no fresh token after position {k} in {seq}")


def test_eos_stops_and_nothing_follows(tiny, greedy16):
  cfg, params = tiny
  baseline, _ = greedy16
  eos, k = _first_new_token(baseline[0], 4)
  expected = [o[:o.index(eos) + 1] if eos in o else o for o in baseline]
  assert len(expected[0]) == k + 1

  dec = _decoder(cfg, eos=eos, max_new_tokens=16)
  out, state = dec.generate(params, PROMPTS)
  assert out == expected
  assert bool(state.done_B.all())
  toks = np.asarray(state.tokens_BxT)
  for b, e in enumerate(expected):
    assert not toks[b, len(e):].any(), "tokens were written after EOS"
  # Streaming stops the same way.
  assert _collect(dec.stream(params, PROMPTS)) == expected


def test_emit_several_tokens_per_step():
  """``emit`` with A > 1 tokens per step (as Medusa accepts): EOS, max_new_tokens, count, done rows."""
  B, A, max_new = 4, 4, 5
  state = decode.DecodeState(
      cache={}, tokens_BxT=jnp.zeros((B, max_new + A - 1), jnp.int32), num_B=jnp.array([0, 3, 2, 1]),
      done_B=jnp.array([False, False, True, False]), last_B=jnp.array([7, 7, 7, 7]),
      rng=jax.random.PRNGKey(0), steps=jnp.zeros((), jnp.int32))
  new = jnp.array([[10, 11, 2, 12],   # EOS third: emits 3 tokens, EOS included, then done
                   [20, 21, 22, 23],  # 3 already emitted: only 2 more fit
                   [30, 31, 32, 33],  # already done: emits nothing
                   [40, 41, 2, 42]])  # only 2 accepted: the EOS beyond them does not count
  out = decode.emit(state, new, jnp.array([4, 4, 4, 2]), (2,), max_new)
  np.testing.assert_array_equal(out.num_B, [3, 5, 2, 3])
  np.testing.assert_array_equal(out.done_B, [True, True, True, False])
  np.testing.assert_array_equal(out.last_B, [2, 21, 7, 41])
  np.testing.assert_array_equal(out.tokens_BxT, [[10, 11, 2, 0, 0, 0, 0, 0],
                                                 [0, 0, 0, 20, 21, 0, 0, 0],
                                                 [0, 0, 0, 0, 0, 0, 0, 0],
                                                 [0, 40, 41, 0, 0, 0, 0, 0]])


def _collect(chunks):
  got = None
  for chunk in chunks:
    assert all(len(c) <= 1 for c in chunk)  # vanilla decoding emits one token per step
    got = [list(c) for c in chunk] if got is None else [g + c for g, c in zip(got, chunk)]
  return got


def test_stream_equals_generate(tiny, greedy16):
  cfg, params = tiny
  out, _ = greedy16
  chunks = list(_decoder(cfg, max_new_tokens=16).stream(params, PROMPTS))
  assert len(chunks) == 16  # after the prefill, then once per step
  assert _collect(chunks) == out


# ----- sampling ----------------------------------------------------------------------------------


def test_sampling_deterministic_per_key(tiny):
  cfg, params = tiny
  dec = _decoder(cfg, temperature=1.0, top_p=0.9, max_new_tokens=16)
  a, _ = dec.generate(params, PROMPTS, rng=jax.random.PRNGKey(7))
  b, _ = dec.generate(params, PROMPTS, rng=jax.random.PRNGKey(7))
  c, _ = dec.generate(params, PROMPTS, rng=jax.random.PRNGKey(8))
  assert a == b
  assert a != c
  assert all(len(x) == 16 or (len(x) < 16 and x[-1] == NO_EOS) for x in a)
  # Streaming draws the same random numbers as the while-loop.
  assert _collect(dec.stream(params, PROMPTS, rng=jax.random.PRNGKey(7))) == a


def test_tiny_top_p_is_greedy(tiny, greedy16):
  cfg, params = tiny
  dec = _decoder(cfg, temperature=0.8, top_p=1e-6, max_new_tokens=16)
  for seed in (0, 1):
    out, _ = dec.generate(params, PROMPTS, rng=jax.random.PRNGKey(seed))
    assert out == greedy16[0]


def test_sample_logits_distribution():
  """Temperature and nucleus truncation give the intended distribution (20k draws, fixed key)."""
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.log(jnp.asarray(probs))[None].repeat(20000, 0)

  def freqs(sampling):
    s = decode.sample_logits(logits, jax.random.PRNGKey(0), sampling)
    return np.bincount(np.asarray(s), minlength=4) / len(s)

  np.testing.assert_allclose(freqs(decode.Sampling(temperature=1.0)), probs, atol=0.01)
  hot = probs ** 0.5 / (probs ** 0.5).sum()
  np.testing.assert_allclose(freqs(decode.Sampling(temperature=2.0)), hot, atol=0.01)
  # top_p=0.7: the smallest prefix with mass >= 0.7 is {0, 1}, renormalised.
  np.testing.assert_allclose(freqs(decode.Sampling(temperature=1.0, top_p=0.7)), [0.625, 0.375, 0, 0],
                             atol=0.01)
  np.testing.assert_array_equal(freqs(decode.Sampling(temperature=1.0, top_p=1e-6)), [1, 0, 0, 0])
  np.testing.assert_array_equal(freqs(decode.Sampling()), [1, 0, 0, 0])


# ----- prompts that do not fit ---------------------------------------------------------------------


def test_prompt_too_long(tiny):
  cfg, params = tiny
  assert cfg.max_seq_len == 256
  dec = _decoder(cfg, max_new_tokens=16)
  with pytest.raises(decode.PromptTooLongError, match=r"250 tokens.*max_new_tokens=16.*context is 256"):
    dec.start(params, [[3] * 10, [3] * 250])
  with pytest.raises(decode.PromptTooLongError, match="Shorten the prompt or lower --max_new_tokens"):
    decode.plan_cache(cfg, [300], 1)


def test_prompt_that_exactly_fits(tiny):
  """A context that is not a multiple of the prompt bucket: the padded prompt must still fit the cache."""
  cfg, params = tiny
  prompt = np.random.default_rng(2).integers(0, 256, 150).tolist()
  n = 49
  small = cfg.replace(max_seq_len=200)  # 150 + 49 + 1 == 200
  P, S = decode.plan_cache(small, [150], n)
  assert 150 <= P <= S <= 200
  with pytest.raises(decode.PromptTooLongError):
    decode.plan_cache(small, [150], n + 1)
  out, state = _decoder(small, max_new_tokens=n).generate(params, [prompt])
  assert NO_EOS not in out[0] and len(out[0]) == n
  roomy, _ = _decoder(cfg, max_new_tokens=n).generate(params, [prompt])
  assert out == roomy
  assert int(state.cache["index"][0]) == 150 + n - 1


def test_empty_prompt_rejected(tiny):
  cfg, params = tiny
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    _decoder(cfg, max_new_tokens=4).start(params, [[1, 2], []])


def test_sliding_window_caps_the_context_with_a_clear_error():
  """Mistral's sliding window is not implemented: contexts stop at the window, where it and full
  causal attention agree, and a longer request says why."""
  from medusa_jax import convert  # pylint: disable=g-import-not-at-top
  hf = dict(model_type="mistral", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768, sliding_window=4096)
  cfg = convert.config_from_hf(hf)
  assert cfg.max_seq_len == 4096 and cfg.sliding_window == 4096
  decode.plan_cache(cfg, [3000], 1000)
  with pytest.raises(decode.PromptTooLongError, match="4096-token sliding window"):
    decode.plan_cache(cfg, [3500], 1000)
  # No window, or one at least the context: nothing changes.
  assert convert.config_from_hf({**hf, "sliding_window": None}).max_seq_len == 32768
  assert convert.config_from_hf({**hf, "sliding_window": 65536}).sliding_window is None
  assert convert.config_from_hf({**hf, "model_type": "qwen2", "use_sliding_window": False}).max_seq_len == 32768


# ----- many prompts --------------------------------------------------------------------------------


def test_batched_generate_shortest_first_in_batches_of_one_shape(tiny, greedy16):
  cfg, params = tiny
  dec = _decoder(cfg, max_new_tokens=16)
  shapes, real = [], dec.generate

  def recording(p, prompts, rng=None):
    shapes.append(len(prompts))
    return real(p, prompts, rng)

  dec.generate = recording
  got = list(decode.batched_generate(dec, params, PROMPTS, 2, jax.random.PRNGKey(0)))
  assert [idx for idx, _ in got] == [[0, 2], [1]]  # prompt lengths 5, 11, then 17
  assert shapes == [2, 2]  # the short last batch is filled up to the same shape
  out = {i: o for idx, outs in got for i, o in zip(idx, outs)}
  assert [out[i] for i in range(len(PROMPTS))] == greedy16[0]


def test_reply_text_strips_the_end_token():
  tok = bundled.smollm2_tokenizer()
  ids = tok.encode("Hello there.", add_special_tokens=False)
  assert decode.reply_text(tok, ids + [2], (2,)) == "Hello there."
  assert decode.reply_text(tok, ids, (2,)) == "Hello there."
