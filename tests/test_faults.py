"""Fault injection: preemption, kills during a save, non-finite steps, kills during distillation.

Training runs are the shared tiny run of conftest.py (``train_config``), interrupted in real
``python -m medusa_jax.train`` subprocesses and resumed here:

- SIGTERM (one process, a plain signal handler): the run finishes its step, saves it and exits 0;
  resumed, every logged metric equals the uninterrupted ``run_a``'s, bit for bit.
- SIGTERM under ``jax.distributed`` (JAX's preemption service picks the step), then kill -9 while
  that preemption save is being written: the half-written step is ignored with a warning, never
  loaded, and the run resumes from the step before.
- Non-finite losses injected at chosen steps (``trainer.loss_fn`` monkeypatched to multiply the loss
  by NaN at those steps): params and the whole optimizer state stay bit-identical, but the step
  counts, so schedules and Medusa-2's joint stage keep to their global steps; too many in a row
  stop the run with ``NonFiniteError`` and nothing after the last good checkpoint is saved.
- An export killed before its rename leaves the previous export whole.
- Distillation killed with -9 in the middle of a reply record, and stopped by SIGTERM.

The subprocesses load ``random-tiny`` from an HF directory holding the same params and tokenizer
(``tiny_model_dir``): building SmolLM2's tokenizer from its GGUF file takes 15 s per process.
The hooks that pause a save (``_LAUNCH``) and cut a reply record (``_DISTILL``) live here, in the
subprocess's own code, not in the library.

Run time: under two minutes on 2 cores (about a third of it importing JAX in subprocesses).
"""

import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from medusa_jax import checkpoint as ckpt_lib
from medusa_jax import config as config_lib
from medusa_jax import convert
from medusa_jax import data as data_lib
from medusa_jax import loader as loader_lib
from medusa_jax import decode
from medusa_jax import distill
from medusa_jax import preemption
from medusa_jax import prompts as prompts_lib
from medusa_jax import optim
from medusa_jax import runtime
from medusa_jax import train_data
from medusa_jax import train_log
from medusa_jax import trainer

from conftest import TRAIN_STEPS, load_config, tb_scalars, tiny_train_parts, train_config, without_timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/smollm2_medusa1.py:tiny"
TIMEOUT = 240  # seconds for any subprocess wait; a healthy one needs a tenth of it


# ----------------------------------------------------------------------------------------------
# Subprocesses
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
  """``random-tiny`` saved as an HF directory: the same config, params and tokenizer."""
  cfg, base, tok = convert.load_model("random-tiny")
  path = str(tmp_path_factory.mktemp("random_tiny_hf"))
  convert.save_hf(path, cfg, base)
  tok.save_pretrained(path)
  cfg2, base2, tok2 = convert.load_model(path)
  assert cfg2 == cfg and all(jax.tree.leaves(jax.tree.map(np.array_equal, base, base2)))
  assert data_lib.tokenizer_fingerprint(tok2) == data_lib.tokenizer_fingerprint(tok)
  return path


def _fault_config(data_dir, model_dir, **train):
  c = train_config(data_dir, **train)
  c.model = model_dir
  return c


def _flags(c) -> list[str]:
  """``c`` as command-line overrides of ``CONFIG``."""
  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
  base, want = flat(load_config("smollm2_medusa1").to_dict()), flat(c.to_dict())
  return [f"--config.{k}={v}" for k, v in sorted(want.items()) if base.get(k) != v]


class _Proc:
  """A subprocess whose merged stdout/stderr is read line by line in a thread.

  ``triggers``: (regex, signal) pairs; the reader thread sends the signal as soon as a line
  matches (once per pair), so a process started early is interrupted on time while the test
  process does other work.
  """

  def __init__(self, args, triggers=(), **env):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu", **env}
    self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
    self.lines: list[str] = []
    self._triggers = list(triggers)
    self._queue: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    # Text mode splits at "\r" too, but a line printed after a progress-bar redraw can still share
    # its "line": hence the triggers search, they do not anchor.
    for line in self.proc.stdout:
      for t in [t for t in self._triggers if re.search(t[0], line)]:
        self._triggers.remove(t)
        self.proc.send_signal(t[1])
      self._queue.put(line)
    self._queue.put(None)

  def output(self) -> str:
    return "".join(self.lines)

  def finish(self) -> int:
    """Waits for the end; returns the exit status with all output read."""
    try:
      rc = self.proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      pytest.fail(f"still running after {TIMEOUT} s:\n{self.output()[-4000:]}")
    while (line := self._queue.get(timeout=TIMEOUT)) is not None:
      self.lines.append(line)
    return rc


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Runs ``medusa_jax.train`` as ``python -m`` does, after two test hooks: FAULTS_COORDINATOR starts
# jax.distributed (one process, and with it JAX's preemption service); FAULTS_PAUSE_SAVE_AFTER=N
# makes the save of any step after N stop for good just before Orbax commits it (all files
# written, the step directory not yet renamed into place), after printing a line to say so.
_LAUNCH = """
import os, runpy, sys, time
import jax
if os.environ.get("FAULTS_COORDINATOR"):
  jax.distributed.initialize(os.environ["FAULTS_COORDINATOR"], num_processes=1, process_id=0)
if os.environ.get("FAULTS_PAUSE_SAVE_AFTER"):
  from orbax.checkpoint._src.path import atomicity
  after = int(os.environ["FAULTS_PAUSE_SAVE_AFTER"])
  finalize = atomicity.AtomicRenameTemporaryPath.finalize
  async def paused(self, *args, **kwargs):
    name = self.get_final().name
    if name.isdigit() and int(name) > after:
      print(f"pausing the save of step {name}", flush=True)
      time.sleep(3600)
    return await finalize(self, *args, **kwargs)
  atomicity.AtomicRenameTemporaryPath.finalize = paused
sys.argv[0] = "medusa_jax.train"
runpy.run_module("medusa_jax.train", run_name="__main__", alter_sys=True)
"""


# Long enough that JAX's notice (polled about once a second) arrives well before the end; no
# periodic saves after the first step, so the save that is paused is the preemption's.
_SERVICE_RUN = dict(steps=2000, eval_every=0, log_every=1, checkpoint_every=10000)


@pytest.fixture(scope="session")
def interrupted_runs(data_dir, tiny_model_dir, tmp_path_factory):
  """Both interrupted training runs, started at once: {name: (config, workdir, _Proc)}.

  ``sigterm``: ``python -m medusa_jax.train`` on the shared run's config, sent SIGTERM while step 1's
  evaluation compiles (seconds), so that the next step is the one in progress.
  ``service``: under jax.distributed, sent SIGTERM after step 2 and kill -9 once the save that
  JAX's preemption service asked for is paused before its commit.
  """
  runs = {}
  c = _fault_config(data_dir, tiny_model_dir)
  workdir = str(tmp_path_factory.mktemp("sigterm") / "wd")
  runs["sigterm"] = c, workdir, _Proc(
      [sys.executable, "-m", "medusa_jax.train", "--config", CONFIG, f"--workdir={workdir}", *_flags(c)],
      triggers=[(r"(?<!eval )step 1: loss=", signal.SIGTERM)])
  c = _fault_config(data_dir, tiny_model_dir, **_SERVICE_RUN)
  workdir = str(tmp_path_factory.mktemp("service") / "wd")
  runs["service"] = c, workdir, _Proc(
      [sys.executable, "-c", _LAUNCH, "--config", CONFIG, f"--workdir={workdir}", *_flags(c)],
      triggers=[(r"(?<!eval )step 2: loss=", signal.SIGTERM), (r"pausing the save of step", signal.SIGKILL)],
      FAULTS_COORDINATOR=f"127.0.0.1:{_free_port()}", FAULTS_PAUSE_SAVE_AFTER="1")
  yield runs
  for _, _, p in runs.values():
    if p.proc.poll() is None:
      p.proc.kill()


def _steps(scalars: dict) -> list[int]:
  return sorted({s for _, s in scalars})


def _state(workdir: str, step: int):
  return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "state")))


def _same(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


# ----------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------

def test_sigterm_saves_exits_0_and_the_resumed_run_equals_the_uninterrupted_one(interrupted_runs, run_a):
  c, workdir, p = interrupted_runs["sigterm"]
  assert p.finish() == 0, p.output()[-4000:]
  out = p.output()
  m = re.search(r"Stopped by SIGTERM after step (\d+): saved its checkpoint", out)
  assert m, out[-4000:]
  stopped_at = int(m.group(1))
  assert 1 < stopped_at < TRAIN_STEPS and stopped_at % c.train.checkpoint_every  # not a periodic save
  assert "SIGTERM received" in out
  assert not os.path.exists(os.path.join(workdir, "export"))
  ckpts = ckpt_lib.TrainCheckpoints(workdir, every=4, keep=3, meta=_meta(workdir))
  assert ckpts.latest_step() == stopped_at
  ckpts.close()

  res = trainer.train_and_evaluate(c, workdir)  # the same command again
  assert res["step"] == TRAIN_STEPS and res["stopped"] is None
  before, after = tb_scalars(workdir)
  expected = without_timing(run_a[3])
  assert _steps(before) == list(range(1, stopped_at + 1))
  assert _steps(after) == list(range(stopped_at + 1, TRAIN_STEPS + 1))
  for part in (before, after):
    assert without_timing(part) == {k: expected[k] for k in without_timing(part)}
  # Everything was logged once, except the evaluation of the step it stopped at: saving came first.
  missing = set(expected) - set(before) - set(after)
  assert missing == {k for k in expected if k[0].startswith("eval/") and k[1] == stopped_at}
  assert res["eval"] == run_a[2]["eval"]
  cfg, base, _ = convert.load_model(c.model)
  pa, _ = ckpt_lib.load_export(os.path.join(run_a[1], "export"), cfg, base)
  pb, _ = ckpt_lib.load_export(os.path.join(workdir, "export"), cfg, base)
  assert _same(pa, pb)


def _meta(workdir):
  with open(os.path.join(workdir, "run_meta.json")) as f:
    saved = json.load(f)
  cfg, _, _ = convert.load_model(saved["model"])
  return {"cfg": cfg, "trainable": saved["trainable"], "heads": saved["heads"], "model": saved["model"]}


def test_preemption_service_save_killed_half_way_resumes_from_the_step_before(interrupted_runs, caplog):
  c, workdir, p = interrupted_runs["service"]
  assert p.finish() == -signal.SIGKILL, p.output()[-4000:]
  out = p.output()
  killed_at = int(re.search(r"pausing the save of step (\d+)", out).group(1))
  # JAX's service, not a Python handler, took the SIGTERM and chose the step.
  assert re.search(rf"Reached preemption sync point, step={killed_at}\b", out), out[-4000:]
  assert "SIGTERM received" not in out
  assert 2 < killed_at < c.train.steps
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  assert sorted(n for n in names if n.isdigit()) == ["1"]
  assert any(n.startswith(f"{killed_at}.orbax-checkpoint-tmp") for n in names), names

  with caplog.at_level(logging.WARNING, logger="medusa_jax.checkpoint"):
    ckpts = ckpt_lib.TrainCheckpoints(workdir, every=c.train.checkpoint_every, keep=3, meta=_meta(workdir))
  assert re.search(rf"step {killed_at} .* is incomplete .*ignoring it; the newest complete step is 1", caplog.text)
  assert ckpts.latest_step() == 1
  with pytest.raises(ckpt_lib.CheckpointError, match=rf"step {killed_at} .* is incomplete"):
    ckpts.restore(killed_at, {})
  ckpts.close()

  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]  # the leftover is removed

  # The same command again resumes from step 1 and repeats the lost steps exactly (up to the
  # last one logged before the kill, whose events may not all have reached the killed run's file).
  res = trainer.train_and_evaluate(c, workdir, stop_after=killed_at)
  assert res["step"] == killed_at + 1
  killed, resumed = tb_scalars(workdir)
  assert _steps(killed) == list(range(1, killed_at + 1)) and _steps(resumed) == list(range(2, killed_at + 2))
  assert ({k: v for k, v in without_timing(resumed).items() if k[1] < killed_at} ==
          {k: v for k, v in without_timing(killed).items() if 2 <= k[1] < killed_at})


def test_stop_signals_set_a_flag_a_second_signal_acts_at_once_and_handlers_come_back():
  # Python's own SIGINT handler underneath (an earlier test or library may have left another one).
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    _stop_signals_check()
  finally:
    signal.signal(signal.SIGINT, outer)


def _stop_signals_check():
  before = signal.getsignal(signal.SIGINT)
  with preemption.StopSignals() as stop:
    signal.raise_signal(signal.SIGINT)
    time.sleep(0.01)  # raise_signal: delivered to this (the main) thread, not to one of XLA's
    assert stop.received == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)
      time.sleep(1)
  assert signal.getsignal(signal.SIGINT) is before
  # With JAX's preemption service, SIGINT is handed to it as a SIGTERM (here caught by a stand-in).
  with preemption.StopSignals((signal.SIGTERM,)) as service:
    with preemption.StopSignals((signal.SIGINT,), forward={signal.SIGINT: signal.SIGTERM}):
      signal.raise_signal(signal.SIGINT)
      time.sleep(0.01)
    assert service.received == "SIGTERM"


def test_a_previous_handler_installed_from_c_becomes_the_default_on_exit(monkeypatch):
  """``signal.signal`` reports a handler that C code installed (JAX's preemption service, a native
  library) as None, which it does not accept back: on exit the default action takes its place."""
  real = signal.signal
  calls = []

  def from_c(signum, handler):
    old = real(signum, handler)
    calls.append(handler)
    return None if len(calls) == 1 else old  # the handler it replaced was installed from C

  monkeypatch.setattr(signal, "signal", from_c)
  with preemption.StopSignals((signal.SIGUSR1,)):
    pass
  monkeypatch.undo()
  assert calls[-1] == signal.SIG_DFL and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


class _Killed(Exception):
  pass


def test_an_export_killed_half_way_leaves_the_previous_one_whole(run_a, tmp_path, monkeypatch):
  c, workdir, _, _ = run_a
  cfg, base, _ = convert.load_model(c.model)
  params, hcfg = ckpt_lib.load_export(os.path.join(workdir, "export"), cfg, base)
  export = str(tmp_path / "export")
  ckpt_lib.save_export(export, cfg, hcfg, params, include_base=False, model=c.model)
  changed = {**params, "medusa": {**params["medusa"], "w": params["medusa"]["w"] + 1.0}}
  # Killed after the arrays of the new export are written, before its metadata and the rename.
  real = ckpt_lib._write_json  # pylint: disable=protected-access

  def killed(path, obj):
    if path.endswith("export_meta.json"):
      raise _Killed()
    real(path, obj)

  monkeypatch.setattr(ckpt_lib, "_write_json", killed)
  with pytest.raises(_Killed):
    ckpt_lib.save_export(export, cfg, hcfg, changed, include_base=False, model=c.model)
  assert _same(ckpt_lib.load_export(export, cfg, base)[0], params)
  monkeypatch.setattr(ckpt_lib, "_write_json", real)
  ckpt_lib.save_export(export, cfg, hcfg, changed, include_base=False, model=c.model)  # the leftover is reused
  assert _same(ckpt_lib.load_export(export, cfg, base)[0], changed)
  assert sorted(os.listdir(tmp_path)) == ["export"]


# ----------------------------------------------------------------------------------------------
# Non-finite steps
# ----------------------------------------------------------------------------------------------

def _poison(monkeypatch, steps):
  """Makes the loss (and so every gradient) NaN at these 0-based global steps: ``trainer.loss_fn``,
  which train and eval steps trace, wrapped; jit traces after this, so the patch is in the program."""
  real = trainer.loss_fn

  def poisoned(sc, tparams, frozen, batch, step, teacher_base=None):
    total, metrics = real(sc, tparams, frozen, batch, step, teacher_base)
    total = total * jnp.where(jnp.any(step == jnp.asarray(steps)), jnp.nan, 1.0)
    return total, {**metrics, "loss": total}

  monkeypatch.setattr(trainer, "loss_fn", poisoned)


def test_a_nonfinite_step_leaves_params_and_the_whole_optimizer_state_bit_identical(data_dir, monkeypatch):
  c, _, _, _, split, sc = tiny_train_parts(data_dir)
  tparams, frozen, tx = split.tparams, split.frozen, split.tx
  _poison(monkeypatch, (1,))
  step_fn = jax.jit(lambda state, b: trainer.train_step(sc, tx, state, frozen, b))
  src = data_lib.load_split(data_dir, train_data.dataset_name(c), "train")
  batch = next(loader_lib.make_loader(src, batch_size=2, seq_len=c.train.seq_len, seed=0))
  batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "id"}

  states, metrics = [optim.TrainState(step=jnp.asarray(0), params=tparams, opt_state=tx.init(tparams))], []
  for _ in range(3):
    state, m = step_fn(states[-1], batch)
    states.append(jax.tree.map(np.asarray, state))
    metrics.append(jax.device_get(m))
  assert [int(m["skipped"]) for m in metrics] == [0, 1, 0]
  assert not np.isfinite(metrics[1]["loss"]) and not np.isfinite(metrics[1]["grad_norm"])
  # Params, Adam's moments and its count unchanged by the skipped step; the global step counts it.
  assert _same((states[2].params, states[2].opt_state), (states[1].params, states[1].opt_state))
  assert [int(s.step) for s in states] == [0, 1, 2, 3]
  # The good steps do change the state (the first one's learning rate is 0: only Adam's moments move).
  assert not _same(states[1].opt_state, jax.tree.map(np.asarray, states[0].opt_state))
  assert not _same(states[3].params, states[2].params)
  counts = [int(leaf) for leaf in jax.tree.leaves(states[3].opt_state) if np.ndim(leaf) == 0 and leaf.dtype == np.int32]
  assert counts and set(counts) == {2}, counts  # two updates applied: Adam's bias correction counts those


def test_nonfinite_steps_are_skipped_logged_and_too_many_in_a_row_stop_the_run(data_dir, tmp_path, monkeypatch,
                                                                               capsys):
  # Non-finite at 0-based steps 2, 4 and 5, i.e. the steps logged as 3, 5 and 6; two in a row stop.
  c = train_config(data_dir, steps=8, eval_every=0, checkpoint_every=1, keep_checkpoints=10, max_nonfinite_steps=2)
  _poison(monkeypatch, (2, 4, 5))
  workdir = str(tmp_path / "wd")
  with pytest.raises(train_log.NonFiniteError) as err:
    trainer.train_and_evaluate(c, workdir)
  msg = str(err.value)
  assert "\n" not in msg
  assert re.fullmatch(r"Training stopped at step 6: 2 steps in a row had a non-finite loss or gradient norm "
                      r"\(config\.train\.max_nonfinite_steps=2\); the newest checkpoint \(step 5\) is the last "
                      r"good state\. .*", msg), msg
  out = capsys.readouterr().out
  skipped = re.findall(r"step (\d+): skipped \(loss=nan, grad_norm=nan not finite\).*number (\d+) of the data "
                       r"stream, read from data position (\{.*\}); (\d) skipped in a row", out)
  assert [(int(s), int(n), int(r)) for s, n, _, r in skipped] == [(3, 2, 1), (5, 4, 1), (6, 5, 2)], out
  assert all(json.loads(pos) for _, _, pos, _ in skipped)
  # Step 6 (the second in a row) is not saved; the skipped steps 3 and 5 left the state as it was.
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [1, 2, 3, 4, 5]
  states = {s: _state(workdir, s) for s in range(2, 6)}
  assert _same(states[3], states[2]) and _same(states[5], states[4])
  assert not _same(states[4]["params"], states[3]["params"])
  (scalars,) = tb_scalars(workdir)
  assert [scalars[("train/skipped_steps", s)] for s in range(1, 6)] == [0, 0, 1, 0, 1]


def test_a_skipped_step_delays_neither_the_schedules_nor_the_joint_stage(data_dir, tmp_path, monkeypatch):
  """Medusa-2 (``:full_backbone``, 2 heads-only steps, a 2-step backbone warm-up) with step 0 skipped:
  every group's learning rate is its schedule's at the global step. So the heads' first applied
  update (step 1) moves them (the warm-up's rate is 0 only at step 0), and the backbone's state
  starts at step 2 (rate 0, the warm-up's start) and moves it at step 3, as without the skip; the
  logged rates are those. Evaluation in the heads-only stage reports that stage's objective."""
  c = train_config(data_dir, "smollm2_medusa2", steps=5, eval_every=1, checkpoint_every=1, keep_checkpoints=10)
  c.train.trainable = (("medusa/vocab_ids", None), ("medusa/.*", "heads"), ("base/.*", "backbone"))
  c.train.lora.rank = 0
  H = c.train.heads_only_steps
  assert H == 2 and c.train.backbone_warmup_steps == 2
  _poison(monkeypatch, (0,))
  workdir = str(tmp_path / "wd")
  out = trainer.train_and_evaluate(c, workdir)
  assert out["step"] == 5 and out["skipped_steps"] == 1
  saved = {n: _state(workdir, n)["params"] for n in range(1, 6)}  # after n steps
  _, original, _ = convert.load_model(c.model)
  assert not _same(saved[2]["medusa"], saved[1]["medusa"])
  for n in (1, 2, 3):
    assert _same(saved[n]["base"], jax.tree.map(np.asarray, original)), n
  assert not _same(saved[4]["base"], jax.tree.map(np.asarray, original))

  (scalars,) = tb_scalars(workdir)
  assert scalars[("train/skipped_steps", 1)] == 1
  heads_fn, _ = optim.group_schedules(c.train, c.train.steps)["heads"]
  backbone_fn, start = optim.group_schedules(c.train, c.train.steps)["backbone"]
  assert start == H
  for n in range(1, 6):  # logged after n steps: the rates of 0-based step n - 1
    assert scalars[("train/lr/heads", n)] == pytest.approx(float(heads_fn(n - 1)), rel=1e-6), n
    want = 0.0 if n - 1 < H else float(backbone_fn(n - 1 - H))
    assert scalars[("train/lr/backbone", n)] == pytest.approx(want, rel=1e-6, abs=1e-12), n
  assert scalars[("train/lr/backbone", 4)] > 0
  # Evaluation: the heads loss alone after the heads-only steps, the joint objective after joint ones.
  for n in (1, 2):
    assert scalars[("eval/loss", n)] == pytest.approx(scalars[("eval/heads_loss", n)], rel=1e-6)
    assert ("eval/lm/kl", n) not in scalars and scalars[("eval/lambda0", n)] == 1.0
  assert ("eval/lm/kl", 3) in scalars


def test_nonfinite_streaks_are_counted_across_fetches():
  """The loop hands over one flag per step and fetches them in windows (log and save steps)."""
  guard = train_log.NonFiniteSteps(limit=3)
  metrics = lambda bad: {"skipped": jnp.asarray(int(bad)), "loss": jnp.asarray(np.nan if bad else 1.0),
                         "grad_norm": jnp.asarray(np.nan if bad else 1.0)}
  for step, bad in enumerate([0, 1, 1, 0, 1, 1], start=1):
    guard.add(step, {"next_index": step}, metrics(bad))
  assert guard.check(lambda: 4) == 4 and guard.streak == 2
  guard.add(7, {"next_index": 7}, metrics(False))
  assert guard.check(lambda: 4) == 0 and guard.streak == 0
  for step in (8, 9):
    guard.add(step, {"next_index": step}, metrics(True))
  assert guard.check(lambda: 7) == 2
  guard.add(10, {"next_index": 10}, metrics(True))
  with pytest.raises(train_log.NonFiniteError, match=r"step 10: 3 steps in a row .*\(step 7\)"):
    guard.check(lambda: 7)
  assert guard.total == 7


# ----------------------------------------------------------------------------------------------
# Distillation
# ----------------------------------------------------------------------------------------------

def _distill_config(model_dir, tmp_path, num_prompts=6):
  c = config_lib.default_config()
  c.model = model_dir
  c.distill.update(dict(num_prompts=num_prompts, num_eval_prompts=0, batch_size=2, max_new_tokens=8,
                        max_prompt_len=128))
  c.data.data_dir = str(tmp_path / "data")
  c.data.max_len = 160
  return c


def _fake_generate(decoder, params, prompts, batch_size, rng, on_batch=None):
  """``decode.batched_generate`` without a model: batch n replies with token 100 + n."""
  del decoder, params, rng
  for n, start in enumerate(range(0, len(prompts), batch_size)):
    if on_batch:
      on_batch(n)
    idx = list(range(start, min(start + batch_size, len(prompts))))
    yield idx, [[100 + n] * 5 for _ in idx]


# Distills with _fake_generate; the replies file's third record (the first of the second batch) is
# cut in the middle: half of it is written and synced, a line says so and the process waits to be killed.
_DISTILL = """
import os, sys, time
from test_faults import _distill_config, _fake_generate
import pathlib
from medusa_jax import decode, distill, prompts, runtime

class Cut:
  def __init__(self, f):
    self.f, self.records = f, 0
  def __enter__(self):
    return self
  def __exit__(self, *exc):
    self.f.close()
  def write(self, s):
    if self.records == 2:
      self.f.write(s[:len(s) // 2])
      self.f.flush()
      os.fsync(self.f.fileno())
      print("cut a record", flush=True)
      time.sleep(3600)
    self.records += 1
    return self.f.write(s)
  def __getattr__(self, name):
    return getattr(self.f, name)

c = _distill_config(sys.argv[1], pathlib.Path(sys.argv[2]))
loaded = runtime.load(c)
decode.batched_generate = _fake_generate
distill.open = lambda path, mode="r", **kw: Cut(open(path, mode, **kw)) if "a" in mode else open(path, mode, **kw)
distill.generate_replies(c, loaded, prompts.select_prompts(c, loaded.tokenizer), sys.argv[3])
"""


def _records(path):
  with open(path, encoding="utf-8") as f:
    text = f.read()
  return text, [json.loads(line) for line in text.split("\n")[:-1]] if text.endswith("\n") else None


def test_kill_9_during_distillation_never_leaves_a_partial_record_that_resume_reads(tiny_model_dir, tmp_path,
                                                                                    monkeypatch, caplog):
  out_dir = str(tmp_path / "replies")
  os.makedirs(out_dir)
  p = _Proc([sys.executable, "-c", _DISTILL, tiny_model_dir, str(tmp_path), out_dir],
            triggers=[(r"cut a record", signal.SIGKILL)], PYTHONPATH=os.path.join(ROOT, "tests"))
  assert p.finish() == -signal.SIGKILL, p.output()[-4000:]
  path = os.path.join(out_dir, distill.REPLIES_FILE)
  text, whole = _records(path)
  assert whole is None and text.count("\n") == 2  # two whole records and half of the third
  with caplog.at_level(logging.WARNING, logger="medusa_jax.distill"):
    got = distill.read_replies(path)
  assert "dropping 1 incomplete line" in caplog.text
  first = [json.loads(line) for line in text.split("\n")[:2]]
  assert list(got.values()) == first
  assert _records(path)[1] == first  # the file now ends after the last whole record

  # Resumed: the other four prompts, appended after the two kept ones.
  c = _distill_config(tiny_model_dir, tmp_path)
  loaded = runtime.load(c)
  monkeypatch.setattr(decode, "batched_generate", _fake_generate)
  prompts = prompts_lib.select_prompts(c, loaded.tokenizer)
  stats = distill.generate_replies(c, loaded, prompts, out_dir)
  assert stats["new"] == 4 and stats["stopped"] is None
  recs = _records(path)[1]
  assert recs[:2] == first and sorted(r["id"] for r in recs) == sorted(p.id for p in prompts)


def test_sigterm_during_distillation_finishes_the_batch_and_stops(tiny_model_dir, tmp_path, monkeypatch, caplog):
  c = _distill_config(tiny_model_dir, tmp_path)
  loaded = runtime.load(c)
  out_dir = str(tmp_path / "replies")
  sigterm = lambda n: os.kill(os.getpid(), signal.SIGTERM) if n == 1 else None
  monkeypatch.setattr(decode, "batched_generate", lambda *a: _fake_generate(*a, on_batch=sigterm))
  before = signal.getsignal(signal.SIGTERM)
  with caplog.at_level(logging.WARNING, logger="medusa_jax.distill"):
    assert distill.distill(c, loaded, out_dir) is None  # no dataset yet
  assert signal.getsignal(signal.SIGTERM) is before
  assert re.search(r"Stopped by SIGTERM: 4 of 6 replies are on disk in .*run the same command again", caplog.text)
  path = os.path.join(out_dir, distill.REPLIES_FILE)
  assert len(_records(path)[1]) == 4  # the batch in progress when the signal came was finished
  with pytest.raises(FileNotFoundError):
    data_lib.dataset_metadata(c.data.data_dir, prompts_lib.distilled_dataset_name(c))
