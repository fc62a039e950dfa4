"""The command-line tools' errors: one line ``error: ...`` on stderr and exit status 2 for the
project's own errors (an unknown config key, a bad tree, a missing or foreign checkpoint, a prompt
too long, malformed data); ``--debug`` shows the traceback. Real subprocesses, as a user runs them.
"""

import json
import os
import subprocess
import sys

import pytest

from medusa_jax import entry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, env=None, timeout=180):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
  return proc.returncode, proc.stdout, proc.stderr


def _assert_one_line_error(rc, out, err, match):
  lines = [l for l in (out + err).splitlines() if l.strip() and "WARNING" not in l and not l.startswith("W")]
  assert rc == 2, (rc, out, err)
  assert "Traceback" not in err, err
  assert len(lines) <= 3, lines
  assert any(l.startswith("error: ") and match in l for l in lines), lines


def test_unknown_config_key(tmp_path):
  rc, out, err = _run("medusa_jax.train", "--config", "configs/smollm2_medusa1.py:tiny", "--config.train.stepz=1",
                      "--workdir", str(tmp_path))
  _assert_one_line_error(rc, out, err, "--config.train.stepz: no such config key; did you mean \"steps\"")


def test_unknown_variant_and_debug_traceback(tmp_path):
  args = ("medusa_jax.train", "--config", "configs/smollm2_medusa1.py:tinyy", "--workdir", str(tmp_path))
  _assert_one_line_error(*_run(*args), "Unknown variant 'tinyy'")
  rc, _, err = _run(*args, "--debug")
  assert rc != 0 and "Traceback" in err


def test_bad_tree_missing_checkpoint_and_too_long_prompt(tmp_path):
  gen = ("medusa_jax.generate", "--config", "configs/smollm2.py:tiny", "--prompt", "hi")
  _assert_one_line_error(*_run(*gen, "--mode", "medusa", "--heads", "random", "--tree", "dense:0,2"), "dense")
  _assert_one_line_error(*_run(*gen, "--checkpoint", str(tmp_path / "nope")), "not a medusa_jax export")
  rc, out, err = _run("medusa_jax.generate", "--config", "configs/smollm2.py:tiny", "--prompt", "word " * 3000)
  _assert_one_line_error(rc, out, err, "but the model's context is 2048")


def test_malformed_prompts_file(tmp_path):
  bad = tmp_path / "prompts.jsonl"
  bad.write_text(json.dumps({"question_id": 1, "turns": ["fine"]}) + "\n{not json\n")
  rc, out, err = _run("medusa_jax.benchmark", "--config", "configs/smollm2.py:tiny", "--prompts", str(bad))
  _assert_one_line_error(rc, out, err, "prompts.jsonl:2: not an MT-Bench-style record")


def test_errors_from_elsewhere_keep_their_traceback():
  """Only the project's own errors are shortened: a bug in a library stays a traceback."""
  def raise_in_json():
    json.loads("{")
  with pytest.raises(json.JSONDecodeError) as info:
    raise_in_json()
  assert not entry._raised_by_us(info.value)  # pylint: disable=protected-access

  def raise_here():
    raise ValueError("ours")
  with pytest.raises(ValueError) as info:
    raise_here()
  assert not entry._raised_by_us(info.value)  # raised in tests/, not in the package  # pylint: disable=protected-access
  from medusa_jax import tree  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError) as info:
    tree.resolve("dense:0,2")
  assert entry._raised_by_us(info.value)  # pylint: disable=protected-access
