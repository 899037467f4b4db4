"""Short paths for the command lines; the configs live in :mod:`apem_jax.configs`."""
