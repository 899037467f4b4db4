"""The machine a benchmark runs on: its CPU, in words (results depend on it: XLA compiles for the
instructions it finds, AVX-512 or not, so every table states it), and the process's own peak
memory."""

from __future__ import annotations

import os
import platform


def _cpuinfo() -> dict[str, str]:
  """The first processor's entries of /proc/cpuinfo (empty where there is none)."""
  try:
    with open("/proc/cpuinfo") as f:
      block = f.read().split("\n\n", 1)[0]
  except OSError:
    return {}
  return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}


def cpu_name() -> str:
  return _cpuinfo().get("model name") or platform.processor() or "unknown CPU"


def describe() -> str:
  """e.g. 'AMD EPYC, 2 cores, AVX-512' or 'Intel(R) Xeon(R) Processor, 2 cores, no AVX-512'."""
  flags = _cpuinfo().get("flags", "").split()
  isa = "" if not flags else (", AVX-512" if "avx512f" in flags else ", no AVX-512")
  return f"{cpu_name()}, {os.cpu_count()} cores{isa}"


def peak_rss_mb() -> float:
  """This process's own peak resident set size in MiB: ``VmHWM`` of ``/proc/self/status``.

  Not ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: Linux keeps a process's ``ru_maxrss``
  across ``exec`` and a forked child starts from its parent's, so a child started by a process
  holding 2 GB reports at least 2 GB whatever it uses itself. ``ru_maxrss`` is the fallback where
  there is no ``/proc``.
  """
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  import resource  # pylint: disable=g-import-not-at-top
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
