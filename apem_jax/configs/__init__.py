"""The configs of the command lines and benchmarks, installed with the package.

``configs/<name>.py`` at the top of the repository are short aliases of these for the command lines
(``--config configs/census_apem.py``); from Python: ``from apem_jax.configs import census``.
"""
