"""Any registered model on the synthetic multi-step conversion funnel (click -> cart -> purchase).

  --config configs/funnel.py:apem                    (model)
  --config configs/funnel.py:esmm,4                  (model, number of funnel steps)
  --config configs/funnel.py:mmoe --config.train.funnel=conditional   (the biased baseline)

The data (apem_jax/data/synthetic_funnel.py) has a 1,000,000-id user field with Zipf frequency and
stores the true step probabilities, so evaluation also reports each step's oracle AUC and the
model's gap to it. Selection: mean entire-space validation AUC over the steps.
"""

import ml_collections

from apem_jax.configs import common
from apem_jax.data import synthetic_funnel
from apem_jax.models.defaults import default_model_config


def funnel_data(num_steps: int = 3) -> ml_collections.ConfigDict:
  funnel = dict(synthetic_funnel.DEFAULTS)
  funnel["num_steps"] = num_steps
  return ml_collections.ConfigDict(dict(
      name="synthetic_funnel", data_dir="data",
      funnel=funnel, **common.input_keys()))


def get_config(arg: str = "apem"):
  model, _, steps = arg.partition(",")
  config = common.base_config()
  config.data = funnel_data(int(steps or 3))
  config.model = default_model_config(model)
  # Every model peaks on validation after one or two epochs, then its 1,000,000-id user table
  # memorises (docs/results/README.md). Batch 8192 costs a quarter of batch 2048 per epoch on CPU
  # (the dense Adam update of the large tables dominates a step) for a small loss: ESMM seed 0's
  # best validation score 0.8107 against 0.8152.
  config.train.batch_size = 8192
  config.train.num_epochs = 4
  config.train.patience = 1
  # The id tables under lazy Adam (only the rows a batch holds move) with L2 on those rows: the
  # best of ten settings of the tables' optimizer on ESMM's validation score, then better on
  # validation than the dense Adam for every model (docs/results/funnel_optimizers.md).
  config.optimizer.embedding_optimizer = "lazy_adam"
  config.optimizer.embedding_l2 = 1e-3
  return config
