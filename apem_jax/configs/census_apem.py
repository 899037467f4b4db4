"""APEM on UCI Census-Income (KDD), tasks income (> 50K) and marital (never married).

Usage: python train.py --config configs/census_apem.py --workdir runs/census_apem
Override any value: --config.train.batch_size=2048 --config.model.num_groups=4

The same config as ``configs/census.py:apem`` (the quality benchmark's APEM).
"""

from apem_jax.configs import census


def get_config():
  return census.get_config("apem")
