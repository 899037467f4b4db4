"""Train a multi-task model: python train.py --config configs/census_apem.py --workdir runs/census_apem

Any config value can be overridden, e.g. --config.train.num_epochs=5 --config.model.num_groups=4.
A workdir that already holds checkpoints resumes from the latest one.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from apem_jax import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(f"Best validation score {summary['best_validation_score']:.5f} at step "
        f"{summary['best_step']}; metrics in {_WORKDIR.value}/metrics.json")


if __name__ == "__main__":
  app.run(main)
