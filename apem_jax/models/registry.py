"""Models by name: ``MODELS`` and ``build_model(model_config, schema)``."""

from __future__ import annotations

import flax.linen as nn
import ml_collections

from apem_jax.models.apem import APEM
from apem_jax.models.baselines import AITM, ESMM, MMoE, PLE, SharedBottom, SingleTask
from apem_jax.models.defaults import default_model_config
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
