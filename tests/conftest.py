"""Test setup: 8 simulated CPU devices, set before JAX initialises its backends."""

import os

import xla_env

# The tests' programs are small and most are compiled once, so compiling is much of a cold run
# (CI starts with an empty compilation cache). XLA's backend optimisation level 0 and XLA:CPU's
# older LLVM emitters instead of its MLIR fusion emitters compile them 5x faster than XLA's
# defaults (2.7x faster than level 0 alone), and their steps run no slower than at level 0: the
# tiny APEM's train step on 8 devices 7.2 s -> 1.5 s, the MLP's 2.0 s -> 0.43 s
# (`python benchmarks/compile_flags.py`, medians of 3 rounds). The tests check results, not
# speed (benchmarks/ measure speed at XLA's defaults). The processes the tests start inherit the
# flags (tests/xla_env.py for those with other devices).
for _flag in ("--xla_force_host_platform_device_count=8", *xla_env.COMPILER_FLAGS):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Identical computations (the same tiny model in many tests, in both xdist workers and in the
# subprocesses the tests start) are compiled once: JAX's persistent compilation cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# TensorFlow (the input pipelines' tf.data, export) imports Keras eagerly only to register Keras
# optimizers for SavedModel loading; the project uses no Keras. TF_USE_LEGACY_KERAS=1 points that
# import at tf_keras, which is not installed, so TensorFlow skips it: 3 s less per process that
# imports TensorFlow (5.2-5.8 s instead of 8.0-8.8 s here), in the tests and the processes they
# start. Keras stays importable; only `tf.keras` would fail, and nothing here uses it.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

# The files that take longest, cold, first (their summed test times in
# `rm -rf .pytest_cache && PYTEST_ADDOPTS=--durations=0 make test` on the 2-core development
# machine, 2026-12-02: 212 s down to 47 s), so that the two workers finish together
# instead of one running a long file alone at the end. The Makefile's --no-loadscope-reorder
# keeps this order (xdist otherwise orders files by their number of tests).
SLOWEST_FIRST = ("test_quality_benchmark.py", "test_trainer.py", "test_parallel.py",
                 "test_models.py", "test_vmap_runs.py", "test_kill_resume.py", "test_examples.py",
                 "test_export.py", "test_funnel.py", "test_balancing.py", "test_models_learn.py",
                 "test_stream.py", "test_user_errors.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
