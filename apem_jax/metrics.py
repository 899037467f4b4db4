"""Exact evaluation metrics over a whole split, computed on the host in NumPy.

AUC is the Mann-Whitney statistic with tied scores counted as half (average ranks), computed once
over every example of the split, never averaged over batches.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from apem_jax.schema import Schema

_EPS = 1e-7


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of ``x`` [N], ties given the mean of the ranks they span."""
  order = np.argsort(x, kind="mergesort")
  sorted_x = x[order]
  # Boundaries of runs of equal values.
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], len(x)]
  mean_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
  ranks = np.empty(len(x), dtype=np.float64)
  ranks[order] = np.repeat(mean_rank, ends - starts)
  return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve.

  Args:
    labels: [N] in {0, 1}.
    scores: [N] real scores (higher means more likely positive).

  Returns:
    The AUC, or NaN when only one class is present.
  """
  labels = np.asarray(labels, dtype=bool)
  scores = np.asarray(scores, dtype=np.float64)
  num_pos = int(labels.sum())
  num_neg = len(labels) - num_pos
  if num_pos == 0 or num_neg == 0:
    return float("nan")
  ranks = _average_ranks(scores)
  return float((ranks[labels].sum() - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
  """Mean binary cross-entropy of probabilities ``probs`` [N] against ``labels`` [N]."""
  p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0 - _EPS)
  y = np.asarray(labels, dtype=np.float64)
  return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def task_metrics(schema: Schema, labels: np.ndarray, label_mask: np.ndarray,
                 predictions: np.ndarray) -> dict[str, dict[str, float]]:
  """Per-task metrics over a split.

  Args:
    schema: gives the tasks and their kinds.
    labels: [N, T].
    label_mask: [N, T], 1 where the label is present.
    predictions: [N, T]; probabilities for binary tasks, values for regression tasks.

  Returns:
    ``{task: {"auc", "logloss", "positives", "examples"}}`` for binary tasks and
    ``{task: {"mse", "mae", "examples"}}`` for regression tasks.
  """
  out = {}
  for t, task in enumerate(schema.tasks):
    present = label_mask[:, t] > 0
    y, p = labels[present, t], predictions[present, t]
    if task.kind == "binary":
      out[task.name] = {"auc": auc(y, p), "logloss": logloss(y, p),
                        "positives": int(y.sum()), "examples": int(present.sum())}
    else:
      err = p.astype(np.float64) - y
      out[task.name] = {"mse": float(np.mean(err ** 2)), "mae": float(np.mean(np.abs(err))),
                        "examples": int(present.sum())}
  return out


def selection_score(metrics: Mapping[str, Mapping[str, float]], tasks: Sequence) -> float:
  """The number early stopping and best-checkpoint selection maximise.

  Mean AUC over binary tasks; minus the mean MSE when every task is a regression.
  """
  binary = [metrics[t.name]["auc"] for t in tasks if t.kind == "binary"]
  if binary:
    return float(np.mean(binary))
  return -float(np.mean([metrics[t.name]["mse"] for t in tasks]))
