"""Two processes train a spec dataset on the streamed path like one process does.

The test prepares test_stream's funnel (10 training shards of 48 rows), then launches this file
twice as a worker (``python tests/test_stream_multiprocess.py PROCESS_ID PORT DIR``), joined by
``jax.distributed`` on a free local port (2 CPU devices each, gloo collectives). Each worker runs
``trainer.train_and_evaluate`` with ``data.stream_groups=2``: process ``i`` reads the rows
of row group ``i`` only. Meanwhile this process (8 devices) trains the same config alone: with 2
row groups its global batches are the 2-process run's (same rows, same order), so the final
parameters agree to 1e-5. Plain SGD (test_multiprocess.sgd), as in test_multiprocess: Adam's
first steps divide by the gradients' own magnitude and turn the reduction-order round-off of
near-zero gradients into parameter differences of the learning rate's size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":
  sys.path[:0] = [os.path.dirname(HERE), HERE]

import jax  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2


def config(directory: str) -> ml_collections.ConfigDict:
  from test_trainer import tiny_config  # pylint: disable=g-import-not-at-top
  cfg = tiny_config("shared_bottom")
  cfg.model.update(bottom_hidden=(16,), tower_hidden=(8,))
  cfg.data = ml_collections.ConfigDict(dict(
      name="spec", spec=os.path.join(directory, "spec.json"),
      data_dir=os.path.join(directory, "cache"), shard_rows=48, stream_groups=2,
      shuffle_buffer=200))
  cfg.train.update(batch_size=96, eval_batch_size=32, num_epochs=2, log_every=5)
  return cfg


def worker(process_id: int, port: int, directory: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", NUM_PROCESSES, process_id,
                             initialization_timeout=120)
  from apem_jax import trainer  # pylint: disable=g-import-not-at-top
  import test_multiprocess  # pylint: disable=g-import-not-at-top
  with test_multiprocess.sgd():
    summary = trainer.train_and_evaluate(config(directory), os.path.join(directory, "run2"))
  exp_groups = trainer.load_dataset(config(directory).data)._groups(96)  # pylint: disable=protected-access
  print(f"process {process_id}: done, {summary['steps']} steps, row groups "
        f"{list(exp_groups[1])} of {exp_groups[0]}", flush=True)


# The test ---------------------------------------------------------------------------------

def test_two_processes_stream_their_own_files_and_train_like_one(tmp_path):
  import chex  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  from apem_jax import checkpointing, trainer  # pylint: disable=g-import-not-at-top
  from apem_jax.data import prepare  # pylint: disable=g-import-not-at-top
  import test_multiprocess  # pylint: disable=g-import-not-at-top
  import xla_env  # pylint: disable=g-import-not-at-top
  from test_prepare import base_spec, make_rows, write_csv, write_spec  # pylint: disable=g-import-not-at-top

  rows = make_rows()
  for i, row in enumerate(rows):
    if i % 7 == 3:
      row["w"] = "0"
  write_csv(tmp_path / "events.csv", rows)
  write_spec(tmp_path, base_spec())
  cfg = config(str(tmp_path))
  prepare.load_spec_dataset(cfg.data)  # prepared once, before the workers start

  env = xla_env.with_devices(DEVICES_PER_PROCESS, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  port = test_multiprocess._free_port()  # pylint: disable=protected-access
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(i), str(port),
                             str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(NUM_PROCESSES)]
  try:
    with test_multiprocess.sgd():
      one = trainer.train_and_evaluate(cfg, str(tmp_path / "run1"))
  finally:
    outputs = test_multiprocess._wait(procs, timeout=240)  # pylint: disable=protected-access
  for i, out in enumerate(outputs):
    assert f"process {i}: done, 10 steps, row groups [{i}] of 2" in out, out[-3000:]

  with open(tmp_path / "run2" / "metrics.json") as f:
    two = json.load(f)
  assert two["steps"] == one["steps"] == 10

  def latest(workdir):
    with test_multiprocess.sgd():  # the optimizer state the runs saved
      exp = trainer.Experiment(cfg)
    ckpt = checkpointing.Checkpoints(str(workdir), read_only=True)
    state, meta = ckpt.restore(exp.abstract_state, checkpointing.LATEST)
    ckpt.close()
    return exp, state, meta

  exp, state1, _ = latest(tmp_path / "run1")
  _, state2, meta2 = latest(tmp_path / "run2")
  assert meta2["step"] == 10
  chex.assert_trees_all_close(jax.tree.map(np.asarray, state2.params),
                              jax.tree.map(np.asarray, state1.params), atol=1e-5, rtol=1e-5)
  # The validation metrics the two processes computed (each its rows, gathered) are those one
  # process computes on the same checkpoint, and those of the one-process run.
  for task, m in exp.evaluate(state2, "validation").items():
    for run in (two, one):
      recorded = run["history"][-1]["validation"][task]
      assert m["examples"] == recorded["examples"] == 60
      assert m["auc"] == pytest.approx(recorded["auc"], abs=1e-5)
      assert m["logloss"] == pytest.approx(recorded["logloss"], abs=1e-5)


if __name__ == "__main__":
  worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
