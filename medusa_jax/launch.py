r"""Runs one command as N JAX processes on this machine: a pod slice's program, tried locally.

  python -m medusa_jax.launch -n 2 --devices_per_process 2 -- \
      python -m medusa_jax.train --config configs/smollm2_medusa1.py:tiny --workdir runs/pod
  python -m medusa_jax.launch -n 1 --devices_per_process 4 -- python -m medusa_jax.train ...  # the reference

Every process gets what each host of a TPU pod slice or a multi-host GPU job gets: the same command,
its own devices, and the coordinator's address. Here that is

- ``JAX_COORDINATOR_ADDRESS=localhost:PORT`` (a free port), ``JAX_NUM_PROCESSES=N`` and
  ``JAX_PROCESS_ID=i``, which ``sharding.maybe_initialize_distributed`` passes to
  ``jax.distributed.initialize`` (JAX reads only the first of the three by itself);
- ``--config.mesh.distributed_init=always`` appended to a command that takes ``--config``;
- devices: on CPU (the default) ``--xla_force_host_platform_device_count=D`` fake devices per
  process, their collectives over gloo (``JAX_CPU_COLLECTIVES_IMPLEMENTATION``); with
  ``--platform gpu``, GPUs ``i*D .. i*D+D-1`` (``JAX_LOCAL_DEVICE_IDS``, which JAX turns into the
  process's visible devices).

``-n 1`` runs the command alone on its D devices with no ``jax.distributed`` at all
(``distributed_init=never``): the one-process run that an N-process run must agree with.

Each output line is prefixed with its process id (``[0] step 2: loss ...``); ``--log_dir`` also
keeps every process's stdout and stderr in files. The launcher's first lines name each process's
pid (``[launch] process 1: pid 1234``), so one process can be sent a signal on its own.

Nothing is left behind: each process runs in its own process group (anything it starts too) and
is killed with SIGKILL when the kernel sees the launcher die (``PR_SET_PDEATHSIG``). When one
process fails (a nonzero exit, or killed), the others would wait for it in their next collective
until JAX's heartbeat timeout: they are killed at once, and the launcher exits with the failed
one's status. ``--timeout`` kills all of them and exits 124. A SIGTERM or SIGINT to the launcher is
passed to every process (on a pod slice, a preemption notice reaches every host): with JAX's
preemption service they agree on a step, save a checkpoint and exit; a second one, or ``--grace``
seconds without them exiting, kills them.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time

EXIT_TIMEOUT = 124
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def free_port() -> int:
  """A TCP port nobody listens on now (the OS picks it; the coordinator binds it moments later)."""
  with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _with_config_flag(cmd: list[str], value: str) -> list[str]:
  """``cmd`` with ``--config.mesh.distributed_init=value`` when it takes a ``--config`` (a medusa_jax
  CLI; absl lets a later override win); any other command is left as it is."""
  if any(a in ("--config", "-config") or a.startswith(("--config=", "-config=")) for a in cmd):
    return cmd + [f"--config.mesh.distributed_init={value}"]
  return cmd


def process_env(i: int, n: int, devices: int, platform: str, port: int, base: dict | None = None) -> dict:
  """The environment of process ``i`` of ``n`` (see the module docstring)."""
  env = dict(os.environ if base is None else base)
  env["PYTHONUNBUFFERED"] = "1"  # lines reach the launcher as they are printed
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS"):
    env.pop(key, None)
  if n > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i))
  if platform == "cpu":
    kept = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
  else:
    ids = ",".join(str(d) for d in range(i * devices, (i + 1) * devices))
    if n > 1:
      env["JAX_LOCAL_DEVICE_IDS"] = ids
    else:  # no jax.distributed.initialize to read JAX_LOCAL_DEVICE_IDS
      env["CUDA_VISIBLE_DEVICES"] = ids
  return env


def _child_setup() -> None:
  # In the child, between fork and exec: its own process group (killpg reaches whatever it starts),
  # and SIGKILL when the launcher dies, however it dies (a SIGKILL to it included).
  os.setsid()
  with contextlib.suppress(Exception):
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Job:
  """N processes of one command; ``wait()`` -> the job's exit status (see the module docstring)."""

  def __init__(self, cmd: list[str], n: int, devices: int, *, platform: str = "cpu", port: int | None = None,
               log_dir: str | None = None, out=None, err=None):
    self.n = n
    self.out, self.err = out or sys.stdout, err or sys.stderr
    self._lock = threading.Lock()
    self.port = port or free_port()
    cmd = _with_config_flag(list(cmd), "always" if n > 1 else "never")
    self.procs: list[subprocess.Popen] = []
    self._threads: list[threading.Thread] = []
    self._logs = []
    if log_dir:
      os.makedirs(log_dir, exist_ok=True)
    try:
      for i in range(n):
        self.procs.append(subprocess.Popen(cmd, env=process_env(i, n, devices, platform, self.port),
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           preexec_fn=_child_setup))
    except BaseException:
      self.kill()
      raise
    for i, p in enumerate(self.procs):
      self._say(f"[launch] process {i}: pid {p.pid}")
      for stream, dest, name in ((p.stdout, self.out, "stdout"), (p.stderr, self.err, "stderr")):
        log = open(os.path.join(log_dir, f"process_{i}.{name}"), "wb") if log_dir else None
        self._logs.append(log)
        t = threading.Thread(target=self._pump, args=(i, stream, dest, log), daemon=True)
        t.start()
        self._threads.append(t)

  def _say(self, line: str, dest=None) -> None:
    with self._lock:
      dest = dest or self.out
      dest.write(line + "\n")
      dest.flush()

  def _pump(self, i: int, stream, dest, log) -> None:
    for raw in iter(stream.readline, b""):
      if log is not None:
        log.write(raw)
        log.flush()
      self._say(f"[{i}] " + raw.decode("utf-8", "replace").rstrip("\r\n"), dest)
    stream.close()

  def signal_all(self, sig) -> None:
    for p in self.procs:
      if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(p.pid, sig)

  def kill(self) -> None:
    """SIGKILL to every process group (what a process started goes with it); reaps them."""
    for p in self.procs:
      with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
    for p in self.procs:
      with contextlib.suppress(Exception):
        p.wait(timeout=10)

  def wait(self, timeout: float | None = None, grace: float = 30.0) -> int:
    """Waits for every process; the job's exit status (0, the first failure's, or 124 on timeout)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    stop = {"signals": 0, "since": None}

    def on_signal(signum, frame):
      del frame
      stop["signals"] += 1
      if stop["signals"] == 1:
        stop["since"] = time.monotonic()
        self._say(f"[launch] {signal.Signals(signum).name}: passed to every process "
                  f"(again, or {grace:.0f} s, kills them)", self.err)
        self.signal_all(signum)
    previous = {}
    if threading.current_thread() is threading.main_thread():
      previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
      while True:
        codes = [p.poll() for p in self.procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
          i, c = failed[0]
          what = f"was killed by {signal.Signals(-c).name}" if c < 0 else f"exited with status {c}"
          if any(code is None for code in codes):
            self._say(f"[launch] process {i} {what}: killing the others", self.err)
          status = 128 - c if c < 0 else c
          break
        if all(c == 0 for c in codes):
          break
        if deadline is not None and time.monotonic() > deadline:
          self._say(f"[launch] timed out after {timeout:.0f} s: killing every process", self.err)
          status = EXIT_TIMEOUT
          break
        if stop["signals"] > 1 or (stop["since"] is not None and time.monotonic() - stop["since"] > grace):
          self._say("[launch] stopping: killing every process", self.err)
          status = 128 + signal.SIGTERM
          break
        time.sleep(0.05)
    finally:
      self.kill()
      for t in self._threads:
        t.join(timeout=5)
      for log in self._logs:
        if log is not None:
          log.close()
      for s, h in previous.items():
        signal.signal(s, h)
    return status


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  if "--" not in argv:
    raise SystemExit("usage: python -m medusa_jax.launch [-n N] [--devices_per_process D] ... -- COMMAND ...")
  cut = argv.index("--")
  p = argparse.ArgumentParser(prog="python -m medusa_jax.launch",
                              description="Runs COMMAND as N JAX processes on this machine (see the module docstring).")
  p.add_argument("-n", "--num_processes", type=int, default=2)
  p.add_argument("--devices_per_process", type=int, default=1)
  p.add_argument("--platform", choices=("cpu", "gpu"), default="cpu",
                 help="cpu: fake CPU devices with gloo collectives; gpu: this machine's GPUs, D per process")
  p.add_argument("--port", type=int, default=0, help="the coordinator's port (default: a free one)")
  p.add_argument("--timeout", type=float, default=None, help="seconds before every process is killed (exit 124)")
  p.add_argument("--grace", type=float, default=30.0,
                 help="seconds the processes get to exit after a SIGTERM/SIGINT to the launcher")
  p.add_argument("--log_dir", default=None, help="also write each process's stdout and stderr here")
  args = p.parse_args(argv[:cut])
  cmd = argv[cut + 1:]
  if not cmd:
    p.error("no command after --")
  if args.num_processes < 1 or args.devices_per_process < 1:
    p.error("-n and --devices_per_process must be at least 1")
  return args, cmd


def main(argv: list[str] | None = None) -> int:
  args, cmd = parse(sys.argv[1:] if argv is None else argv)
  job = Job(cmd, args.num_processes, args.devices_per_process, platform=args.platform, port=args.port or None,
            log_dir=args.log_dir)
  return job.wait(timeout=args.timeout, grace=args.grace)


if __name__ == "__main__":
  sys.exit(main())
