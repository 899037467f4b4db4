"""Two processes on this host (2 CPU devices each, gloo collectives) train like one process.

The test launches ``tests/multiprocess_worker.py`` twice, joined by ``jax.distributed`` on a free
local port, and compares with this (single) process on its 8 devices:

* ``NUM_STEPS`` SGD steps of the same global batches, each process feeding its own rows, in jit and
  pmap mode -> the parameters of one process, ``atol=rtol=1e-5`` (SGD: see test_parallel);
* the jit state, evaluated on the validation split across the processes and saved as an Orbax
  checkpoint by both -> restores here, in one process, to the parameters above, and evaluates to
  the validation AUCs the two processes computed (``abs=1e-6``).

The model is the tiny synthetic config with a small shared-bottom MLP, which compiles quickly.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import chex
import jax
import ml_collections
import numpy as np
import optax
import pytest

from apem_jax import checkpointing, parallel, step as step_lib, trainer
from test_parallel import _fixed_batches
from test_trainer import tiny_config
import xla_env

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
NUM_STEPS = 3


# Shared with the worker processes ---------------------------------------------------------

def config(mode: str = "jit", **train_overrides) -> ml_collections.ConfigDict:
  cfg = tiny_config("shared_bottom")
  cfg.model.update(bottom_hidden=(16,), tower_hidden=(8,))
  cfg.parallel.mode = mode
  cfg.train.update(**train_overrides)
  return cfg


def global_batches(exp: trainer.Experiment) -> list[dict]:
  return _fixed_batches(exp.data.arrays["train"], exp.config.train.batch_size, NUM_STEPS)


def process_rows(mesh, batch_size: int) -> slice:
  """The rows of a global batch that this process feeds (those its devices hold)."""
  index_map = parallel.batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
  starts = sorted({idx[0].start or 0 for idx in index_map.values()})
  stops = sorted({idx[0].stop or batch_size for idx in index_map.values()})
  rows = slice(starts[0], stops[-1])
  assert rows.stop - rows.start == batch_size // jax.process_count(), index_map
  return rows


@contextlib.contextmanager
def sgd():
  """Experiments built inside use plain SGD (exact comparisons across reduction orders)."""
  real = step_lib.make_optimizer
  step_lib.make_optimizer = lambda cfg, total_steps: optax.sgd(0.5)
  try:
    yield
  finally:
    step_lib.make_optimizer = real


# The test ---------------------------------------------------------------------------------

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(outdir: str) -> list[subprocess.Popen]:
  env = xla_env.with_devices(DEVICES_PER_PROCESS, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, os.path.join(HERE, "multiprocess_worker.py"), str(i), str(NUM_PROCESSES),
       str(port), outdir], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(NUM_PROCESSES)]


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[str]:
  deadline, outputs = time.time() + timeout, []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail("multi-process workers timed out:\n" +
                "\n".join(p.communicate()[0][-3000:] for p in procs))
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-5000:]}"
  return outputs


def test_two_processes_match_one(tmp_path):
  procs = _launch(str(tmp_path))
  try:
    # Meanwhile, the same steps in this one process (8 devices).
    with sgd():
      exp = trainer.Experiment(config("jit"))
      ref = exp.init_state()
      for batch in global_batches(exp):
        ref, _ = exp.train_step(ref, exp.device_batch(batch))
    ref_params = jax.tree.map(np.asarray, ref.params)
    expected = {jax.tree_util.keystr(p): x
                for p, x in jax.tree_util.tree_flatten_with_path(ref_params)[0]}
  finally:
    outputs = _wait(procs, timeout=240)
  assert all(f"process {i}: done" in out for i, out in enumerate(outputs)), outputs

  for mode in ("jit", "pmap"):
    for i in range(NUM_PROCESSES):
      with np.load(tmp_path / f"params_{mode}_{i}.npz") as f:
        got = dict(f)
      assert got.keys() == expected.keys()
      chex.assert_trees_all_close(got, expected, atol=1e-5, rtol=1e-5,
                                  custom_message=f"{mode}, process {i}")

  # The checkpoint the two processes wrote together restores and evaluates here.
  ckpt = checkpointing.Checkpoints(str(tmp_path / "run"), read_only=True)
  state, meta = ckpt.restore(exp.abstract_state)
  ckpt.close()
  assert int(state.step) == meta["step"] == NUM_STEPS
  chex.assert_trees_all_close(jax.tree.map(np.asarray, state.params), ref_params, atol=1e-5,
                              rtol=1e-5)
  for task, m in exp.evaluate(state, "validation").items():
    assert m["examples"] == meta["validation"][task]["examples"] == 240
    assert m["auc"] == pytest.approx(meta["validation"][task]["auc"], abs=1e-6)
