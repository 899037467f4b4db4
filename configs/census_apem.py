"""`--config configs/census_apem.py`: :mod:`apem_jax.configs.census_apem`, which the package installs."""

from apem_jax.configs.census_apem import *  # noqa: F401,F403
