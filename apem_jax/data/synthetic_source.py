"""The synthetic datasets as file sources: generated (seeded) into Parquet files and a spec.

``data.name='synthetic_mmoe'`` and ``'synthetic_funnel'`` are prepared and read by the same code
as a user's own files (``prepare.load_spec_dataset``): this module only writes, once per set of
generator settings, ``<data_dir>/<name>/<key>/``:

* ``train.parquet``, ``validation.parquet``, ``test.parquet``: the generator's rows, split 80/10/10
  in generation order (``synthetic.split``) as before; one column per feature and per label;
* ``spec_<key>.json``: the dataset spec (numeric features standardised with the training
  statistics; the funnel's categorical ids through a vocabulary of the training split's ids,
  unseen ids to the OOV id; the funnel's steps chained with ``depends_on``);
* for the funnel, ``true_q_<split>.npy`` (float32 [N, T]): the true conditional step
  probabilities, which only a simulation knows and so have no place in a spec; the funnel source
  attaches them to the in-memory splits for the oracle metrics (``metrics.funnel_metrics``).

``<key>`` is a hash of the generator and its settings (:func:`settings_key`): other settings write
another directory, the same settings find theirs. The directory is written under a temporary name
and renamed into place, so a killed run leaves no half-written source behind and two processes
generating the same settings at once both end with the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from apem_jax.data import synthetic
from apem_jax.data import synthetic_funnel

# Bumped when what a key's directory holds changes, so older directories are not reused.
FORMAT_VERSION = 1
SPEC_FILE = "spec_{key}.json"
TRUE_Q_FILE = "true_q_{split}.npy"
SPLITS = ("train", "validation", "test")


def settings_key(name: str, settings: Mapping[str, Any]) -> str:
  """16 hex digits of SHA-256 over the generator's name, settings and :data:`FORMAT_VERSION`."""
  text = json.dumps({"name": name, "settings": settings, "version": FORMAT_VERSION},
                    sort_keys=True, default=lambda v: np.asarray(v).tolist())
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_parquet(path: pathlib.Path, columns: Mapping[str, np.ndarray]) -> None:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  pq.write_table(pa.table({k: pa.array(v) for k, v in columns.items()}), path,
                 row_group_size=1_000_000)


def _materialise(data_dir: str | os.PathLike, name: str, settings: Mapping[str, Any],
                 write: Callable[[pathlib.Path], dict]) -> pathlib.Path:
  """``<data_dir>/<name>/<key>/``, its files written by ``write(directory)`` (which returns the
  spec) unless already there (``prepare.publish_directory``); returns the spec's path."""
  from apem_jax.data import prepare  # pylint: disable=g-import-not-at-top
  key = settings_key(name, settings)
  final = pathlib.Path(data_dir) / name / key
  spec_path = final / SPEC_FILE.format(key=key)
  if spec_path.exists():
    return spec_path

  def write_with_spec(directory: pathlib.Path) -> None:
    spec = write(directory)
    (directory / spec_path.name).write_text(json.dumps(spec, indent=1) + "\n")

  # e.g. a setting the generator refuses: nothing is left on disk.
  prepare.publish_directory(final, spec_path.name, write_with_spec)
  return spec_path


def _spec(features: Sequence[dict], tasks: Sequence[dict]) -> dict[str, Any]:
  return {"format": "parquet", "splits": {s: [f"{s}.parquet"] for s in SPLITS},
          "features": list(features), "tasks": list(tasks)}


def write_mmoe(data_dir: str | os.PathLike, settings: Mapping[str, Any]) -> pathlib.Path:
  """The MMoE paper's synthetic data (``synthetic.generate(**settings)`` without ``task_kind``;
  ``task_kind='binary'`` labels each task above its median over the whole data set): the files
  and spec under ``<data_dir>/synthetic_mmoe/<key>/``; returns the spec's path."""
  settings = dict(settings)
  task_kind = settings.pop("task_kind", "regression")

  def write(directory: pathlib.Path) -> dict:
    data = synthetic.generate(**settings)
    if task_kind == "binary":
      data["labels"] = synthetic.binarize(data["labels"])
    d = data["numeric"].shape[1]
    for split, arrays in synthetic.split(data).items():
      columns = {f"x{i}": arrays["numeric"][:, i] for i in range(d)}
      columns.update({t: arrays["labels"][:, j] for j, t in enumerate(synthetic.TASK_NAMES)})
      _write_parquet(directory / f"{split}.parquet", columns)
    return _spec([{"name": f"x{i}", "type": "numeric"} for i in range(d)],
                 [{"name": t, "label_column": t, "kind": task_kind}
                  for t in synthetic.TASK_NAMES])

  return _materialise(data_dir, "synthetic_mmoe", dict(settings, task_kind=task_kind), write)


def write_funnel(data_dir: str | os.PathLike, settings: Mapping[str, Any]) -> pathlib.Path:
  """A synthetic conversion funnel (``synthetic_funnel.generate(**settings)``): the files, the
  spec and the true step probabilities under ``<data_dir>/synthetic_funnel/<key>/``; returns the
  spec's path."""
  settings = dict(settings)

  def write(directory: pathlib.Path) -> dict:
    data = synthetic_funnel.generate(**settings)
    steps = synthetic_funnel.STEP_NAMES[:data["labels"].shape[1]]
    for split, arrays in synthetic.split(data).items():
      columns = {f: arrays["categorical"][:, j]
                 for j, f in enumerate(synthetic_funnel.CATEGORICAL_FIELDS)}
      columns.update({f: arrays["numeric"][:, j]
                      for j, f in enumerate(synthetic_funnel.NUMERIC_FIELDS)})
      columns.update({t: arrays["labels"][:, j] for j, t in enumerate(steps)})
      _write_parquet(directory / f"{split}.parquet", columns)
      np.save(directory / TRUE_Q_FILE.format(split=split), arrays["true_q"].astype(np.float32))
    return _spec(
        [{"name": f, "type": "categorical"} for f in synthetic_funnel.CATEGORICAL_FIELDS]
        + [{"name": f, "type": "numeric"} for f in synthetic_funnel.NUMERIC_FIELDS],
        [dict({"name": t, "label_column": t}, **({"depends_on": steps[i - 1]} if i else {}))
         for i, t in enumerate(steps)])

  return _materialise(data_dir, "synthetic_funnel", settings, write)


def true_q(spec_path: str | os.PathLike, split: str) -> np.ndarray:
  """The funnel's true conditional step probabilities of ``split`` (float32 [N, T]), written
  beside the spec by :func:`write_funnel`."""
  return np.load(pathlib.Path(spec_path).parent / TRUE_Q_FILE.format(split=split))
