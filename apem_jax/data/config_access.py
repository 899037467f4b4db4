"""Reading one key of a data config, whatever holds it: one function that the preparation
code (``prepare.py``, which imports no JAX itself) and the input pipeline share."""

from __future__ import annotations

from typing import Any


def config_value(config: Any, key: str, default: Any) -> Any:
  """``config[key]`` of a ConfigDict, mapping or object, ``default`` where absent or None."""
  if config is None:
    return default
  value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
  return default if value is None else value
