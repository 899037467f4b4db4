"""`--config configs/common.py`: :mod:`apem_jax.configs.common`, which the package installs."""

from apem_jax.configs.common import *  # noqa: F401,F403
