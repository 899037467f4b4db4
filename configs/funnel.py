"""`--config configs/funnel.py`: :mod:`apem_jax.configs.funnel`, which the package installs."""

from apem_jax.configs.funnel import *  # noqa: F401,F403
