"""`--config configs/spec.py:SPEC[,MODEL]`: :mod:`apem_jax.configs.spec`, installed."""

from apem_jax.configs.spec import *  # noqa: F401,F403
