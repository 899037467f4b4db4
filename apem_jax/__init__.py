"""apem-jax: APEM and multi-task ranking baselines in JAX/Flax."""
__version__ = "0.1.0"
