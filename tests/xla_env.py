"""The tests' XLA compiler settings, and the environment of a process that a test starts with its
own number of simulated CPU devices."""

import os
import re

# What tests/conftest.py adds to XLA_FLAGS for every test process (why: there; measured by
# benchmarks/compile_flags.py).
COMPILER_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\d+")


def with_devices(count: int, **extra: str) -> dict[str, str]:
  """``os.environ`` (plus ``extra``) whose XLA_FLAGS give ``count`` CPU devices; its other XLA
  flags (the compiler settings tests/conftest.py sets) are kept."""
  flags = _DEVICE_COUNT.sub("", os.environ.get("XLA_FLAGS", "")).split()
  flags.append(f"--xla_force_host_platform_device_count={count}")
  return dict(os.environ, XLA_FLAGS=" ".join(flags), **extra)
