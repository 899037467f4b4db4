"""The configs of the command lines and benchmarks, installed with the package.

``configs/<name>.py`` at the top of the repository are short aliases of these for the command lines
(``--config configs/census_apem.py``); from Python: ``from apem_jax.configs import census``, or
``apem_jax.configs.census`` (each config module is loaded on first use).
"""

import importlib

_MODULES = ("census", "census_apem", "common", "funnel", "spec", "synthetic")


def __getattr__(name: str):
  if name in _MODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
