"""The built-in datasets, by the ``data.name`` that picks them: each a source.

A source turns the ``data`` config into a dataset. Census-Income is a *file source*: its module
(``census_source``) obtains the raw files and writes a dataset spec for them
(``census_source.write_spec``), and the spec is prepared and read by the same code as a user's
own files (``prepare.load_spec_dataset``): the same vocabularies, statistics, shards, cache and
checks. The two synthetic generators (``synthetic``, ``synthetic_funnel``) produce arrays in
memory, seeded, with the true probabilities a funnel's oracle metrics need besides the labels.

Nothing outside a source knows a dataset by name: ``pipeline.load_dataset`` looks the name up
here. ``register_source`` adds one (a function ``data_config -> DatasetSplits``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np

from apem_jax import schema as schema_lib
from apem_jax.data import census_source
from apem_jax.data.pipeline import DatasetSplits, config_value
from apem_jax.data import synthetic
from apem_jax.data import synthetic_funnel

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


def load_census(data_config: Any):
  """``data.name='census_income'``: the Census source's spec (its keys ``task_group``,
  ``numeric_transform``, ``min_count``, ``numeric_buckets``), prepared under ``data.data_dir``
  and read in memory unless ``data.stream=true``."""
  from apem_jax.data import prepare  # pylint: disable=g-import-not-at-top
  own = census_source.CONFIG_DEFAULTS
  unknown = sorted(_keys(data_config) - set(own) - set(_SPEC_KEYS) - {"name"})
  if unknown:
    raise ValueError(f"data.{unknown[0]}: not a key of data.name='census_income'; keys: "
                     f"{sorted(set(own) | set(_SPEC_KEYS))}")
  data_dir = config_value(data_config, "data_dir", "data")
  spec_path = census_source.write_spec(data_dir, **{k: config_value(data_config, k, d)
                                                    for k, d in own.items()})
  config = {k: config_value(data_config, k, None) for k in _SPEC_KEYS}
  config.update(name="spec", spec=str(spec_path), data_dir=data_dir,
                stream=config_value(data_config, "stream", False))
  return prepare.load_spec_dataset(config)


def load_synthetic_mmoe(data_config: Any):
  """``data.name='synthetic_mmoe'``: ``synthetic.generate`` with ``data.synthetic``'s keys."""
  sub = config_value(data_config, "synthetic", None)
  unknown = sorted(_keys(sub) - set(synthetic.DEFAULTS))
  if unknown:
    raise ValueError(f"data.synthetic: unknown keys {unknown}; known: {sorted(synthetic.DEFAULTS)}")
  kwargs = {}
  for key, default in synthetic.DEFAULTS.items():
    value = config_value(sub, key, default)
    kwargs[key] = list(value) if key in ("alpha", "beta") and value is not None else value
  task_kind = kwargs.pop("task_kind")
  if task_kind not in synthetic.TASK_KINDS:
    raise ValueError(f"data.synthetic.task_kind={task_kind!r}; expected one of {synthetic.TASK_KINDS}")
  data = synthetic.generate(**kwargs)
  if task_kind == "binary":
    data["labels"] = synthetic.binarize(data["labels"])
  data["label_mask"] = np.ones_like(data["labels"])
  data["categorical"] = np.zeros((len(data["labels"]), 0), np.int32)
  schema = schema_lib.Schema(
      categorical=(),
      numeric=tuple(schema_lib.NumericField(f"x{i}") for i in range(kwargs["input_dim"])),
      tasks=tuple(schema_lib.Task(t, task_kind) for t in synthetic.TASK_NAMES))
  return DatasetSplits(schema, None, synthetic.split(data))


def load_synthetic_funnel(data_config: Any):
  """``data.name='synthetic_funnel'``: ``synthetic_funnel.generate`` with ``data.funnel``'s keys."""
  sub = config_value(data_config, "funnel", None)
  unknown = sorted(_keys(sub) - set(synthetic_funnel.DEFAULTS))
  if unknown:
    raise ValueError(f"data.funnel: unknown keys {unknown}; known: "
                     f"{sorted(synthetic_funnel.DEFAULTS)}")
  kwargs = {k: config_value(sub, k, d) for k, d in synthetic_funnel.DEFAULTS.items()}
  kwargs = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in kwargs.items()}
  start = time.perf_counter()
  data = synthetic_funnel.generate(**kwargs)
  logging.info("synthetic_funnel: %d examples generated in %.1f s", kwargs["num_examples"],
               time.perf_counter() - start)
  data["label_mask"] = np.ones_like(data["labels"])
  steps = synthetic_funnel.STEP_NAMES[:kwargs["num_steps"]]
  schema = schema_lib.Schema(
      categorical=tuple(schema_lib.CategoricalField(n, v) for n, v in zip(
          synthetic_funnel.CATEGORICAL_FIELDS, synthetic_funnel.vocab_sizes(
              kwargs["num_users"], kwargs["num_items"], kwargs["num_categories"]))),
      numeric=tuple(schema_lib.NumericField(n) for n in synthetic_funnel.NUMERIC_FIELDS),
      tasks=tuple(schema_lib.Task(t, "binary", depends_on=steps[i - 1] if i else None)
                  for i, t in enumerate(steps)))
  return DatasetSplits(schema, None, synthetic.split(data))


register_source("census_income", load_census)
register_source("synthetic_mmoe", load_synthetic_mmoe, in_memory=True)
register_source("synthetic_funnel", load_synthetic_funnel, in_memory=True)
