"""What machine this is, for the records every measurement carries (a leaf: imports only jax)."""

from __future__ import annotations

import os
import platform
import subprocess

import jax


def cpu_model() -> str:
  """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def commit() -> str | None:
  """The git commit of the checkout this package runs from (None outside a git checkout)."""
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(__file__),
                         capture_output=True, text=True, timeout=5)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None if out.returncode == 0 else None


def info() -> dict:
  """Platform, device kind and count, CPU model and cores, jax version, commit."""
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
          "cpu": cpu_model(), "cpu_count": os.cpu_count(), "jax": jax.__version__, "commit": commit()}


def describe(hw: dict | None = None) -> str:
  hw = hw or info()
  return (f"{hw['device_count']}x {hw['device_kind']} ({hw['cpu']}, {hw['cpu_count']} cores)"
          + (f", commit {hw['commit']}" if hw.get("commit") else ""))
