"""`--config configs/synthetic.py`: :mod:`apem_jax.configs.synthetic`, which the package installs."""

from apem_jax.configs.synthetic import *  # noqa: F401,F403
