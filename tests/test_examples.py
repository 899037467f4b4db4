"""The scripts in examples/ run as a user runs them, and do what they say."""

import csv
import glob
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _funnel_csv(path: str, rows: int = 2400) -> None:
  """A funnel a user might export: string ids, a price, click and purchase labels (a purchase
  only after a click; some purchase labels missing, written as empty cells)."""
  rng = np.random.default_rng(0)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["split", "user", "item", "category", "price", "click", "purchase"])
    for i in range(rows):
      user, item = f"u{rng.integers(0, 50)}", f"item-{rng.integers(0, 80)}"
      category = ["shoes", "books", "toys"][rng.integers(0, 3)]
      click = int(rng.random() < (0.6 if category == "books" else 0.2))
      purchase = "" if rng.random() < 0.05 else int(click and rng.random() < 0.5)
      split = "train" if i % 10 < 8 else ("validation" if i % 10 == 8 else "test")
      writer.writerow([split, user, item, category, f"{rng.uniform(1, 100):.2f}", click, purchase])


def _run(*args: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_examples_run(tmp_path):
  _funnel_csv(str(tmp_path / "events.csv"))
  running = {
      "own_data": _run("examples/own_data.py", str(tmp_path / "events.csv"),
                       str(tmp_path / "own")),
      "by_hand": _run("examples/train_step_by_hand.py"),
      "custom": _run("examples/custom_selector.py", str(tmp_path / "custom")),
  }
  out = {}
  for name, process in running.items():
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, f"{name}:\n{stderr[-4000:]}"
    out[name] = stdout

  # Own data: trained on the CSV alone, evaluated on its test rows, exported with its strings.
  metrics = eval(out["own_data"].strip().splitlines()[-1])  # the printed dict
  assert set(metrics) == {"click", "purchase"}
  assert metrics["click"]["examples"] == 240 and metrics["click"]["auc"] > 0.6  # books click
  with open(tmp_path / "own_export" / "metadata.json") as f:
    meta = json.load(f)
  assert [t["depends_on"] for t in meta["tasks"]] == [None, "click"]
  assert set(meta["saved_model"]["inputs"]) == {"user", "item", "category", "price"}

  # By hand: the loss falls on a learnable batch stream.
  losses = [float(l.split("loss ")[1]) for l in out["by_hand"].splitlines() if "loss " in l]
  assert len(losses) == 5 and losses[-1] < 0.7 * losses[0], losses

  # Custom selector through the registry, with PCGrad: trained, and the checkpoint holds the
  # custom module's parameters.
  assert "apem_maxpool with PCGrad: best validation score" in out["custom"]
  with open(tmp_path / "custom" / "config.json") as f:
    config = json.load(f)
  assert config["model"]["name"] == "apem_maxpool" and config["train"]["balancing"] == "pcgrad"
  saved = glob.glob(str(tmp_path / "custom" / "checkpoints" / "*" / "state" / "_METADATA"))
  assert saved
  for path in saved:  # Orbax's record of the saved tree
    with open(path) as f:
      leaves = json.load(f)["tree_metadata"]
    assert "('params', 'pattern_selector', 'project', 'kernel')" in leaves, sorted(leaves)[:20]


def test_own_files_train_evaluate_and_export_from_a_spec_with_no_python(tmp_path):
  """A funnel CSV with string categories and a header, described by a spec a user writes: the
  command lines alone train it in funnel mode, evaluate it and export it."""
  _funnel_csv(str(tmp_path / "events.csv"))
  spec = {"format": {"type": "csv"}, "files": ["events.csv"], "split": {"split_column": "split"},
          "features": [{"name": "user", "type": "categorical"},
                       {"name": "item", "type": "categorical", "min_count": 2},
                       {"name": "category", "type": "categorical"},
                       {"name": "price", "type": "numeric", "transform": "log1p"}],
          "tasks": [{"name": "click", "label_column": "click"},
                    {"name": "purchase", "label_column": "purchase", "depends_on": "click",
                     "missing": "mask"}]}
  with open(tmp_path / "spec.json", "w") as f:
    json.dump(spec, f)
  config = [f"--config=configs/spec.py:{tmp_path / 'spec.json'},apem"]
  overrides = [f"--config.data.data_dir={tmp_path / 'data'}", "--config.train.batch_size=128",
               "--config.train.num_epochs=2", "--config.optimizer.warmup_steps=10",
               "--config.train.progress_bar=false"]
  workdir = f"--workdir={tmp_path / 'run'}"
  for command in ([sys.executable, "train.py", *config, workdir, *overrides],
                  [sys.executable, "eval.py", *config, workdir, "--split=test", *overrides[:1]],
                  [sys.executable, "eval.py", *config, workdir, "--split=test",
                   "--checkpoint=latest", "--explain", *overrides[:1]],
                  [os.path.join(os.path.dirname(sys.executable), "apem-export"), workdir,
                   f"--output={tmp_path / 'export'}"]):
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (command, result.stderr[-4000:])
  with open(tmp_path / "run" / "eval" / "test.json") as f:  # the best checkpoint's
    metrics = json.load(f)
  assert os.path.exists(tmp_path / "run" / "eval" / "test_latest.json")
  assert os.listdir(tmp_path / "run" / "explain") == ["test_latest"]  # not the best's name
  assert set(metrics) == {"click", "purchase"} and metrics["click"]["examples"] == 240
  assert metrics["purchase"]["examples"] < 240  # missing purchase labels are masked, not zeros
  with open(tmp_path / "export" / "metadata.json") as f:
    assert [t["depends_on"] for t in json.load(f)["tasks"]] == [None, "click"]
