"""Any registered model on your own data, described by a dataset spec (apem_jax/data/spec.py).

  --config configs/spec.py:my_spec.json,mmoe      (the spec file, the model; default: apem)

The files the spec names are prepared once (``apem-data prepare``, or by the first run) into
``data.data_dir``/prepared/, keyed by the spec and the files' sizes and times, and training
streams them from there.
"""

import ml_collections

from apem_jax.configs import common
from apem_jax.models.defaults import default_model_config


def _is_model(name: str) -> bool:
  try:
    default_model_config(name)
  except ValueError:
    return False
  return True


def get_config(arg: str):
  spec, _, model = arg.partition(",")
  if not spec:
    raise ValueError("configs/spec.py needs the spec file: --config configs/spec.py:SPEC[,MODEL]")
  if not model and not spec.endswith(".json") and _is_model(spec):
    raise ValueError(f"configs/spec.py:{spec}: {spec!r} is a model, where the spec file goes; "
                     f"expected configs/spec.py:SPEC[,MODEL], e.g. "
                     f"configs/spec.py:spec.json,{spec}")
  config = common.base_config(model or "apem")
  config.data = ml_collections.ConfigDict(dict(name="spec", spec=spec, data_dir="data",
                                               **common.input_keys()))
  return config
