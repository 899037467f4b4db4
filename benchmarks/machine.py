"""The CPU a benchmark ran on, in words: its results depend on it (XLA compiles for the
instructions it finds, AVX-512 or not), so every table states it."""

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
