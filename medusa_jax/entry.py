"""Running a command-line tool: the project's own errors as one line a person can read.

Every CLI (``train``, ``distill``, ``calibrate``, ``benchmark``, ``generate``, ``fit``) starts with
``entry.run(main)`` instead of ``absl.app.run(main)``. An error the project raises on purpose (an
unknown config key, a bad tree, a missing or foreign checkpoint, a prompt too long, malformed data)
is printed as ``error: <message>`` on stderr and the process exits with status 2. Anything else (a
bug) keeps its traceback. ``--debug`` or ``MEDUSA_JAX_DEBUG=1`` shows the traceback of every error.

An error counts as the project's own when it is raised by code in this package or in ``configs/``,
or while the flags and the config file are parsed (ml_collections reports an unknown override key
from inside its own code).
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


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if _debug():
      raise
    print(f"error: {_flags_error(e)}", file=sys.stderr)
    print("  (--helpfull lists the flags, a config file's docstring its variants; --debug shows the traceback)",
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
