"""One process of a multi-process run on this host, for tests/test_multiprocess.py.

python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUTDIR

The caller sets XLA_FLAGS (devices per process) and JAX_PLATFORMS=cpu. The process joins the run
through ``jax.distributed.initialize`` (CPU collectives: gloo), then

1. trains ``NUM_STEPS`` steps of the fixed global batches of ``test_multiprocess`` in the jit and
   the pmap mode through ``trainer.Experiment``, feeding only this process's rows, and writes the
   final parameters to ``OUTDIR/params_<mode>_<process>.npz``;
2. evaluates the jit state on the validation split (each process reads its rows, predictions are
   gathered across processes) and saves it, with the metrics, as an Orbax checkpoint of
   ``OUTDIR/run`` (both processes write their part; ``trainer.train_and_evaluate`` does the
   same, and is left out only because importing TensorFlow for its input pipeline takes long).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import jax  # pylint: disable=g-import-not-at-top


def main(process_id: int, num_processes: int, port: int, outdir: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes, process_id,
                             initialization_timeout=120)
  import numpy as np
  from apem_jax import checkpointing, trainer
  import test_multiprocess as spec  # the config, batches and optimizer the test compares against

  assert jax.process_count() == num_processes and jax.process_index() == process_id
  with spec.sgd():
    experiments = {mode: trainer.Experiment(spec.config(mode)) for mode in ("pmap", "jit")}
    batches = spec.global_batches(experiments["jit"])
    initial = experiments["jit"].init_state()
    for mode, exp in experiments.items():  # pmap first: the jit step donates `initial`
      rows = spec.process_rows(exp.mesh, batches[0]["weight"].shape[0])
      state = exp.to_train(initial)
      for batch in batches:
        state, _ = exp.train_step(state, exp.device_batch({k: v[rows] for k, v in batch.items()}))
      state = exp.from_train(state)
      flat = {jax.tree_util.keystr(p): np.asarray(x)
              for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
      np.savez(os.path.join(outdir, f"params_{mode}_{process_id}.npz"), **flat)

  # `state` and `exp` are now the jit mode's.
  metrics = exp.evaluate(state, "validation")
  ckpt = checkpointing.Checkpoints(os.path.join(outdir, "run"))
  step = int(state.step)
  ckpt.save(step, state, {"step": step, "validation": metrics})
  ckpt.close()
  print(f"process {process_id}: done, validation {metrics}", flush=True)

if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
