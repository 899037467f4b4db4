"""Test setup: 8 simulated CPU devices, set before JAX initialises its backends."""

import os

# The tests' programs are small and most are compiled once, so compiling is much of a cold run
# (CI starts with an empty compilation cache): XLA's backend optimisation level 0 compiles them
# faster (tests/test_models.py cold, side by side: 316 s -> 225 s; its APEM tests 165 s -> 93 s).
# The tests check results, not speed (benchmarks/ measure speed at XLA's default level). The
# processes the tests start inherit both flags (tests/xla_env.py for those with other devices).
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Identical computations (the same tiny model in many tests, in both xdist workers and in the
# subprocesses the tests start) are compiled once: JAX's persistent compilation cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
