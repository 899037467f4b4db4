"""The Python API: data given as columns, validated when it is built; public names; registry."""

import json

import numpy as np
import pytest

import apem_jax
from apem_jax.configs import common
from apem_jax.data import pipeline
from apem_jax.schema import Task


def _columns(n: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  click = (rng.random(n) < 0.3).astype(float)
  return {"user": [f"u{i}" for i in rng.integers(0, 20, n)],
          "price": rng.uniform(0, 10, n).tolist(),
          "click": click, "buy": click * (rng.random(n) < 0.5),
          "note": ["x"] * n}


def _data(**overrides):
  kwargs = dict(categorical=["user"], numeric=["price"],
                tasks=[Task("click"), Task("buy", depends_on="click")], ignore=["note"])
  kwargs.update(overrides)
  splits = kwargs.pop("splits", None) or {"train": _columns(300), "validation": _columns(100, 1)}
  return apem_jax.dataset_from_columns(splits, **kwargs)


def test_columns_become_a_validated_dataset_and_a_run_takes_it(tmp_path):
  data = _data()
  assert data.schema.task_names == ("click", "buy") and data.schema.has_funnel
  assert [f.name for f in data.schema.numeric] == ["price"]
  assert data.arrays["train"]["categorical"].shape == (300, 1)
  config = common.base_config("shared_bottom")
  config.train.update(batch_size=64, num_epochs=1, progress_bar=False)
  exp = apem_jax.Experiment(config, data=data)
  assert exp.config.data.name == "given" and exp.data is data


@pytest.mark.parametrize("change, message", [
    (dict(ignore=[]), r"columns \['note'\] are neither features nor tasks"),
    (dict(numeric=["price", "age"]), r"no column \['age'\]"),
    (dict(splits={"train": _columns(50), "valid": _columns(50)}),
     r"expected 'train', 'validation' and optionally 'test' \(unknown: \['valid'\]\)"),
    (dict(splits={"train": dict(_columns(50), click=["1", "yes"] + ["0"] * 48),
                  "validation": _columns(50)}),
     r"split 'train', label column 'click': 'yes' is not a number"),
    (dict(splits={"train": dict(_columns(50), click=[2.0] + [0.0] * 49),
                  "validation": _columns(50)}),
     r"split 'train', row 0, label column 'click': 2.0; expected 0 or 1"),
    (dict(splits={"train": dict(_columns(50), price=["cheap"] + [1.0] * 49),
                  "validation": _columns(50)}),
     r"split 'train', row 0, numeric column 'price': 'cheap' is not a number"),
    (dict(splits={"train": dict(_columns(50), price=[1.0] * 49 + [float("nan")]),
                  "validation": _columns(50)}),
     r"split 'train', row 49, numeric column 'price': nan is missing; a numeric feature given "
     r"in Python takes no missing value"),
    (dict(splits={"train": dict(_columns(50), price=[1.0] * 48 + [None, 2.0]),
                  "validation": _columns(50)}),
     r"split 'train', row 48, numeric column 'price': None is missing"),
    (dict(splits={"train": dict(_columns(50), price=[1.0] * 49 + [float("inf")]),
                  "validation": _columns(50)}),
     r"split 'train', row 49, numeric column 'price': inf is not a finite number"),
    (dict(splits={"train": dict(_columns(50), click=np.array([b"1", b""] * 25)),
                  "validation": _columns(50)}),
     r"no negative \(0\) label among its 25 labelled rows"),  # b"" is missing, as "" is
    (dict(splits=[_columns(50), _columns(50)]), r"splits: expected a mapping of split name"),
    (dict(tasks="click"), r"tasks='click': expected a list of column names \(\['click'\]\)"),
    (dict(splits={"train": dict(_columns(50), price=[1e200, -1e200] * 25),
                  "validation": _columns(50)}),
     r"field 'price': its training values are too large, their mean or variance overflows"),
    (dict(splits={"train": _columns(50), "validation": dict(_columns(50), price=[1e300] * 50)}),
     r"split 'validation', row 0, numeric column 'price': 1e\+300 standardised \(training mean "
     r".*overflows float32"),
    (dict(splits={"train": dict(_columns(50), click=[0.0] * 50, buy=[0.0] * 50),
                  "validation": _columns(50)}),
     r"split 'train', label column 'click': no positive \(1\) label among its 50 labelled rows"),
    (dict(splits={"train": dict(_columns(50), click=[0.0] * 49 + [1.0], buy=[1.0] + [0.0] * 49),
                  "validation": _columns(50)}),
     r"split 'train': 1 of 50 rows are inconsistent funnels.*first at row 0.* set "
     r"inconsistent_funnel='drop'"),  # the argument's name, not the config key
])
def test_a_dataset_that_does_not_fit_is_refused_when_built(change, message):
  with pytest.raises((ValueError, TypeError), match=message):
    _data(**change)


def test_a_missing_category_is_the_empty_string_and_numbers_read_as_preparation_reads_them():
  def with_gaps(n, seed):
    columns = _columns(n, seed)
    columns["user"] = [None if i % 7 == 0 else u for i, u in enumerate(columns["user"])]
    columns["tier"] = [float("nan") if i % 5 == 0 else float(i % 3) for i in range(n)]
    return columns

  data = _data(categorical=["user", "tier"],
               splits={"train": with_gaps(300, 0), "validation": with_gaps(100, 1)})
  user, tier = data.preprocessing.vocabularies
  assert "" in user and "None" not in user and tier == ("", "0", "1", "2")
  ids = data.arrays["train"]["categorical"]
  assert (ids[::7, 0] == user.index("")).all() and (ids[::5, 1] == 0).all()


def test_inconsistent_funnel_rows_are_dropped_from_training_only():
  bad = dict(_columns(50), click=[0.0] * 49 + [1.0], buy=[1.0] + [0.0] * 48 + [1.0])
  data = _data(splits={"train": bad, "validation": bad}, inconsistent_funnel="drop")
  assert data.num_examples("train") == 49 and data.num_examples("validation") == 50
  assert data.inconsistent_funnel_rows == {"train": 1}


def test_encoded_arrays_are_checked_against_the_schema():
  good = _data()
  arrays = {s: dict(a) for s, a in good.arrays.items()}
  arrays["train"]["categorical"] = arrays["train"]["categorical"].copy()
  arrays["train"]["categorical"][7, 0] = good.schema.categorical[0].vocab_size + 1
  with pytest.raises(ValueError, match=r"train/categorical row 7, field 'user': id \d+ outside"):
    pipeline.DatasetSplits(good.schema, good.preprocessing, arrays)
  arrays = {s: dict(a) for s, a in good.arrays.items()}
  arrays["validation"]["numeric"] = np.zeros((100, 2), np.float32)
  with pytest.raises(ValueError, match=r"validation/numeric has shape \(100, 2\); expected "
                                       r"\[100, 1\]"):
    pipeline.DatasetSplits(good.schema, good.preprocessing, arrays)
  # A training row's loss weight: finite, >= 0, and only for training (evaluation is unweighted).
  arrays = {s: dict(a) for s, a in good.arrays.items()}
  arrays["train"]["weight"] = np.ones(300, np.float32)
  pipeline.DatasetSplits(good.schema, good.preprocessing, arrays)
  arrays["train"]["weight"][3] = -1.0
  with pytest.raises(ValueError, match=r"train/weight row 3: -1.0; expected a finite number >= 0"):
    pipeline.DatasetSplits(good.schema, good.preprocessing, arrays)
  arrays["train"]["weight"] = np.ones(299, np.float32)
  with pytest.raises(ValueError, match=r"train/weight has shape \(299,\) .* expected float \[300\]"):
    pipeline.DatasetSplits(good.schema, good.preprocessing, arrays)
  arrays["train"].pop("weight")
  arrays["validation"]["weight"] = np.ones(100, np.float32)
  with pytest.raises(ValueError, match=r"split 'validation' has arrays \['weight'\] the schema"):
    pipeline.DatasetSplits(good.schema, good.preprocessing, arrays)
  # True probabilities for the oracle metrics: a finite float row per example, a column per task.
  arrays["validation"].pop("weight")
  arrays["validation"]["true_q"] = np.full((100, 2), 0.5)
  pipeline.DatasetSplits(good.schema, good.preprocessing, arrays)
  for bad, message in ((np.full((10, 2), 0.5), r"validation/true_q has shape \(10, 2\)"),
                       (np.full((100, 2), "a"), r"validation/true_q .* dtype <U1; expected "
                                                r"float \[100, 2\]"),
                       (np.array([[0.5, np.nan]] * 100), r"validation/true_q row 0, task "
                                                         r"'buy': nan is not a finite")):
    arrays["validation"]["true_q"] = bad
    with pytest.raises(ValueError, match=message):
      pipeline.DatasetSplits(good.schema, good.preprocessing, arrays)


def test_seeds_on_data_given_in_python_train_as_one_program(tmp_path):
  """``apem_jax.train_runs(configs, workdir, data=)``: two seeds of a dataset given in Python in
  one vmapped program; each run's directory evaluates, with the same data, as the run scored
  its best checkpoint on validation."""
  data = _data()
  configs = []
  for seed in (0, 1):
    config = common.base_config("shared_bottom")
    config.seed = seed
    config.train.update(batch_size=64, num_epochs=2, progress_bar=False)
    configs.append(config)
  summaries = apem_jax.train_runs(configs, str(tmp_path), data=data)
  assert summaries[0]["best_validation"] != summaries[1]["best_validation"]  # two seeds
  for i, (config, summary) in enumerate(zip(configs, summaries)):
    run_dir = tmp_path / f"run_{i}"
    assert json.loads((run_dir / "config.json").read_text())["data"] == {"name": "given"}
    result = apem_jax.evaluate_checkpoint(config, str(run_dir), "validation", data=data)
    assert result["step"] == summary["best_step"]
    for task, metrics in summary["best_validation"].items():
      assert result["metrics"][task]["auc"] == pytest.approx(metrics["auc"], abs=1e-6)


def test_public_names_and_registry():
  assert set(apem_jax.__all__) >= {"dataset_from_columns", "Experiment", "train_and_evaluate",
                                    "register_model", "bind_steps", "Balancing", "make_schema",
                                    "APEM", "restore_checkpoint"}
  assert all(getattr(apem_jax, name) is not None for name in apem_jax.__all__)
  with pytest.raises(ValueError, match="already registered"):
    apem_jax.register_model("mmoe", apem_jax.MODELS["mmoe"], defaults_of="mmoe")
  with pytest.raises(ValueError, match="exactly one of"):
    apem_jax.register_model("new_model", apem_jax.MODELS["mmoe"])


def test_importing_the_package_loads_neither_jax_nor_tensorflow():
  import subprocess
  import sys
  code = ("import sys, apem_jax; apem_jax.Task; "
          "print(sorted(m for m in ('jax', 'tensorflow') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_the_modules_docs_api_names_resolve_after_a_plain_import():
  """docs/api.md writes ``apem_jax.configs.census.get_config``, ``apem_jax.export.export`` and
  ``apem_jax.parallel.pmap_train_step``: after ``import apem_jax`` alone they raised
  AttributeError."""
  import subprocess
  import sys
  code = ("import apem_jax; print(apem_jax.configs.census.get_config('mmoe').model.name, "
          "apem_jax.configs.common.base_config('apem').model.name, "
          "apem_jax.parallel.pmap_train_step.__name__, apem_jax.export.export.__name__)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["mmoe", "apem", "pmap_train_step", "export"]


def test_pmap_refuses_a_step_bound_without_its_axis():
  """A step from ``bind_steps`` without ``axis_name`` under pmap trained every device on its own
  (no error, the replicas drifting apart)."""
  import optax  # pylint: disable=g-import-not-at-top
  from apem_jax import parallel  # pylint: disable=g-import-not-at-top
  schema = _data().schema
  model = apem_jax.build_model(common.base_config("mmoe").model, schema)
  tx = optax.sgd(0.1)
  unbound, _ = apem_jax.bind_steps(model, tx, schema, (1.0, 1.0))
  with pytest.raises(ValueError, match=r"bound with axis_name=None; bind it with "
                                       r"axis_name=parallel.PMAP_AXIS \('devices'\)"):
    parallel.pmap_train_step(unbound)
  bound, _ = apem_jax.bind_steps(model, tx, schema, (1.0, 1.0), axis_name=parallel.PMAP_AXIS)
  assert callable(parallel.pmap_train_step(bound))
