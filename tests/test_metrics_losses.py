"""Exact AUC/logloss against independent computations; masked losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from apem_jax import losses, metrics
from apem_jax.schema import make_schema


@pytest.mark.parametrize("n,ties", [(50, False), (1000, True), (5000, False)])
def test_auc_matches_sklearn(n, ties):
  rng = np.random.default_rng(n)
  y = rng.random(n) < 0.3
  s = rng.normal(size=n) + y
  if ties:
    s = np.round(s, 1)  # many tied scores
  assert metrics.auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


def test_auc_brute_force_pairs():
  rng = np.random.default_rng(0)
  y = rng.random(200) < 0.5
  s = rng.integers(0, 5, size=200).astype(float)
  pos, neg = s[y], s[~y]
  expected = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
      len(pos) * len(neg))
  assert metrics.auc(y, s) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_auc_in_chunks_of_positives_with_ties_across_them(monkeypatch, dtype):
  """Positives compared with the negatives a few at a time (chunks of 7 here), tied scores
  straddling the chunks, scores in the model's float32 as in float64 and as integers."""
  monkeypatch.setattr(metrics, "_CHUNK_ROWS", 7)
  rng = np.random.default_rng(3)
  y = rng.random(500) < 0.4
  s = (rng.integers(0, 20, size=500) + 3 * y).astype(dtype)
  assert metrics.auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


def test_auc_single_class_is_nan():
  assert np.isnan(metrics.auc(np.ones(5), np.arange(5.0)))


def test_nan_scores_give_nan_auc_and_a_nan_selection_score():
  y = np.array([0, 1, 0, 1])
  assert np.isnan(metrics.auc(y, np.array([0.1, np.nan, 0.2, 0.3])))
  assert np.isnan(metrics.auc(y, np.full(4, np.nan)))
  schema = make_schema((), 1, ["a", "b"])
  labels = np.array([[0, 0], [1, 1], [0, 0], [1, 1]], np.float32)
  predictions = np.array([[0.1, 0.2], [0.9, np.nan], [0.2, 0.3], [0.8, 0.7]], np.float32)
  out = metrics.task_metrics(schema, labels, np.ones_like(labels), predictions)
  assert out["a"]["auc"] == 1.0 and np.isnan(out["b"]["auc"])
  assert np.isnan(metrics.selection_score(out, schema.tasks))


def test_logloss_matches_sklearn():
  rng = np.random.default_rng(1)
  y = rng.random(300) < 0.4
  p = rng.uniform(0.01, 0.99, size=300)
  assert metrics.logloss(y, p) == pytest.approx(skm.log_loss(y, p), rel=1e-9)


def test_task_metrics_respects_mask():
  schema = make_schema([3], 1, ["a", "b"])
  labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.float32)
  mask = np.array([[1, 1], [1, 0], [1, 1], [1, 1]], np.float32)
  preds = np.array([[0.9, 0.2], [0.1, 0.0], [0.8, 0.7], [0.3, 0.9]], np.float32)
  out = metrics.task_metrics(schema, labels, mask, preds)
  assert out["a"]["examples"] == 4 and out["b"]["examples"] == 3
  assert out["a"]["auc"] == 1.0
  assert out["b"]["auc"] == pytest.approx(skm.roc_auc_score([0, 1, 0], [0.2, 0.7, 0.9]))


def test_regression_metrics_and_selection_score():
  schema = make_schema([], 1, ["r"], kind="regression")
  out = metrics.task_metrics(schema, np.array([[1.0], [3.0]]), np.ones((2, 1)), np.array([[2.0], [1.0]]))
  assert out["r"]["mse"] == pytest.approx(2.5) and out["r"]["mae"] == pytest.approx(1.5)
  assert metrics.selection_score(out, schema.tasks) == pytest.approx(-2.5)


def test_multitask_loss_masks_and_weights():
  schema = make_schema([3], 1, ["a", "b"])
  logits = jnp.array([[0.0, 2.0], [1.0, -1.0], [5.0, 5.0]])
  batch = {"labels": jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
           "label_mask": jnp.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]),
           "weight": jnp.array([1.0, 1.0, 0.0])}  # third row is padding
  total, sums = losses.multitask_loss(logits, batch, schema, (1.0, 3.0))
  bce = lambda z, y: float(jnp.logaddexp(0.0, z) - y * z)
  task_a = (bce(0.0, 1.0) + bce(1.0, 0.0)) / 2
  task_b = bce(2.0, 0.0) / 1
  np.testing.assert_allclose(sums["count"], [2.0, 1.0])
  assert float(total) == pytest.approx(task_a + 3.0 * task_b, rel=1e-6)


def test_a_missing_regression_label_may_be_nan():
  schema = make_schema([], 1, ["r"], kind="regression")
  batch = {"labels": jnp.array([[1.0], [jnp.nan]]), "label_mask": jnp.array([[1.0], [0.0]]),
           "weight": jnp.ones(2)}
  value, grad = jax.value_and_grad(
      lambda l: losses.multitask_loss(l, batch, schema, (1.0,))[0])(jnp.array([[0.0], [4.0]]))
  assert float(value) == pytest.approx(1.0)
  np.testing.assert_allclose(grad, [[-2.0], [0.0]])


def test_regression_loss_is_squared_error():
  schema = make_schema([], 1, ["r"], kind="regression")
  batch = {"labels": jnp.array([[1.0], [2.0]]), "label_mask": jnp.ones((2, 1)), "weight": jnp.ones(2)}
  total, _ = losses.multitask_loss(jnp.array([[0.0], [4.0]]), batch, schema, (1.0,))
  assert float(total) == pytest.approx((1.0 + 4.0) / 2)
  np.testing.assert_allclose(losses.task_predictions(jnp.array([[3.0]]), schema), [[3.0]])
  assert jax.devices()[0].platform == "cpu"


def test_selection_score_leaves_out_undefined_aucs():
  schema = make_schema((), 1, ["a", "b"])
  out = {"a": {"auc": 0.8, "logloss": 0.4}, "b": {"auc": float("nan"), "logloss": 0.2}}
  assert metrics.selection_score(out, schema.tasks) == pytest.approx(0.8)  # b: one class
  out["a"]["auc"] = float("nan")
  assert metrics.selection_score(out, schema.tasks) == pytest.approx(-0.3)  # no AUC defined
  # A task without validation labels is left out of the logloss fallback too.
  out["b"] = {"auc": float("nan"), "logloss": float("nan"), "examples": 0}
  assert metrics.selection_score(out, schema.tasks) == pytest.approx(-0.4)


def test_nan_regression_predictions_give_a_nan_selection_score_beside_binary_tasks():
  tasks = (make_schema((), 1, ["a"]).tasks
           + make_schema((), 1, ["r"], kind="regression").tasks)
  out = {"a": {"auc": 0.8, "logloss": 0.4, "examples": 4},
         "r": {"mse": float("nan"), "mae": float("nan"), "examples": 4}}
  assert np.isnan(metrics.selection_score(out, tasks))
