"""Train a multi-task model: python train.py --config configs/census_apem.py --workdir runs/census_apem

Any config value can be overridden, e.g. --config.train.num_epochs=5 --config.model.num_groups=4.
A workdir that already holds checkpoints resumes from the newest one that restores.

SIGTERM or SIGINT (Ctrl-C; twice to interrupt at once) finishes the current step, saves a
checkpoint and exits with status 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as
does a preemption notice on several processes (143); rerun the same command to resume.

Several hosts (README, "Several hosts"): run the same command in every process with
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or ``--distributed`` alone
where JAX finds them itself: Cloud TPU, Slurm, Open MPI, ``JAX_COORDINATOR_ADDRESS``); the
workdir must be on storage every process sees.

Several runs in one compiled program (apem_jax/vmap_runs.py): ``--vmap seed=0,1,2,3,4`` (or
``optimizer.learning_rate=1e-3,3e-3``, any ``optimizer.*`` key or ``train.patience``) trains one
run per value, vmapped, each with its own early stopping and checkpoints in
``<workdir>/<key>=<value>``; rerun the same command to resume them together after a stop or a
kill; ``eval.py``, export and a resume without ``--vmap`` take each such directory as a workdir of
its own.
"""


import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from apem_jax import cli, trainer, vmap_runs  # importing touches no device, so initialize() can still follow

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for a run over several processes.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() even without the three flags above, "
    "letting JAX detect the cluster (Cloud TPU, Slurm, Open MPI) and read JAX_COORDINATOR_ADDRESS.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of a user error (bad config, "
                           "refused workdir, bad data) instead of one line.")
_VMAP = flags.DEFINE_string(
    "vmap", None, "KEY=V1,V2,...: one run per value of KEY (seed, an optimizer.* key or "
    "train.patience), trained together as one vmapped program, each in <workdir>/KEY=V.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """``jax.distributed.initialize`` when this is one process of several; must precede any device
  use. Flags left out are filled in by JAX (cluster detection, ``JAX_COORDINATOR_ADDRESS``)."""
  given = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not (_DISTRIBUTED.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
          or any(v is not None for v in given)):
    return
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  initialize_distributed()
  if _VMAP.value:
    with cli.user_errors_in_one_line("train.py", _DEBUG.value):
      configs, names = vmap_runs.configs_over(_CONFIG.value, _VMAP.value, "--vmap")
      summaries = vmap_runs.train_runs(configs, _WORKDIR.value, run_dirs=[
          os.path.join(_WORKDIR.value, n) for n in names])
    trainer.exit_if_stopped(summaries[0])
    for name, summary in zip(names, summaries):
      print(f"{name}: best validation score {summary['best_validation_score']:.5f} at step "
            f"{summary['best_step']}")
    return
  with cli.user_errors_in_one_line("train.py", _DEBUG.value):
    summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  trainer.exit_if_stopped(summary)
  print(f"Best validation score {summary['best_validation_score']:.5f} at step "
        f"{summary['best_step']}; metrics in {_WORKDIR.value}/metrics.json")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("train.py"))
