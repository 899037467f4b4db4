"""`--config configs/census.py`: :mod:`apem_jax.configs.census`, which the package installs."""

from apem_jax.configs.census import *  # noqa: F401,F403
