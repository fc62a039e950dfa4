"""The command-line tools' errors: one line ``error: ...`` on stderr and exit status 2 for the
project's own errors (an unknown config key, a bad tree, a missing or foreign checkpoint, a prompt
too long, malformed data); ``--debug`` shows the traceback. Real subprocesses, as a user runs them.
"""

import json
import os
import re
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


# ----------------------------------------------------------------------------------------------
# What a new user types wrong: one `error:` line that says what to do, exit 2, before the model loads
# ----------------------------------------------------------------------------------------------

# A model that cannot load: a case that fails with its own message was checked before loading.
NO_MODEL = "--config.model=/nonexistent/model"
GEN = ("medusa_jax.generate", "--config", "configs/smollm2.py:tiny", NO_MODEL, "--prompt", "hi")
NEW_USER = {
    "mode": GEN + ("--mode", "fast"),
    "temperature": GEN + ("--mode", "medusa", "--heads", "random", "--acceptance", "sample", "--temperature", "-1"),
    "max_new_tokens": GEN + ("--max_new_tokens", "-5"),
    "no_heads": ("medusa_jax.generate", "--config", "configs/smollm2_medusa1.py:tiny", NO_MODEL, "--prompt", "hi"),
    "no_config": ("medusa_jax.generate", "--config", "configs/nosuch.py:tiny", "--prompt", "hi"),
    "workdir": ("medusa_jax.train", "--config", "configs/smollm2_medusa1.py:tiny", NO_MODEL, "--workdir", "{tmp}/a_file/run"),
    "prompts": ("medusa_jax.benchmark", "--config", "configs/smollm2.py:tiny", NO_MODEL, "--prompts", "missing.jsonl"),
    "help_generate": ("medusa_jax.generate", "--help"),
    "help_train": ("medusa_jax.train", "--help"),
}


@pytest.fixture(scope="module")
def new_user(tmp_path_factory):
  """``result(case) -> (rc, stdout, stderr)`` of each ``NEW_USER`` command. Importing JAX and torch is
  most of each one's few seconds, so they are all started at once and overlap."""
  tmp = tmp_path_factory.mktemp("new_user")
  (tmp / "a_file").write_text("")  # a --workdir under a file cannot be created, even by root
  procs = {}
  for name, args in NEW_USER.items():
    with open(tmp / f"{name}.out", "w") as out, open(tmp / f"{name}.err", "w") as err:
      procs[name] = subprocess.Popen([sys.executable, "-m", *(a.format(tmp=tmp) for a in args)], cwd=REPO,
                                     stdout=out, stderr=err, env={**os.environ, "JAX_PLATFORMS": "cpu"})

  def result(name):
    rc = procs[name].wait(timeout=300)
    return rc, (tmp / f"{name}.out").read_text(), (tmp / f"{name}.err").read_text()

  yield result
  for p in procs.values():
    if p.poll() is None:
      p.kill()


def _assert_exactly_one_error_line(rc, out, err, *needles):
  lines = [l for l in err.splitlines() if l.strip() and not re.match(r"[IWE]\d{4} ", l)]  # absl's log lines
  assert rc == 2, (rc, out, err)
  assert len(lines) == 1 and lines[0].startswith("error: "), (lines, out)
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("case, needles", [
    ("mode", ("--mode 'fast' is not a decoding mode", "vanilla, medusa")),
    ("temperature", ("--temperature must be 0 (greedy) or more",)),
    ("max_new_tokens", ("--max_new_tokens must be", "at least 1")),
    ("no_heads", ("Medusa decoding needs heads", "--checkpoint WORKDIR/export", "--heads random")),
    ("no_config", ("--config configs/nosuch.py: no such file", os.path.join("configs", "smollm2_medusa1.py"))),
    ("workdir", ("--workdir", "cannot be written")),
    ("prompts", ("--prompts missing.jsonl: no such file", "mt_bench", "sharegpt_heldout")),
])
def test_a_new_users_mistakes_are_one_line_before_the_model_loads(new_user, case, needles):
  _assert_exactly_one_error_line(*new_user(case), *needles)


@pytest.mark.parametrize("module, names", [
    ("generate", ("--prompt", "--config", "--checkpoint", "--tree", "--mode", "--max_new_tokens", "--temperature")),
    ("train", ("--config", "--workdir")),
])
def test_help_exits_0_with_the_flags_a_user_needs(new_user, module, names):
  rc, out, err = new_user(f"help_{module}")
  assert rc == 0, (rc, out, err)
  for name in names + ("--[no]debug", "config keys: medusa_jax/config.py default_config()"):
    assert name in out, (name, out)
  assert "--jax_" not in out and len(out.splitlines()) < 80, out  # not absl's --helpfull


@pytest.mark.parametrize("script", ["medusa-train", "medusa-distill", "medusa-calibrate", "medusa-benchmark",
                                    "medusa-generate"])
def test_console_scripts_are_installed_and_answer_help(script):
  """`pip install -e .` (make setup) installs one console script per command (pyproject.toml)."""
  path = os.path.join(os.path.dirname(sys.executable), script)
  assert os.path.exists(path), f"{script} is not installed: run `pip install -e .`"
  proc = subprocess.run([path, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr
  assert "--config" in proc.stdout, proc.stdout


def test_distill_says_a_teacher_forced_recipe_needs_no_distillation():
  """`make demo` calls distill for any config; the soft-label recipe reads ShareGPT's own replies."""
  rc, out, err = _run("medusa_jax.distill", "--config", "configs/smollm2_medusa1.py:soft,tiny")
  assert rc == 0, err
  assert "nothing to distil" in out and "Traceback" not in err
