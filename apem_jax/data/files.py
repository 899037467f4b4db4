"""Files written through a temporary name take the mode a plain ``open``/``mkdir`` would give.

``tempfile.mkstemp`` creates 0600 and ``mkdtemp`` 0700, and the rename that publishes them keeps
that mode: a prepared data directory, a Census split file or an export would be unreadable to the
other users of a shared directory (and to a server running as another user).
"""

from __future__ import annotations

import os


def umask() -> int:
  """The process's umask (read by setting it, then setting it back)."""
  mask = os.umask(0)
  os.umask(mask)
  return mask


def give_default_mode(path: str | os.PathLike, directory: bool) -> None:
  """Sets ``path``'s mode to ``0o777`` (a directory) or ``0o666`` (a file) less the umask."""
  os.chmod(path, (0o777 if directory else 0o666) & ~umask())
