"""What the command lines share: a user's mistake is one line on stderr, not a traceback.

A user error (a bad config value, a workdir or file that is missing, refused or malformed) ends
the command with ``<program>: error: <what is wrong and what was expected>`` and exit status 1;
``--debug`` shows the traceback instead. Anything else is a bug and keeps its traceback. Flags
that do not parse (a value of the wrong type, a ``--config.<key>`` the config does not have) end
the same way.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, Sequence

from absl import flags

from apem_jax.data.census_source import CensusSourceError

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError, FloatingPointError, CensusSourceError)


@contextlib.contextmanager
def user_errors_in_one_line(program: str, debug: bool = False,
                            also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
  """Turns a :data:`USER_ERRORS` exception (or one of ``also``) raised inside into one line and
  exit status 1."""
  try:
    yield
  except USER_ERRORS + also as e:
    if debug:
      raise
    message = " ".join(str(e).split())  # one line, whatever the message's layout
    sys.exit(f"{program}: error: {message}")


def _without_traceback(message: str) -> str:
  """One line of a flag's error: ml_collections puts the traceback of a config file's
  ``get_config`` failing (e.g. ``--config=FILE:nosuch``) inside its message; its last line is the
  error itself."""
  head, sep, trace = message.partition("Traceback (most recent call last):")
  if sep:
    last = [line for line in trace.splitlines() if line.strip()][-1]
    return " ".join(f"{head.strip()} {last.strip()}".split())
  return message


def flags_parser(program: str) -> Callable[[Sequence[str]], list[str]]:
  """A ``flags_parser`` for ``absl.app.run`` that reports a flag that does not parse in one line
  (absl's own parser lets ml_collections' error for an unknown ``--config.<key>`` through as a
  traceback, and a config file that does not load only when the config is first read), and
  refuses arguments that are not flags (absl passes them on, and the programs
  take none: ``--set a=1 b=2`` would drop ``b=2``)."""

  def parse(argv: Sequence[str]) -> list[str]:
    try:
      left = flags.FLAGS(list(argv))
    except flags.Error as e:
      sys.exit(f"{program}: error: {_without_traceback(str(e))} (--helpfull lists the flags)")
    except SyntaxError as e:  # a config file that is not Python
      sys.exit(f"{program}: error: {e.filename}, line {e.lineno}: {e.msg}")
    except (AttributeError, KeyError) as e:  # ml_collections: no such key in the config
      key = str(e).strip("\"'")
      names = [(a, a.split("=")[0].split(".")[1:]) for a in argv if a.startswith("--config.")]
      given = next((a for a, parts in names if parts[-1] == key),  # the key itself, else a
                   next((a for a, parts in names if key in parts), key))  # section of it
      sys.exit(f"{program}: error: {given}: the config has no key {key!r} (the config file and "
               f"apem_jax/models/defaults.py list the keys)")
    for name, value in flags.FLAGS.flag_values_dict().items():
      if type(value).__name__ == "_ErrorConfig":  # ml_collections defers a failed load
        error = object.__getattribute__(value, "_error")
        sys.exit(f"{program}: error: --{name}: {' '.join(str(error).split())}")
    if len(left) > 1:  # absl hands them to main, and no program here reads them
      sys.exit(f"{program}: error: unexpected argument(s) {' '.join(left[1:])!r}: every setting "
               f"is a flag (--name=value), and a repeatable flag takes one value per use "
               f"(--set a=1 --set b=2)")
    return left

  return parse
