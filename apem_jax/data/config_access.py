"""Reading one key of a data config, whatever holds it (kept apart so that the JAX-free
preparation code and the JAX-side pipeline share it)."""

from __future__ import annotations

from typing import Any


def config_value(config: Any, key: str, default: Any) -> Any:
  """``config[key]`` of a ConfigDict, mapping or object, ``default`` where absent or None."""
  if config is None:
    return default
  value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
  return default if value is None else value
