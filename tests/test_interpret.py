"""The figures of ``eval.py --explain`` (apem_jax/interpret.py) from numbers alone: where they are
written, how single examples are scaled, and the redraw command's refusals."""

import json
import os
import sys

import matplotlib
import numpy as np
import pytest

from apem_jax import interpret, reporting

matplotlib.use("Agg")


def _explanation() -> dict:
  """Two tasks, three fields, two groups (one head): what ``interpret.explain`` returns."""
  rng = np.random.default_rng(0)
  softmax = lambda x, axis: np.exp(x) / np.exp(x).sum(axis, keepdims=True)
  fields = ["age", "country", "price"]
  return {"split": "validation", "examples_averaged": 100, "tasks": ["click", "buy"],
          "selection": "softmax", "fields": fields, "patterns": fields + ["group 0", "group 1"],
          "pattern_weights": softmax(rng.normal(size=(2, 5)), -1),
          "group_weights": softmax(rng.normal(size=(1, 2, 3)), -1),
          "group_assignment": softmax(rng.normal(size=(1, 2, 3)), -2),
          # example 0 all but uniform, example 1 peaked: not alike when drawn on one scale
          "examples": np.stack([np.full((2, 5), 0.2) + [0.01, 0, 0, 0, -0.01],
                                np.tile([0.96, 0.01, 0.01, 0.01, 0.01], (2, 1))])}


def test_figures_go_through_the_atomic_writer_to_any_directory(tmp_path, monkeypatch):
  """The figures were saved with matplotlib's own open(): a gs:// workdir's figures went to a
  local ./gs:/... folder (explanation.json went to the bucket), and a kill left half a PNG."""
  written = {}
  monkeypatch.setattr(reporting, "write_bytes_atomic",
                      lambda path, data: written.__setitem__(str(path), data))
  monkeypatch.chdir(tmp_path)
  paths = interpret.plot(_explanation(), "gs://bucket/run/explain/validation")
  names = ["assignment.png", "examples.png", "explanation.json", "groups.png", "patterns.png"]
  assert sorted(written) == sorted(paths) == [f"gs://bucket/run/explain/validation/{n}"
                                              for n in names]
  assert all(data.startswith(b"\x89PNG") for p, data in written.items() if p.endswith(".png"))
  assert os.listdir(tmp_path) == []


def test_single_examples_share_one_colour_scale(tmp_path, monkeypatch):
  """Each example's heatmap had its own colour limits and no colour bar: an all but uniform
  example (0.19-0.21) looked as peaked as one of 0.01-0.96."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figures = []
  close = plt.close
  monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig) or close(fig))
  interpret.plot(_explanation(), str(tmp_path))
  examples = figures[-1]
  images = [ax.images[0] for ax in examples.axes if ax.images]
  assert len(images) == 2
  assert {image.get_clim() for image in images} == {(0.0, 0.96)}
  assert len(examples.axes) == 3  # the two examples and one colour bar


@pytest.mark.parametrize("content, expected", [
    ("{\"click\": {\"auc\": 0.7}}", "no ['split', 'examples_averaged', 'tasks', 'fields', "
     "'patterns', 'pattern_weights', 'group_weights', 'examples'] in it"),
    ("{\"split\": \"valid", "not valid JSON"),
])
def test_redraw_refuses_a_file_that_is_not_an_explanation(tmp_path, monkeypatch, capsys,
                                                          content, expected):
  """``python -m apem_jax.interpret`` given eval/validation.json, or a truncated file: a
  KeyError or JSONDecodeError traceback (after drawing some figures, for a file lacking only
  its examples)."""
  path = tmp_path / "explanation.json"
  path.write_text(content)
  monkeypatch.setattr(sys, "argv", ["interpret", str(path)])
  with pytest.raises(SystemExit) as info:
    interpret.main()
  assert info.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert error.startswith(f"python -m apem_jax.interpret: error: {path}: ") and expected in error
  assert sorted(os.listdir(tmp_path)) == ["explanation.json"]
  partial = {k: v.tolist() if isinstance(v, np.ndarray) else v
             for k, v in _explanation().items() if k != "examples"}
  path.write_text(json.dumps(partial))
  with pytest.raises(SystemExit):
    interpret.main()
  assert "no ['examples'] in it" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ["explanation.json"]


def test_format_table_tells_an_absent_metric_from_an_undefined_one():
  """A binary and a regression task: both rows showed ``nan`` for the other's metrics, as for
  an AUC of one class."""
  table = reporting.format_table({"click": {"auc": float("nan"), "logloss": 0.5},
                                  "dwell": {"mse": 2.0}})
  rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:]}
  assert rows == {"click": ["nan", "0.5000", "-"], "dwell": ["-", "-", "2.0000"]}
