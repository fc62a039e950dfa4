"""The CPU decode kernel (``medusa_jax/backends/cpu``: ``cpu_matmul.cc`` via ``kernel``), a projection backend.

It must give XLA's products to float32 rounding, give each row the same bits whatever rows share
its call (so vanilla and Medusa steps round alike), and be what decoders actually run on CPU.
"""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax import backends
from medusa_jax import decode
from medusa_jax import medusa
from medusa_jax import model as model_lib
from medusa_jax.backends.cpu import kernel
from medusa_jax.model import ModelConfig

pytestmark = pytest.mark.skipif(
    kernel._compiler() is None, reason="no C++ compiler: decoding falls back to XLA's dots")  # pylint: disable=protected-access

# Output widths that are not multiples of the 32-column panel (qkv 72, vocab 100) exercise padding.
CFG = ModelConfig(vocab_size=100, dim=40, num_layers=2, num_heads=5, num_kv_heads=1, head_dim=8, mlp_dim=48,
                  max_seq_len=128, bos_id=None, eos_ids=(), tie_embeddings=True)


def _base(cfg, seed=0, scale=4.0):
  base = model_lib.init_params(cfg, jax.random.PRNGKey(seed))
  return jax.tree.map(lambda x: x * scale if x.ndim > 1 else x, base)


@pytest.fixture(autouse=True)
def _kernel_for_every_row_count(monkeypatch):
  """The measured crossover is this machine's business (test_crossover_*); here the kernel is on for
  every call these tests make, so what they check does not depend on the CPU."""
  monkeypatch.setenv(kernel.ROWS_ENV, "128")


def test_library_builds_and_loads():
  assert kernel._load()  # pylint: disable=protected-access
  assert kernel.enabled()


# Row counts across the kernel's blocking (one block up to 12 rows, then balanced blocks of up to 8:
# 13 = 7 + 6, 17 = 6 + 6 + 5, 64 = 8 x 8), with output widths that are not multiples of the
# 32-column panel (its zero padding) and odd inner sizes.
@pytest.mark.parametrize("M,D,F", [(1, 64, 32), (3, 40, 100), (8, 64, 96), (9, 17, 64), (12, 576, 40), (13, 33, 72),
                                   (17, 576, 100), (64, 96, 160), (70, 33, 40)])
def test_matmul_matches_numpy(M, D, F):
  rng = np.random.default_rng(M * 1000 + D)
  x = rng.standard_normal((M, D)).astype(np.float32)
  w = rng.standard_normal((D, F)).astype(np.float32)
  got = np.asarray(jax.jit(kernel.matmul, static_argnums=2)(x, kernel.pack(w), F))
  want = x.astype(np.float64) @ w.astype(np.float64)
  assert got.shape == (M, F)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(D))


def test_matmul_keeps_leading_axes_and_empty_calls():
  rng = np.random.default_rng(2)
  w = rng.standard_normal((24, 50)).astype(np.float32)
  x = rng.standard_normal((2, 3, 24)).astype(np.float32)
  mm = jax.jit(kernel.matmul, static_argnums=2)
  np.testing.assert_allclose(mm(x, kernel.pack(w), 50), x @ w, rtol=1e-5, atol=1e-4)
  assert mm(np.zeros((0, 24), np.float32), kernel.pack(w), 50).shape == (0, 50)


def test_a_rows_result_does_not_depend_on_its_call():
  """Bit for bit: a row alone, or among up to 63 others (every blocking of the rows), in any position."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((64, 576)).astype(np.float32)
  packed = kernel.pack(rng.standard_normal((576, 100)).astype(np.float32))
  mm = jax.jit(kernel.matmul, static_argnums=2)
  alone = np.concatenate([np.asarray(mm(x[r:r + 1], packed, 100)) for r in range(64)])
  np.testing.assert_array_equal(np.asarray(mm(x, packed, 100)), alone)
  for rows in ([5], [4, 5], list(range(8)), list(range(12)), list(range(13)), list(range(16)),
               list(range(18, -1, -1)), list(range(33)), list(range(63, 0, -2))):
    np.testing.assert_array_equal(np.asarray(mm(x[rows], packed, 100)), alone[rows], err_msg=str(len(rows)))


def _packed(cfg, base):
  return backends.prepare(model_lib.projections, cfg, base)


def test_forward_with_packed_weights_matches_xla():
  base = _base(CFG)
  packed = _packed(CFG, base)
  assert set(packed) == {"layers", "lm_head"} and set(packed["layers"][0]) == {"qkv", "wo", "gate_up", "down"}
  assert packed["layers"][0]["qkv"].shapes == ((5, 8), (1, 8), (1, 8)) and packed["lm_head"].backend == "cpu_kernel"
  fwd = jax.jit(model_lib.forward, static_argnums=0)
  B, L = 2, 7
  tokens = jax.random.randint(jax.random.PRNGKey(1), (B, L), 0, CFG.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(L), (B, L))
  mask = model_lib.causal_mask(jnp.array([L, L - 2]), L)
  want_logits, want_hidden, _ = fwd(CFG, base, tokens, positions, mask)
  got_logits, got_hidden, _ = fwd(CFG, base, tokens, positions, mask, prepared=packed)
  scale = float(jnp.abs(want_logits).max())
  np.testing.assert_allclose(got_logits, want_logits, atol=2e-6 * scale)
  np.testing.assert_allclose(got_hidden, want_hidden, atol=2e-5)
  greedy = jax.jit(model_lib.greedy_tokens, static_argnums=0)
  np.testing.assert_array_equal(greedy(CFG, base, got_hidden, packed), greedy(CFG, base, want_hidden))
  # The kernel is in the compiled forward, and not in the one without packed weights.
  assert kernel.TARGET in fwd.lower(CFG, base, tokens, positions, mask, prepared=packed).as_text()
  assert kernel.TARGET not in fwd.lower(CFG, base, tokens, positions, mask).as_text()


def test_crossover_follows_the_measured_row_counts(monkeypatch):
  """Calls of more rows than the measured crossover go to XLA's dot, the others to the kernel."""
  base = _base(CFG)
  packed = _packed(CFG, base)
  fwd = jax.jit(model_lib.forward, static_argnums=0)
  monkeypatch.setenv(kernel.ROWS_ENV, "4")
  for B, L, on in ((1, 4, True), (2, 2, True), (1, 5, False), (2, 3, False)):
    tokens = jnp.zeros((B, L), jnp.int32)
    hlo = fwd.lower(CFG, base, tokens, jnp.broadcast_to(jnp.arange(L), (B, L)),
                    model_lib.causal_mask(jnp.full((B,), L), L), prepared=packed).as_text()
    assert (kernel.TARGET in hlo) == on, (B, L)


def test_crossover_is_the_last_row_count_of_an_unbroken_run_of_wins():
  rows = (1, 2, 4, 8, 16, 32)
  t = lambda *pairs: list(pairs)
  assert kernel.crossover(rows, t((10, 9), (11, 9), (12, 10), (14, 12), (20, 21), (30, 25))) == 8
  assert kernel.crossover(rows, t((10, 11), (11, 9), (12, 10), (14, 12), (20, 19), (30, 25))) == 0
  assert kernel.crossover(rows, t((10, 10), (11, 9), (12, 10), (14, 12), (20, 19), (30, 25))) == 32
  # A tie at one row (within 3%) does not stop the run of wins after it ...
  assert kernel.crossover(rows, t((56.6, 56.7), (81, 67), (112, 68), (125, 77), (181, 117), (262, 290))) == 16
  # ... but ties alone choose XLA: the kernel never won.
  assert kernel.crossover(rows, t(*[(10, 10.2)] * 6)) == 0


def test_tuning_is_measured_once_and_cached(monkeypatch, tmp_path):
  """No cached record: the first use measures (here: a stub) and writes it beside the library;
  later uses read it. The override wins over both."""
  monkeypatch.delenv(kernel.ROWS_ENV)
  monkeypatch.setenv("MEDUSA_JAX_CACHE", str(tmp_path))
  kernel._tuned.cache_clear()  # pylint: disable=protected-access
  calls = []
  monkeypatch.setattr(kernel, "_time_projections",
                      lambda rows, repeats: calls.append(rows) or [(10.0, 9.0) if n <= 6 else (10.0, 11.0) for n in rows])
  monkeypatch.setattr(kernel, "step_paths", lambda *a: pytest.fail("a first use measures no peak"))
  try:
    import os  # pylint: disable=g-import-not-at-top
    os.makedirs(os.path.dirname(kernel._tuning_path()))  # pylint: disable=protected-access
    assert kernel.max_rows() == 6 and len(calls) == 1
    assert kernel.max_rows() == 6 and len(calls) == 1
    assert "<= 6 rows" in kernel.report(kernel.tuning())
    monkeypatch.setenv(kernel.ROWS_ENV, "2")
    assert kernel.max_rows() == 2
  finally:
    kernel._tuned.cache_clear()  # pylint: disable=protected-access


def test_decoder_packs_once_and_generates_as_xla_does(monkeypatch):
  params = {"base": _base(CFG, seed=3)}
  prompts = [[5, 9, 3, 12, 7], [1, 2]]
  dec = medusa.make_decoder(CFG, decode.Sampling(max_new_tokens=12))
  first = dec.prepare(params)
  assert first.prepared is not None and set(first.params["base"]) == set(params["base"])  # params untouched
  # Another decoder of the same backbone (vanilla and Medusa in a benchmark) shares the copy.
  other = medusa.make_decoder(CFG, decode.Sampling(max_new_tokens=3))
  assert other.prepare(first).prepared is first.prepared
  got, _ = dec.generate(first, prompts)

  monkeypatch.setenv(kernel.ENV, "0")
  assert not kernel.enabled()
  plain = medusa.make_decoder(CFG, decode.Sampling(max_new_tokens=12))
  assert plain.prepare(params).prepared is None
  want, _ = plain.generate(params, prompts)
  assert got == want


def test_float64_params_are_left_alone():
  with jax.enable_x64(True):
    cfg64 = CFG.replace(dtype="float64", param_dtype="float64")
    assert _packed(cfg64, _base(cfg64)) is None


def test_build_error_is_clear(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  monkeypatch.setattr(shutil, "which", lambda name: None)
  with pytest.raises(kernel.KernelBuildError, match="no C\\+\\+ compiler"):
    kernel.build(force=True)


def test_the_import_never_fails_and_a_missing_build_is_one_log_line(monkeypatch, caplog):
  """No compiler (or a failed build): ``_load`` says so once, in one line, and decoding keeps XLA's dots."""
  def failed_build(force=False):
    raise kernel.KernelBuildError("c++ failed to build cpu_matmul.cc:\nerror: one\nerror: two")
  monkeypatch.setattr(kernel, "build", failed_build)
  with caplog.at_level("WARNING", logger=kernel.__name__):
    assert kernel._load.__wrapped__() is False  # pylint: disable=protected-access
  assert [r.levelname for r in caplog.records] == ["WARNING"]
  message = caplog.records[0].getMessage()
  assert "\n" not in message and "using XLA's dots instead" in message and "failed to build" in message


def test_disabled_kernel_leaves_decoding_to_xla(monkeypatch):
  monkeypatch.setenv(kernel.ENV, "0")
  assert not kernel.enabled()
  assert _packed(CFG, _base(CFG)) is None


def test_roofline_and_report():
  """The bound is max(bytes / bandwidth, flops / peak); the report prints each path's ms, GB/s, GFLOP/s
  and fraction of it per row count, and why each row count chose its path."""
  B, F1 = kernel.STEP_BYTES, kernel.step_flops(1)
  rows = [1, 8, 64]
  record = {"rows": rows, "max_rows": 8, "xla_ms": [30.0, 60.0, 100.0], "kernel_ms": [20.0, 22.0, 110.0],
            "peak_rows": 256, "peak_ms": {"xla": 256 * F1 / 200e9 * 1e3, "kernel": 400.0},
            "measured": "now", "cpu": "test CPU"}
  roof = kernel.roofline(rows, {"xla": record["xla_ms"], "kernel": record["kernel_ms"]}, record["peak_ms"])
  assert roof["bandwidth"] == pytest.approx(B / 0.020) and roof["peak"] == pytest.approx(200e9)
  np.testing.assert_allclose(roof["bound_ms"], [20.0, 20.0, 64 * F1 / 200e9 * 1e3])
  text = kernel.report(record)
  assert f"memory bandwidth {B / 0.020 / 1e9:.1f} GB/s" in text and "compute peak 200 GFLOP/s (256 rows, xla" in text
  assert "kernel (1.50x faster)" in text and "kernel (2.73x faster)" in text and "XLA (kernel slower)" in text
  assert "<= 8 rows" in text and "8 rows 1.10x" in text
  # A record without the peak (a first use's) still reports, with the best measured GFLOP/s as peak.
  del record["peak_ms"]
  assert "compute peak" in kernel.report(record)


def _attention_reference(q, k, v, mask):
  """Grouped-query attention in float64 NumPy, one query row at a time; zeros for a row that attends
  to nothing (the kernel's contract)."""
  B, L, H, E = q.shape
  K = k.shape[1]
  out = np.zeros((B, L, H, E))
  for b, l, h in np.ndindex(B, L, H):
    rows = np.flatnonzero(mask[b, l])
    if rows.size:
      kv = h // (H // K)
      s = k[b, kv, rows].astype(np.float64) @ q[b, l, h].astype(np.float64) / np.sqrt(E)
      p = np.exp(s - s.max())
      out[b, l, h] = p @ v[b, kv, rows] / p.sum()
  return out


# A one-token step, a 16-node tree at batch 2, 5 query heads on 1 kv head with E = 8 (the kernel's
# non-vector path), and E = 48 (not a multiple of the 16-float vector).
@pytest.mark.parametrize("B,L,H,K,E,S", [(1, 1, 9, 3, 64, 40), (2, 16, 9, 3, 64, 70), (3, 5, 5, 1, 8, 33),
                                         (1, 4, 4, 2, 48, 20)])
def test_attention_matches_a_brute_force_reference(B, L, H, K, E, S):
  rng = np.random.default_rng(B * 100 + L)
  q = rng.standard_normal((B, L, H, E)).astype(np.float32)
  k = rng.standard_normal((B, K, S, E)).astype(np.float32)
  v = rng.standard_normal((B, K, S, E)).astype(np.float32)
  index = rng.integers(0, S - L, B)
  tree = np.tril(rng.random((L, L)) < 0.5) | np.eye(L, dtype=bool)
  mask = np.array(model_lib.cache_tree_mask(jnp.asarray(index, jnp.int32), tree, S))
  mask[0, 0] = False  # a row that attends to nothing: zeros
  attend = jax.jit(kernel.attention)
  got = np.asarray(attend(q, k, v, mask))
  np.testing.assert_allclose(got, _attention_reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
  assert not got[0, 0].any()
  # Rows past the last one a query row attends to are never read (a cache's unwritten capacity).
  k2, v2 = k.copy(), v.copy()
  for b in range(B):
    k2[b, :, index[b] + L:] = np.nan
    v2[b, :, index[b] + L:] = np.nan
  np.testing.assert_array_equal(np.asarray(attend(q, k2, v2, mask)), got)
  # Bit for bit, a query row's result does not depend on the other rows in its call.
  for l in range(L):
    np.testing.assert_array_equal(np.asarray(attend(q[:, l:l + 1], k, v, mask[:, l:l + 1]))[:, 0], got[:, l])


def test_decoding_attention_goes_through_the_kernel(monkeypatch):
  """A prepared decoder's steps run the attention kernel, and not with MEDUSA_JAX_CPU_ATTENTION=0
  (the projections keep theirs)."""
  from medusa_jax.backends import cpu  # pylint: disable=g-import-not-at-top
  params = {"base": _base(CFG, seed=5)}
  dec = medusa.make_decoder(CFG, decode.Sampling(max_new_tokens=4))
  dp = dec.prepare(params)
  state = dec.start(dp, [[5, 9, 3]])
  assert kernel.ATTENTION_TARGET in jax.jit(dec.step).lower(dp, state).as_text()
  monkeypatch.setenv(cpu.ATTENTION_ENV, "0")  # read when a step is traced: a new decoder's
  off = medusa.make_decoder(CFG, decode.Sampling(max_new_tokens=4))
  text = jax.jit(off.step).lower(dp, state).as_text()
  assert kernel.ATTENTION_TARGET not in text and kernel.TARGET in text
