"""apem-jax: APEM and multi-task ranking baselines in JAX/Flax.

The public API (docs/api.md), importable from here; each name is loaded on first use, so
``import apem_jax`` stays cheap (no JAX device, no TensorFlow):

* data: ``dataset_from_columns``, ``DatasetSplits``, ``load_dataset``, ``register_source``; ``Schema``,
  ``CategoricalField``, ``NumericField``, ``Task``, ``make_schema``;
* models: ``build_model``, ``register_model``, ``MODELS``, ``APEM`` (to subclass);
* steps: ``TrainState``, ``init_state``, ``train_step``, ``eval_step``, ``bind_steps``,
  ``make_optimizer``; task balancing: ``Balancing``, ``balancing_from_config``;
* runs: ``Experiment``, ``train_and_evaluate``, ``evaluate_checkpoint``, ``restore_checkpoint``,
  ``train_runs`` (several seeds or learning rates as one vmapped program);
  serving: ``apem_jax.export.export(workdir, output)`` (a module of its own: it imports
  TensorFlow);
* configs: ``apem_jax.configs`` (``common.base_config()``, ``census.get_config('mmoe')``, ...);
  ``apem_jax.parallel`` (``jit_train_step``, ``pmap_train_step``). These three modules are also
  loaded on first use.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "dataset_from_columns": "apem_jax.data", "DatasetSplits": "apem_jax.data",
    "load_dataset": "apem_jax.data", "register_source": "apem_jax.data.sources",
    "Schema": "apem_jax.schema", "CategoricalField": "apem_jax.schema",
    "NumericField": "apem_jax.schema", "Task": "apem_jax.schema",
    "make_schema": "apem_jax.schema",
    "build_model": "apem_jax.models", "register_model": "apem_jax.models",
    "MODELS": "apem_jax.models", "APEM": "apem_jax.models",
    "TrainState": "apem_jax.step", "init_state": "apem_jax.step", "train_step": "apem_jax.step",
    "eval_step": "apem_jax.step", "bind_steps": "apem_jax.step",
    "make_optimizer": "apem_jax.step",
    "Balancing": "apem_jax.balancing", "balancing_from_config": "apem_jax.balancing",
    "Experiment": "apem_jax.trainer", "train_and_evaluate": "apem_jax.trainer",
    "evaluate_checkpoint": "apem_jax.trainer", "restore_checkpoint": "apem_jax.trainer",
    "train_runs": "apem_jax.vmap_runs",
}
__all__ = sorted(_PUBLIC)
_SUBMODULES = ("configs", "export", "parallel")


def __getattr__(name: str):
  if name in _SUBMODULES:  # ``apem_jax.configs.census`` after a plain ``import apem_jax``
    return importlib.import_module(f"apem_jax.{name}")
  if name not in _PUBLIC:
    raise AttributeError(f"module 'apem_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_PUBLIC[name]), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(list(globals()) + __all__)
