"""Models by name: ``MODELS`` and ``build_model(model_config, schema)``."""

from __future__ import annotations

import flax.linen as nn
import ml_collections

from apem_jax.models.apem import APEM
from apem_jax.models.baselines import AITM, ESMM, MMoE, PLE, SharedBottom, SingleTask
from apem_jax.models.defaults import default_model_config, register_defaults
from apem_jax.schema import Schema

MODELS: dict[str, type[nn.Module]] = {
    "apem": APEM,
    "single_task": SingleTask,
    "shared_bottom": SharedBottom,
    "mmoe": MMoE,
    "ple": PLE,
    "esmm": ESMM,
    "aitm": AITM,
}


def register_model(name: str, cls: type[nn.Module], defaults_of: str | None = None,
                   defaults: dict | None = None) -> None:
  """Adds a model to the registry, so ``model.name=<name>`` builds it in every command and API.

  ``cls`` needs ``from_config(cfg, schema)`` (as the built-in models have; a subclass of one of
  them inherits it). Its config keys: those of the registered model ``defaults_of`` (e.g. a
  subclass of APEM that swaps one module: ``defaults_of='apem'``), or ``defaults``.

  Raises:
    ValueError: ``name`` is taken, or neither or both of ``defaults_of`` and ``defaults`` given.
  """
  if name in MODELS:
    raise ValueError(f"model {name!r} is already registered")
  if (defaults_of is None) == (defaults is None):
    raise ValueError("register_model: give exactly one of defaults_of= and defaults=")
  if defaults_of is not None:
    defaults = default_model_config(defaults_of).to_dict()
  defaults = {k: v for k, v in defaults.items() if k not in ("name", "embed_dim", "dropout", "dtype")}
  register_defaults(name, defaults)
  MODELS[name] = cls


def resolve_config(model_config, name: str | None = None) -> ml_collections.ConfigDict:
  """Defaults of the named model overridden by ``model_config``; unknown keys are errors."""
  name = name if name is not None else model_config.get("name")
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; registered models: {sorted(MODELS)}")
  cfg = default_model_config(name)
  given = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  unknown = sorted(set(given) - set(cfg))
  if unknown:
    raise ValueError(f"model config for {name!r} has unknown keys {unknown}; "
                     f"valid keys: {sorted(cfg)}")
  with cfg.unlocked():
    for key, value in given.items():
      try:
        cfg[key] = value if not isinstance(value, list) else tuple(value)
      except TypeError as e:  # ConfigDict type safety, e.g. a str where a bool is expected
        raise ValueError(f"model config {key!r}: {e}") from None
  return cfg


def build_model(model_config, schema: Schema) -> nn.Module:
  """Validates ``model_config`` (a ConfigDict or dict with key ``name``) and builds the module.

  Keys left out take their defaults (``defaults.default_model_config``). Raises ValueError naming
  the config key on an invalid value, an unknown key, or an unknown model name.
  """
  cfg = resolve_config(model_config)
  return MODELS[cfg.name].from_config(cfg, schema)
