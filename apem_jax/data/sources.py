"""The built-in datasets, by the ``data.name`` that picks them: each a source.

A source turns the ``data`` config into a dataset. Every built-in dataset is a *file source*: its
module obtains or generates the files and writes a dataset spec for them, and the spec is
prepared and read by the same code as a user's own files (``prepare.load_spec_dataset``): the
same vocabularies, statistics, shards, cache and checks. Census-Income (``census_source``)
downloads the raw files; the MMoE synthetic data and the synthetic funnel (``synthetic_source``)
generate theirs, seeded, and the funnel adds the true step probabilities its oracle metrics need
(which only a simulation knows) to the splits it returns. Each is read into memory by default
(``data.stream=true`` streams it; the funnel's oracle metrics then are not computed).

Nothing outside a source knows a dataset by name: ``pipeline.load_dataset`` looks the name up
here. ``register_source`` adds one (a function ``data_config -> DatasetSplits``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from apem_jax.data import census_source
from apem_jax.data.config_access import config_value
from apem_jax.data.pipeline import DatasetSplits
from apem_jax.data import synthetic
from apem_jax.data import synthetic_funnel
from apem_jax.data import synthetic_source

# Generic keys of a spec dataset a file source passes on to ``prepare.load_spec_dataset``.
_SPEC_KEYS = ("data_dir", "shard_rows", "stream", "shuffle_buffer", "stream_groups",
              "interleave_cycle")

Source = Callable[[Any], Any]
SOURCES: dict[str, Source] = {}
# Sources whose splits are made in memory: funnel label consistency is enforced on them by
# ``pipeline.load_dataset`` (a file source's spec settles it at preparation).
IN_MEMORY: set[str] = set()


def register_source(name: str, source: Source, *, in_memory: bool = False) -> None:
  """Makes ``data.name=name`` load its dataset with ``source(data_config)``."""
  if name in SOURCES or name == "spec":
    raise ValueError(f"a dataset named {name!r} is already registered")
  SOURCES[name] = source
  if in_memory:
    IN_MEMORY.add(name)


def _keys(config: Any) -> set[str]:
  return set(config.keys()) if config is not None and hasattr(config, "keys") else set()


def _check_keys(data_config: Any, own: set[str]) -> None:
  """Refuses a key the source does not take, and a bad value of a generic key, before the source
  downloads or writes anything."""
  from apem_jax.data import prepare  # pylint: disable=g-import-not-at-top
  name = config_value(data_config, "name", None)
  unknown = sorted(_keys(data_config) - own - set(_SPEC_KEYS) - {"name"})
  if unknown:
    raise ValueError(f"data.{unknown[0]}: not a key of data.name={name!r}; keys: "
                     f"{sorted(own | set(_SPEC_KEYS))}")
  prepare.input_settings(data_config, stream_default=False)


def _load_spec(spec_path: Any, data_config: Any):
  """The prepared splits of a source's spec, read in memory unless ``data.stream=true``."""
  from apem_jax.data import prepare  # pylint: disable=g-import-not-at-top
  config = {k: config_value(data_config, k, None) for k in _SPEC_KEYS}
  config.update(name="spec", spec=str(spec_path), stream=config_value(data_config, "stream",
                                                                      False))
  return prepare.load_spec_dataset(config)


def load_census(data_config: Any):
  """``data.name='census_income'``: the Census source's spec (its keys ``task_group``,
  ``numeric_transform``, ``min_count``, ``numeric_buckets``), prepared under ``data.data_dir``
  and read in memory unless ``data.stream=true``."""
  own = census_source.CONFIG_DEFAULTS
  _check_keys(data_config, set(own))
  spec_path = census_source.write_spec(config_value(data_config, "data_dir", "data"), **{
      k: config_value(data_config, k, d) for k, d in own.items()})
  return _load_spec(spec_path, data_config)


def _settings(data_config: Any, key: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
  """``data.<key>``'s generator settings over ``defaults`` (lists as tuples); unknown keys are
  refused."""
  _check_keys(data_config, {key})
  sub = config_value(data_config, key, None)
  if sub is not None and not hasattr(sub, "keys"):
    raise ValueError(f"data.{key}={sub!r}: expected a mapping of generator settings (keys "
                     f"{sorted(defaults)})")
  unknown = sorted(_keys(sub) - set(defaults))
  if unknown:
    raise ValueError(f"data.{key}: unknown keys {unknown}; known: {sorted(defaults)}")
  settings = {k: config_value(sub, k, d) for k, d in defaults.items()}
  return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in settings.items()}


def load_synthetic_mmoe(data_config: Any):
  """``data.name='synthetic_mmoe'``: ``synthetic.generate`` with ``data.synthetic``'s keys,
  written to files by ``synthetic_source.write_mmoe``."""
  settings = _settings(data_config, "synthetic", synthetic.DEFAULTS)
  if settings["task_kind"] not in synthetic.TASK_KINDS:
    raise ValueError(f"data.synthetic.task_kind={settings['task_kind']!r}; expected one of "
                     f"{synthetic.TASK_KINDS}")
  spec_path = synthetic_source.write_mmoe(config_value(data_config, "data_dir", "data"), settings)
  return _load_spec(spec_path, data_config)


def load_synthetic_funnel(data_config: Any):
  """``data.name='synthetic_funnel'``: ``synthetic_funnel.generate`` with ``data.funnel``'s keys,
  written to files by ``synthetic_source.write_funnel``; in memory, each split carries its true
  conditional step probabilities (``true_q`` [N, T]) for the oracle metrics."""
  settings = _settings(data_config, "funnel", synthetic_funnel.DEFAULTS)
  spec_path = synthetic_source.write_funnel(config_value(data_config, "data_dir", "data"),
                                            settings)
  splits = _load_spec(spec_path, data_config)
  if not isinstance(splits, DatasetSplits):
    return splits  # streamed: no oracle metrics
  arrays = {}
  for split, split_arrays in splits.arrays.items():
    q = synthetic_source.true_q(spec_path, split)
    if len(q) != len(split_arrays["labels"]):
      raise ValueError(f"{spec_path}: {split} has {len(split_arrays['labels'])} rows, its "
                       f"true probabilities {len(q)}; delete {spec_path.parent} to regenerate")
    arrays[split] = dict(split_arrays, true_q=q)
  return DatasetSplits(splits.schema, splits.preprocessing, arrays,
                       splits.inconsistent_funnel_rows)


register_source("census_income", load_census)
register_source("synthetic_mmoe", load_synthetic_mmoe)
register_source("synthetic_funnel", load_synthetic_funnel)
