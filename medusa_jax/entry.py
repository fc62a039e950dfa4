"""Running a command-line tool: the project's own errors as one line a person can read.

Every CLI (``train``, ``distill``, ``calibrate``, ``benchmark``, ``generate``, ``fit``) starts with
``entry.run(main)`` instead of ``absl.app.run(main)``. An error the project raises on purpose (an
unknown config key, a bad tree, a missing or foreign checkpoint, a prompt too long, malformed data)
is printed as ``error: <message>`` on stderr and the process exits with status 2. Anything else (a
bug) keeps its traceback. ``--debug`` or ``MEDUSA_JAX_DEBUG=1`` shows the traceback of every error.

An error counts as the project's own when it is raised by code in this package or in ``configs/``,
or while the flags and the config file are parsed (ml_collections reports an unknown override key
from inside its own code). A ``--config`` file that does not exist is reported before parsing:
ml_collections only logs it then, and fails on first use with two chained tracebacks.

``--help`` prints the tool's docstring, its own flags, the shared decoding flags (``cli.py``),
``--config`` and where the config keys are, and exits 0; absl's ``--helpfull`` still lists every flag.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from typing import Callable

from absl import app, flags

DEBUG_ENV = "MEDUSA_JAX_DEBUG"
EXIT_ERROR = 2
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_CONFIGS = os.path.join(os.path.dirname(_PACKAGE), "configs")

flags.DEFINE_bool("debug", False, f"Show the full traceback of an error instead of one line (or set {DEBUG_ENV}=1).")


def _debug() -> bool:
  return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0") or "--debug" in sys.argv[1:]


def _raised_by_us(e: BaseException) -> bool:
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  where = os.path.abspath(tb.tb_frame.f_code.co_filename) if tb is not None else ""
  return where.startswith(_PACKAGE + os.sep) or where.startswith(_CONFIGS + os.sep)


def one_line(e: BaseException) -> str:
  """The message of ``e`` on one line (KeyError's quotes taken off)."""
  msg = str(e)
  if isinstance(e, (KeyError, AttributeError)) and len(msg) > 1 and msg[0] == msg[-1] and msg[0] in "'\"":
    try:  # KeyError quotes its message (ml_collections: "'stepz'\nDid you mean ...")
      msg = ast.literal_eval(msg)
    except (ValueError, SyntaxError):
      pass
  return " ".join(msg.split()) or type(e).__name__


def _flags_error(e: BaseException) -> str:
  """One line for an error while the flags and the config file are parsed."""
  if isinstance(e, flags.Error):
    text = str(e)
    # A config file that raised: absl embeds its traceback; its last line is the error itself.
    raised = re.findall(r"^\s*(?:[\w.]+(?:Error|Exception)): (.+)$", text, flags=re.M)
    return raised[-1].strip() if raised else " ".join(text.split())
  msg = one_line(e)
  if isinstance(e, (KeyError, AttributeError)):  # an override of a key the config does not have
    m = re.match(r"'?([^' ]+)'?(.*)", msg)
    key, rest = (m.group(1), m.group(2).strip()) if m else (msg, "")
    culprit = next((a.split("=", 1)[0] for a in sys.argv[1:] if a.startswith("--config.")
                    and a.split("=", 1)[0].endswith("." + key)), None)
    msg = f"{culprit or key}: no such config key" + (f"; {rest[0].lower()}{rest[1:]}" if rest else "")
  return msg


_HELP = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")
_OUR_MODULES = ("medusa_jax.cli", __name__)


def _config_path(argv) -> str | None:
  """The file part of the ``--config`` value (given, or the flag's default), if the tool has one."""
  if "config" not in flags.FLAGS:
    return None
  value = None
  for i, a in enumerate(argv[1:], 1):
    if a in ("--config", "-config"):
      value = argv[i + 1] if i + 1 < len(argv) else None
    elif a.startswith(("--config=", "-config=")):
      value = a.split("=", 1)[1]
  if value is None:
    if flags.FLAGS["config"].default is None:  # no default file: absl says the flag is required
      return None
    try:
      value = ast.literal_eval(flags.FLAGS["config"].default_as_str or "None")
    except (ValueError, SyntaxError):
      return None
  return value.split(":", 1)[0] if isinstance(value, str) and value else None


def _check_config_file(argv) -> None:
  path = _config_path(argv)
  if path is None or os.path.isfile(path):
    return
  where = os.path.relpath(_CONFIGS)
  where = _CONFIGS if where.startswith("..") else where
  known = sorted(f for f in os.listdir(_CONFIGS) if f.endswith(".py")) if os.path.isdir(_CONFIGS) else []
  print(f"error: --config {path}: no such file; the configs are {', '.join(os.path.join(where, f) for f in known)}"
        " (each one's docstring lists its :variants)", file=sys.stderr)
  sys.exit(EXIT_ERROR)


def help_text(argv) -> str:
  """What ``--help`` prints (see the module docstring)."""
  main = sys.modules.get("__main__")
  doc = ((getattr(main, "__doc__", None) or "").strip() + "\n\n") if main is not None else ""
  by_module = flags.FLAGS.flags_by_module_dict()
  sections = []
  for module in (argv[0], *_OUR_MODULES):
    if by_module.get(module):
      title = "shared decoding flags" if module == "medusa_jax.cli" else (
          "error reporting" if module == __name__ else "flags")
      body = flags.FLAGS.module_help(module).strip().split("\n", 1)[1]  # its first line names the module
      sections.append(f"{title}:\n{body}")
  return (f"{doc}" + "\n\n".join(sections) + "\n\nconfig keys: medusa_jax/config.py default_config(); override "
          "any with --config.<key>=value (e.g. --config.train.steps=100, --config.decode.max_new_tokens=64).\n"
          "--helpfull lists every flag, absl's and the libraries' included.")


def _parse_flags(argv):
  if any(a in _HELP for a in argv[1:]):
    try:
      print(help_text(argv), flush=True)
    except BrokenPipeError:  # `--help | head`: the reader has what it wanted
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
    sys.exit(0)
  if not _debug():
    _check_config_file(argv)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if _debug():
      raise
    # One line, as every error of ours: the pointer rides on it.
    print(f"error: {_flags_error(e)} (--help lists the flags, a config file's docstring its variants)",
          file=sys.stderr)
    sys.exit(EXIT_ERROR)


def run(main: Callable) -> None:
  """``absl.app.run(main)`` with one-line errors (see the module docstring)."""
  try:
    app.run(main, flags_parser=_parse_flags)
  except (SystemExit, KeyboardInterrupt):
    raise
  except Exception as e:  # pylint: disable=broad-except
    if _debug() or not _raised_by_us(e):
      raise
    print(f"error: {one_line(e)}", file=sys.stderr)
    sys.exit(EXIT_ERROR)
