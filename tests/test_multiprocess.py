"""Two JAX processes on this machine against one: training, data shards, checkpoints, preemption, decoding.

Every run here goes through ``medusa_jax.launch``: 2 processes x 2 fake CPU devices, collectives
over gloo, ``jax.distributed`` initialised from the launcher's environment, is the pod slice in
small; 1 process x 4 devices (no ``jax.distributed``) is its reference, on the same mesh shape.
The launcher runs each command with a timeout and kills whatever is left, so a failing or hanging
test leaves no process behind.

The runs that the tests share (the ``runs`` fixture, about a minute and a half on 2 idle cores):
1. the train CLI, Medusa-1 (``configs/smollm2_medusa1.py:tiny``, mesh data=2 x fsdp=2) on 2
   processes, preempted: SIGTERM to process 1 alone once process 0 has logged step 1;
2. on 2 processes, its rerun to the end, then Medusa-2 with LoRA (``smollm2_medusa2.py:tiny``'s
   joint stage, mesh data=2 x tensor=2);
3. on 1 process, beside 2: the same Medusa-1 run uninterrupted, a copy of run 1's workdir resumed from its
   preemption checkpoint, and the same Medusa-2 run.
Runs 2 and 3 call ``trainer.train_and_evaluate`` (what the train CLI calls) several times in one
process (``tests/multiprocess_train.py``): a process start costs ~10 s of imports and small
compilations on 2 cores. ``test_multiprocess_benchmark_*`` runs the benchmark CLI on run 2's export.

The model is the ``tiny_chat_dir`` fixture (``:tiny``'s shapes and SmolLM2's tokenizer, as an HF
directory): ``random-tiny`` rebuilds its tokenizer from the bundled GGUF file in every process,
seconds more per process. Rows are not packed (``data.pack=False``): packing is first-fit over each
host's own stream, so which examples a step holds depends on the host count, and the losses could
not be compared. Medusa-1 keeps its config's ``train.cache_hidden``: host 0 computes the
hidden-state cache, host 1 reads it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import CONFIGS, DRAFT_VOCAB, load_config, tb_scalars

ROOT = os.path.dirname(CONFIGS)
TIMEOUT = 240  # seconds per launch; each takes 5-60 on 2 cores shared with other jobs
M1_STEPS = 13  # 4 rows a step: 52 of the 54 examples 2 hosts read per epoch (the 1-host epoch is 55)
M2_STEPS = 3   # all in the joint stage (heads_only_steps=0): a heads-only step is Medusa-1's, and a
               # second stage is one more compilation of the step
M1_MESH = "(('data', 2), ('fsdp', 2), ('tensor', 1))"
M2_MESH = "(('data', 2), ('fsdp', 1), ('tensor', 2))"
PREEMPT_AFTER = 1  # SIGTERM to process 1 once process 0 has logged this step


@dataclasses.dataclass
class Launched:
  status: int
  lines: list[str]

  def of(self, process: int) -> list[str]:
    """What process ``process`` printed (its prefix taken off)."""
    tag = f"[{process}] "
    return [l[len(tag):] for l in self.lines if l.startswith(tag)]

  def text(self) -> str:
    return "".join(self.lines[-80:])


def launch(n: int, devices: int, cmd: list[str], cache: str, on_line=None) -> Launched:
  """``cmd`` under ``medusa_jax.launch`` (its timeout kills every process); ``on_line(line, pids)``
  sees each output line as it comes, ``pids`` the processes' pids by index. ``cache``: JAX's
  persistent compilation cache, so that a rerun on the same devices compiles nothing again."""
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  proc = subprocess.Popen([sys.executable, "-m", "medusa_jax.launch", "-n", str(n), "--devices_per_process",
                           str(devices), "--timeout", str(TIMEOUT), "--", *cmd],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  # The launcher's own timeout ends it; this one covers a launcher that hangs (its processes die with it).
  watchdog = threading.Timer(TIMEOUT + 60, proc.kill)
  watchdog.start()
  lines, pids = [], {}
  try:
    for line in proc.stdout:
      lines.append(line)
      if m := re.match(r"\[launch\] process (\d+): pid (\d+)", line):
        pids[int(m.group(1))] = int(m.group(2))
      if on_line is not None:
        on_line(line, pids)
    proc.wait()
  finally:
    watchdog.cancel()
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return Launched(proc.returncode, lines)


def overrides(data_dir: str, model_dir: str, *, steps: int, mesh: str, **train) -> dict:
  """conftest.train_config's data (64 ShareGPT conversations, a fifth held out), 4 rows a step."""
  return {"model": model_dir, "data.source": "sharegpt", "data.max_examples": 64, "data.heldout_fraction": 0.2,
          "data.data_dir": data_dir, "data.pack": False, "heads.draft_vocab": DRAFT_VOCAB,
          "train.steps": steps, "train.batch_size": 4, "train.lr": 0.01, "train.log_every": 1,
          "train.eval_every": 0, "train.checkpoint_every": 4, "mesh.shape": mesh,
          **{f"train.{k}": v for k, v in train.items()}}


def train_cmd(config: str, workdir: str, flags: dict) -> list[str]:
  """The train CLI."""
  return [sys.executable, "-m", "medusa_jax.train", "--config", os.path.join(CONFIGS, config),
          "--workdir", workdir] + [f"--config.{k}={v}" for k, v in flags.items()]


def runs_cmd(runs: list[tuple[str, str, dict]], path: str) -> list[str]:
  """tests/multiprocess_train.py running ``(config, workdir, overrides)`` one after the other."""
  with open(path, "w") as f:
    json.dump([{"config": os.path.join(CONFIGS, c), "workdir": w, "overrides": o} for c, w, o in runs], f)
  return [sys.executable, os.path.join(ROOT, "tests", "multiprocess_train.py"), path]


def losses(workdir: str, tag: str = "train/loss") -> dict[int, float]:
  """``tag`` by step over every run in ``workdir`` (a resumed run adds the steps after its start)."""
  out = {}
  for run in tb_scalars(workdir):
    out.update({step: v for (t, step), v in run.items() if t == tag})
  return out


def export_arrays(workdir: str, model_dir: str) -> dict[str, np.ndarray]:
  """The export's params (heads, and the backbone when it trained) as flat NumPy arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  from medusa_jax import checkpoint as ckpt_lib, convert  # pylint: disable=g-import-not-at-top
  cfg, base, _ = convert.load_model(model_dir)
  params, _ = ckpt_lib.load_export(os.path.join(workdir, "export"), cfg, base)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def data_item(workdir: str, step: int) -> dict:
  """The data position saved with checkpoint ``step`` (Orbax's JSON item)."""
  with open(os.path.join(workdir, "checkpoints", str(step), "data", "metadata")) as f:
    return json.load(f)


def assert_same_losses(got: dict, want: dict, steps) -> None:
  steps = list(steps)
  assert all(s in got for s in steps), f"steps logged: {sorted(got)}, wanted {steps}"
  # atol: Medusa-2's first joint steps have a loss of 0 (lambda0 ramps from 0, the adapters start at 0).
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=2e-5, atol=1e-6)


def assert_same_params(got: dict, want: dict, atol: float) -> None:
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=atol, err_msg=k)


# ----------------------------------------------------------------------------------------------
# The shared runs
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("mp_jax_cache"))


@pytest.fixture(scope="module")
def runs(data_dir, tiny_chat_dir, cache, tmp_path_factory):
  """The shared runs (see the module docstring): their outputs, workdirs and what run 1 left."""
  root = tmp_path_factory.mktemp("mp_runs")
  dirs = {k: str(root / k) for k in ("pod", "one", "moved", "m2_pod", "m2_one")}
  m1 = ("smollm2_medusa1.py:tiny", overrides(data_dir, tiny_chat_dir, steps=M1_STEPS, mesh=M1_MESH))
  m2 = ("smollm2_medusa2.py:tiny", overrides(data_dir, tiny_chat_dir, steps=M2_STEPS, mesh=M2_MESH,
                                              heads_only_steps=0))
  sent = []

  def preempt(line, pids):
    if not sent and line.startswith(f"[0] step {PREEMPT_AFTER}:"):
      os.kill(pids[1], signal.SIGTERM)  # process 1 alone: a preemption notice to one host of the slice
      sent.append(True)

  out = {"preempted": launch(2, 2, train_cmd(m1[0], dirs["pod"], m1[1]), cache, on_line=preempt)}
  assert out["preempted"].status == 0, out["preempted"].text()
  stopped = [l for l in out["preempted"].of(0) if l.startswith("Stopped by preemption notice after step")]
  assert stopped, out["preempted"].text()
  out["stop"] = stop = int(re.search(r"after step (\d+)", stopped[0]).group(1))
  ckpts = os.path.join(dirs["pod"], "checkpoints")
  out["steps_after_preemption"] = sorted(int(s) for s in os.listdir(ckpts) if s.isdigit())
  out["data_at_stop"] = data_item(dirs["pod"], stop)  # the rerun deletes it (keep_checkpoints)
  out["export_after_preemption"] = os.path.exists(os.path.join(dirs["pod"], "export"))
  shutil.copytree(dirs["pod"], dirs["moved"])  # the same checkpoints, resumed on 1 process
  # Side by side: one process alone leaves a core of the two mostly idle.
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    two = pool.submit(launch, 2, 2, runs_cmd([(m1[0], dirs["pod"], m1[1]), (m2[0], dirs["m2_pod"], m2[1])],
                                             str(root / "two.json")), cache)
    one = pool.submit(launch, 1, 4, runs_cmd([(m1[0], dirs["one"], m1[1]), (m1[0], dirs["moved"], m1[1]),
                                              (m2[0], dirs["m2_one"], m2[1])], str(root / "one.json")), cache)
    out["two"], out["one"] = two.result(), one.result()
  for k in ("two", "one"):
    assert out[k].status == 0, out[k].text()
  out["dirs"], out["model"] = dirs, tiny_chat_dir
  return out


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def test_multiprocess_medusa1_training_matches_one_process(runs):
  """Every step's loss and the exported heads of the 2-process run (preempted and resumed) equal
  the 1-process run's; each host saved its own data position (its shard of the batch)."""
  pod, one = runs["dirs"]["pod"], runs["dirs"]["one"]
  assert_same_losses(losses(pod), losses(one), range(1, M1_STEPS + 1))
  assert_same_params(export_arrays(pod, runs["model"]), export_arrays(one, runs["model"]), atol=2e-5)
  # Written by process 0, holding both hosts' loaders: 2 of the 4 rows each per step.
  assert data_item(pod, M1_STEPS) == {"processes": [
      {"grain": {"next_index": 2 * M1_STEPS}, "shard": [0, 2]}, {"grain": {"next_index": 2 * M1_STEPS}, "shard": [1, 2]}]}
  assert data_item(one, M1_STEPS) == {"grain": {"next_index": 4 * M1_STEPS}, "shard": [0, 1]}


def test_multiprocess_medusa2_lora_training_matches_one_process(runs):
  """Medusa-2 with LoRA on data x tensor (the joint stage: adapters and heads train, under the KL
  loss to the original backbone): the losses, and the export (the adapters merged into the
  backbone, plus the heads), equal the 1-process run's."""
  dirs, model = runs["dirs"], runs["model"]
  for tag in ("train/loss", "train/heads_loss"):
    assert_same_losses(losses(dirs["m2_pod"], tag), losses(dirs["m2_one"], tag), range(1, M2_STEPS + 1))
  a, b = export_arrays(dirs["m2_pod"], model), export_arrays(dirs["m2_one"], model)
  from medusa_jax import convert  # pylint: disable=g-import-not-at-top
  original = convert.load_model(model)[1]["layers_0"]["wq"]
  assert np.abs(a["['base']['layers_0']['wq']"] - original).max() > 1e-4  # the adapters trained
  assert_same_params(a, b, atol=2e-5)


def test_multiprocess_export_is_written_once(runs):
  """Process 0 alone reports the export, and it is complete: no leftovers of another host's copy."""
  two, pod = runs["two"], runs["dirs"]["pod"]
  assert sum(l.startswith("Exported params for decoding") for l in two.of(0)) == 2  # Medusa-1 and -2
  assert not any("Exported" in l or l.startswith("step ") for l in two.of(1))
  assert sorted(os.listdir(os.path.join(pod, "export"))) == ["export_meta.json", "params"]
  assert not glob.glob(os.path.join(pod, "export.*"))


# ----------------------------------------------------------------------------------------------
# Data shards
# ----------------------------------------------------------------------------------------------

def test_multiprocess_hosts_read_disjoint_shards_that_cover_an_epoch(data_dir, tiny_chat_dir, cache, tmp_path):
  """Through the trainer's own placement and loader, each of 2 hosts reads its own half of the
  examples (1 row each per step on a data x tensor mesh): over an epoch none is read twice and
  none is missing but the one an odd count leaves out, packed or not."""
  out = str(tmp_path / "shards")
  cmd = [sys.executable, os.path.join(ROOT, "tests", "multiprocess_shards.py"), "--out", out,
         "--config", os.path.join(CONFIGS, "smollm2_medusa1.py:tiny")] + [f"--config.{k}={v}" for k, v in {
             "model": tiny_chat_dir, "data.source": "sharegpt", "data.max_examples": 64,
             "data.heldout_fraction": 0.2, "data.data_dir": data_dir, "train.batch_size": 2,
             "mesh.shape": M2_MESH}.items()]
  res = launch(2, 2, cmd, cache)
  assert res.status == 0, res.text()
  hosts = []
  for i in range(2):
    with open(os.path.join(out, f"process_{i}.json")) as f:
      hosts.append(json.load(f))
  assert [h["shard"] for h in hosts] == [[0, 2], [1, 2]] and hosts[0]["process_count"] == 2
  n = hosts[0]["examples"]
  for layout in ("unpacked", "packed"):
    read = [[i for batch in h[layout] for i in batch] for h in hosts]
    assert all(len(r) == len(set(r)) == n // 2 for r in read), layout
    assert not set(read[0]) & set(read[1]), layout
    assert len(set(read[0]) | set(read[1])) == n - n % 2
  assert all(len(b) == 1 for b in hosts[0]["unpacked"])  # one row per host and step


# ----------------------------------------------------------------------------------------------
# Checkpoints and preemption
# ----------------------------------------------------------------------------------------------

def test_multiprocess_preemption_stops_every_process_at_one_step(runs):
  """SIGTERM to process 1 alone: JAX's preemption service makes both processes stop after the same
  step S, saving one checkpoint there (each host's own loader at S) and no export; the same command
  run again resumes at S and goes on exactly as the uninterrupted run."""
  pre, stop = runs["preempted"], runs["stop"]
  assert any("SIGTERM caught" in l for l in pre.of(1)) and not any("SIGTERM caught" in l for l in pre.of(0))
  assert PREEMPT_AFTER <= stop < M1_STEPS
  assert runs["steps_after_preemption"][-1] == stop and not runs["export_after_preemption"]
  assert runs["data_at_stop"] == {"processes": [
      {"grain": {"next_index": 2 * stop}, "shard": [0, 2]}, {"grain": {"next_index": 2 * stop}, "shard": [1, 2]}]}
  assert any(l.startswith(f"Resumed from step {stop} ") for l in runs["two"].of(0))
  one = losses(runs["dirs"]["one"])
  run1, run2 = tb_scalars(runs["dirs"]["pod"])
  assert max(s for t, s in run1 if t == "train/loss") == stop
  assert_same_losses({s: v for (t, s), v in run2.items() if t == "train/loss"}, one, range(stop + 1, M1_STEPS + 1))


def test_multiprocess_checkpoint_restores_in_one_process(runs):
  """The 2-process checkpoint resumes in 1 process with 4 devices: the same params and data
  position (the 2 hosts' loaders, translated to 1), so the rest of the run, its losses and its
  export, equal the uninterrupted 1-process run's."""
  stop, moved, one = runs["stop"], runs["dirs"]["moved"], runs["dirs"]["one"]
  assert [l for l in runs["one"].of(0) if l.startswith("Resumed from step")] == [f"Resumed from step {stop} in "
                                                                                  f"{moved}/checkpoints\n"]
  resumed = tb_scalars(moved)[-1]
  assert_same_losses({s: v for (t, s), v in resumed.items() if t == "train/loss"}, losses(one),
                     range(stop + 1, M1_STEPS + 1))
  assert_same_params(export_arrays(moved, runs["model"]), export_arrays(one, runs["model"]), atol=2e-5)


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------

def test_multiprocess_benchmark_decodes_the_tokens_of_one_process(runs, cache, tmp_path, monkeypatch):
  """The benchmark CLI under 2 processes, its model sharded over data x tensor (the batch of 2
  split across the hosts), gives the greedy tokens, vanilla and Medusa, of the same benchmark in
  this one process on one device; process 0 alone prints and writes the results."""
  from medusa_jax import benchmark, runtime  # pylint: disable=g-import-not-at-top
  export, out = os.path.join(runs["dirs"]["pod"], "export"), str(tmp_path / "bench.json")
  decode = {"decode.max_new_tokens": 8, "decode.tree": "chain:3", "model": runs["model"], "mesh.shape": M2_MESH}
  cmd = [sys.executable, "-m", "medusa_jax.benchmark", "--config", os.path.join(CONFIGS, "smollm2_medusa1.py:tiny"),
         "--checkpoint", export, "--modes", "vanilla,medusa", "--num_prompts", "2", "--batch_size", "2",
         "--out", out] + [f"--config.{k}={v}" for k, v in decode.items()]
  res = launch(2, 2, cmd, cache)
  assert res.status == 0, res.text()
  assert any("wrote" in l for l in res.of(0)) and not any("wrote" in l or "tok/s" in l for l in res.of(1))
  with open(out) as f:
    pod = json.load(f)
  # XLA's dots here too: the CPU kernel (one device only) sums in another order, which may flip a near-tie.
  monkeypatch.setenv("MEDUSA_JAX_CPU_KERNELS", "0")
  c = load_config("smollm2_medusa1")
  c.model, c.decode.max_new_tokens, c.decode.tree = runs["model"], 8, "chain:3"
  loaded = runtime.load(c, checkpoint=export)
  prompts = runtime.read_jsonl_prompts("mt_bench", 2)
  ref = benchmark.run(c, prompts, ["vanilla", "medusa"], loaded, batch_size=2)
  for mode in ("vanilla", "medusa"):
    got = [r["tokens"] for r in pod["modes"][mode]["per_prompt"]]
    assert got == [r["tokens"] for r in ref["modes"][mode]["per_prompt"]], mode
    assert all(len(t) == 8 for t in got)


# ----------------------------------------------------------------------------------------------
# The launcher itself
# ----------------------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f"/proc/{pid}/stat") as f:  # a zombie is gone but for its exit status
    return f.read().split(") ")[-1][0] != "Z"


def test_multiprocess_launcher_environment_output_failure_and_timeout(tmp_path):
  """Each process gets its id, the process count, the coordinator and its fake devices; its lines
  come back prefixed with its id; when one fails the others (and what they started) are killed and
  its status is the launcher's; at the timeout every process is killed and the status is 124."""
  script = tmp_path / "child.py"
  script.write_text("""
import os, subprocess, sys, time
env = {k: os.environ.get(k) for k in ("JAX_PROCESS_ID", "JAX_NUM_PROCESSES", "JAX_COORDINATOR_ADDRESS", "XLA_FLAGS")}
print("env", env, flush=True)
print("args", sys.argv[1:], flush=True)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("grandchild", grandchild.pid, flush=True)
if env["JAX_PROCESS_ID"] == "1" and sys.argv[1] == "fail":
  time.sleep(1)
  sys.exit(3)
time.sleep(120)
""")
  pids = lambda res: [int(l.split()[-1]) for l in res.lines if re.match(r"(\[launch\] process \d+: pid|\[\d\] grandchild)", l)]
  res = launch(2, 3, [sys.executable, str(script), "fail", "--config", "x.py"], str(tmp_path / "cache"))
  assert res.status == 3, res.text()
  for i in range(2):
    (env,) = [l for l in res.of(i) if l.startswith("env ")]
    assert f"'JAX_PROCESS_ID': '{i}'" in env and "'JAX_NUM_PROCESSES': '2'" in env
    assert "'JAX_COORDINATOR_ADDRESS': 'localhost:" in env and "xla_force_host_platform_device_count=3" in env
    assert res.of(i)[1] == "args ['fail', '--config', 'x.py', '--config.mesh.distributed_init=always']\n"
  assert any("process 1 exited with status 3: killing the others" in l for l in res.lines)
  assert len(pids(res)) == 4 and not any(_alive(p) for p in pids(res))

  start = time.monotonic()
  res = subprocess.run([sys.executable, "-m", "medusa_jax.launch", "-n", "2", "--timeout", "3", "--", sys.executable,
                        str(script), "wait"], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert res.returncode == 124 and time.monotonic() - start < 30, res.stdout + res.stderr
  ran = [int(l.split()[-1]) for l in res.stdout.splitlines() if re.match(r"(\[launch\] process \d+: pid|\[\d\] grandchild)", l)]
  assert len(ran) == 4 and not any(_alive(p) for p in ran)
