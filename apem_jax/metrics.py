"""Exact evaluation metrics over a whole split, computed on the host in NumPy.

AUC is the Mann-Whitney statistic with tied scores counted as half, computed once over every
example of the split, never averaged over batches.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from apem_jax.schema import Schema

_EPS = 1e-7


_CHUNK_ROWS = 1 << 20  # rows (positives for the AUC) taken at a time: bounds the temporaries


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve: the Mann-Whitney statistic, exact, ties counted as one half.

  Each positive's score is looked up in the sorted negatives' scores (``searchsorted``: those
  strictly below, and those equal), a million positives at a time; besides the sorted scores
  (in their own precision) nothing of size N is held, so an exact AUC over millions of rows
  costs little more memory than the scores themselves.

  Args:
    labels: [N] in {0, 1}.
    scores: [N] real scores (higher means more likely positive).

  Returns:
    The AUC, or NaN when only one class is present or a score is NaN (NumPy sorts NaN last, so
    it would otherwise rank as the highest score).
  """
  labels = np.asarray(labels, dtype=bool)
  scores = np.asarray(scores)
  if not np.issubdtype(scores.dtype, np.floating):
    scores = scores.astype(np.float64)
  positives, negatives = scores[labels], scores[~labels]  # copies, sorted in place
  positives.sort()
  negatives.sort()
  num_pos, num_neg = len(positives), len(negatives)
  if num_pos == 0 or num_neg == 0 or np.isnan(positives[-1]) or np.isnan(negatives[-1]):
    return float("nan")
  below = ties = 0
  for start in range(0, num_pos, _CHUNK_ROWS):
    chunk = positives[start:start + _CHUNK_ROWS]
    left = np.searchsorted(negatives, chunk, side="left")
    below += int(left.sum())
    ties += int((np.searchsorted(negatives, chunk, side="right") - left).sum())
  return (below + 0.5 * ties) / (num_pos * num_neg)


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
  """Mean binary cross-entropy of probabilities ``probs`` [N] against ``labels`` [N], summed in
  float64 a million rows at a time (no float64 copy of the whole split)."""
  labels, probs = np.asarray(labels), np.asarray(probs)
  total = 0.0
  for start in range(0, len(labels), _CHUNK_ROWS):
    p = np.clip(probs[start:start + _CHUNK_ROWS].astype(np.float64), _EPS, 1.0 - _EPS)
    y = labels[start:start + _CHUNK_ROWS].astype(np.float64)
    total += float(np.sum(y * np.log(p) + (1.0 - y) * np.log1p(-p)))
  return -total / len(labels) if len(labels) else float("nan")


def _rows(a: np.ndarray, present: np.ndarray, t: int) -> np.ndarray:
  """Column ``t`` of ``a`` [N, T] at the ``present`` rows: a view when every row is present
  (no copy of a split-sized column)."""
  return a[:, t] if present.all() else a[present, t]


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
    y, p = _rows(labels, present, t), _rows(predictions, present, t)
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

  Mean AUC over the binary tasks whose AUC is defined. A task whose validation labels hold one
  class has AUC NaN (reported as such) and is left out; if no binary task has a defined AUC, the
  score is minus the mean logloss of those with labels. Minus the mean MSE when no binary task
  has labels. A task without validation labels is left out. So a score is NaN only when some
  predictions are (of any task) or no task has a label, and never blocks the best checkpoint of
  a valid run.
  """
  labelled = lambda kind: [metrics[t.name] for t in tasks
                           if (t.kind == "binary") == (kind == "binary")
                           and metrics[t.name].get("examples", 1)]
  binary, regression = labelled("binary"), labelled("regression")
  if (any(np.isnan(m["logloss"]) for m in binary)
      or any(np.isnan(m["mse"]) for m in regression)):
    return float("nan")  # some predictions are NaN (an AUC alone would leave them out)
  aucs = [m["auc"] for m in binary if np.isfinite(m["auc"])]
  if aucs:
    return float(np.mean(aucs))
  if binary:
    return -float(np.mean([m["logloss"] for m in binary]))
  if regression:
    return -float(np.mean([m["mse"] for m in regression]))
  return float("nan")


# --------------------------------------------------------------------------------------------
# Conversion funnels
# --------------------------------------------------------------------------------------------

def entire_space_probabilities(conditional: np.ndarray, parents: Sequence[int]) -> np.ndarray:
  """True (or predicted) conditional probabilities q [N, T] -> entire-space p [N, T]:
  ``p_t = q_t * p_parent(t)`` (``parents[t] = -1``: ``p_t = q_t``)."""
  q = np.asarray(conditional, dtype=np.float64)
  p = np.empty_like(q)
  for t, parent in enumerate(parents):
    p[:, t] = q[:, t] if parent < 0 else q[:, t] * p[:, parent]
  return p


def funnel_metrics(schema: Schema, labels: np.ndarray, label_mask: np.ndarray,
                   predictions: np.ndarray, conditional: np.ndarray,
                   true_conditional: np.ndarray | None = None,
                   entire_space: Mapping[str, Mapping[str, float]] | None = None
                   ) -> dict[str, dict[str, float]]:
  """Per-step metrics of a conversion funnel (schema tasks with ``depends_on``).

  Args:
    schema: the tasks; only the binary ones get funnel metrics.
    labels: [N, T]; ``y_t = 1`` only if the example went through step t.
    label_mask: [N, T], 1 where the label is present.
    predictions: [N, T] entire-space probabilities ``p_t``.
    conditional: [N, T] conditional probabilities ``q_t`` (step t given its parent step).
    true_conditional: optional [N, T] true ``q_t`` of synthetic data (the generating model).
    entire_space: optional :func:`task_metrics` of the same arrays: its ``auc`` and ``logloss``
      are taken instead of computed again (each an exact pass over the split).

  Returns:
    ``{task: metrics}`` with, on the entire space (every example whose label is present):
    ``auc``, ``logloss``, ``calibration`` (mean ``p_t`` over the observed rate ``mean y_t``; 1 is
    calibrated); on the examples whose parent step happened (parent label present and 1; for a
    root step, the entire space): ``auc_conditional`` (AUC of ``q_t``), ``conditional_examples``;
    for a dependent step ``violation_rate``, the fraction of examples with ``p_t > p_parent``
    (0 by construction for chained heads); and, with ``true_conditional``: ``oracle_auc`` and
    ``oracle_logloss`` (the true ``p_t = prod q`` scored the same way: the best achievable values),
    ``oracle_gap`` (``oracle_auc - auc``) and ``oracle_auc_conditional``.
  """
  parents = schema.parents
  true_p = (None if true_conditional is None
            else entire_space_probabilities(true_conditional, parents))
  out = {}
  for t, task in enumerate(schema.tasks):
    if task.kind != "binary":
      continue
    present = label_mask[:, t] > 0
    y, p = _rows(labels, present, t), _rows(predictions, present, t)
    rate = float(np.mean(y)) if len(y) else float("nan")
    if entire_space is None:
      m = {"auc": auc(y, p), "logloss": logloss(y, p)}
    else:
      m = {k: entire_space[task.name][k] for k in ("auc", "logloss")}
    m["calibration"] = float(np.mean(p)) / rate if rate > 0 else float("nan")
    parent = parents[t]
    reached = present if parent < 0 else present & (label_mask[:, parent] > 0) & (
        labels[:, parent] > 0)
    m["auc_conditional"] = auc(_rows(labels, reached, t), _rows(conditional, reached, t))
    m["conditional_examples"] = int(reached.sum())
    if parent >= 0:
      m["violation_rate"] = float(np.mean(predictions[:, t] > predictions[:, parent]))
    if true_p is not None:
      m["oracle_auc"] = auc(y, _rows(true_p, present, t))
      m["oracle_logloss"] = logloss(y, _rows(true_p, present, t))
      m["oracle_gap"] = m["oracle_auc"] - m["auc"]
      m["oracle_auc_conditional"] = auc(_rows(labels, reached, t),
                                          _rows(true_conditional, reached, t))
    out[task.name] = m
  return out
