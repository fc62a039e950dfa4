"""Stop requests: SIGTERM / SIGINT become "finish this unit of work, make it durable, exit 0".

A preemptible VM (a TPU VM pod, a spot instance) gets a SIGTERM and loses its process shortly
after. Without a handler SIGTERM kills Python at once and everything since the last periodic
checkpoint is lost; SIGINT (Ctrl-C) raises KeyboardInterrupt wherever the program happens to be.
Here both only set a flag, which the loop reads at its next safe point (the end of a train step,
the end of a distillation batch). A second signal does what the first would have done without us,
so a user who presses Ctrl-C twice still gets out at once.

Training has two paths (``TrainStop``):

- One process, no ``jax.distributed``: a plain Python signal handler; the loop stops after the step
  in which the signal arrived.
- ``jax.distributed`` with JAX's preemption service (on by default, ``jax_enable_preemption_service``):
  the service owns SIGTERM (its C++ handler tells the coordinator, which picks the first step that
  every host can still reach), and each host asks ``reached_preemption(step)`` at every step
  through Orbax's ``CheckpointManager``, so all hosts stop and save at the same step. A Python
  SIGTERM handler would replace the service's, so none is installed; SIGINT is forwarded to the
  service as a SIGTERM to this process, which makes a Ctrl-C on one host a preemption of all.
  The service runs on CPU too: ``tests/test_multiprocess.py`` preempts one of two processes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable

_log = logging.getLogger("medusa_jax.preemption")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _restorable(handler):
  """``handler`` as ``signal.signal`` accepts it back. A handler installed from C (not from Python)
  reads as None and Python cannot reinstall it: the default action takes its place, so a later stop
  signal still stops the process instead of setting a flag no loop reads any more."""
  return signal.SIG_DFL if handler is None else handler


class StopSignals:
  """A context that turns ``signals`` into a flag: ``received`` is the first one's name, or None.

  Handlers can only be installed from the main thread; elsewhere (a notebook's worker thread)
  this is a no-op and signals keep their usual effect. ``forward`` maps a signal to another one
  that is then sent to this process as well (SIGINT -> SIGTERM, for JAX's preemption service).
  """

  def __init__(self, signals=STOP_SIGNALS, forward: dict | None = None):
    self.signals = tuple(signals)
    self.forward = dict(forward or {})
    self.received: str | None = None
    self._previous: dict = {}

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._previous.items():
      signal.signal(s, _restorable(h))
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    if self.received is not None:
      # Asked twice: give the signal its usual effect now (KeyboardInterrupt / termination).
      signal.signal(signum, _restorable(self._previous.pop(signum, signal.SIG_DFL)))
      signal.raise_signal(signum)
      return
    self.received = signal.Signals(signum).name
    _log.warning("%s received: stopping after the current unit of work (send it again to stop at once).",
                 self.received)
    if signum in self.forward:
      os.kill(os.getpid(), self.forward[signum])


def preemption_service_active() -> bool:
  """Whether JAX's preemption service runs in this process (``jax.distributed`` with it enabled)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class TrainStop:
  """Decides, at the end of each train step, whether to save and stop: ``reached(step)``.

  ``reached_preemption`` is Orbax's ``CheckpointManager.reached_preemption`` (JAX's
  ``multihost_utils.reached_preemption_sync_point``); it must be called by every host at every
  step with the same step number, and it is (``reached`` calls it unconditionally on that path).
  With several processes but no preemption service nothing is installed: hosts stopping on their
  own signals would stop at different steps and hang in the save; such a run resumes from its
  last periodic checkpoint, as without this class.
  """

  def __init__(self, reached_preemption: Callable[[int], bool], process_count: int):
    self._reached_preemption = reached_preemption
    self.service = preemption_service_active()
    if self.service:
      self.signals = StopSignals((signal.SIGINT,), forward={signal.SIGINT: signal.SIGTERM})
    elif process_count == 1:
      self.signals = StopSignals()
    else:
      _log.warning("%d processes without JAX's preemption service (jax_enable_preemption_service): a "
                   "SIGTERM is not turned into a checkpoint.", process_count)
      self.signals = StopSignals(())

  def __enter__(self) -> "TrainStop":
    self.signals.__enter__()
    return self

  def __exit__(self, *exc) -> None:
    self.signals.__exit__(*exc)

  def reached(self, step: int) -> str | None:
    """Why to stop after ``step`` (a signal's name or 'preemption notice'), or None to go on."""
    if self.service:
      return "preemption notice" if self._reached_preemption(step) else None
    return self.signals.received
