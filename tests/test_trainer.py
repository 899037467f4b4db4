"""The trainer end to end on tiny synthetic data: train -> evaluate -> interrupt -> resume."""

import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import ml_collections
import numpy as np
import pytest

from apem_jax import checkpointing, parallel, reporting, step as step_lib, trainer
from apem_jax.configs import common
from apem_jax.models.defaults import default_model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(model: str = "apem", **data_overrides) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.data = ml_collections.ConfigDict(dict(
      name="synthetic_mmoe",
      synthetic=dict(input_dim=6, num_examples=2400, correlation=0.9, task_kind="binary", seed=3,
                     **data_overrides)))
  config.model = default_model_config(model)
  config.model.embed_dim = 8
  if model == "apem":
    config.model.update(num_blocks=1, num_groups=4, tower_hidden=(16,), indicator_hidden=8)
  config.train.update(batch_size=64, eval_batch_size=128, num_epochs=3, log_every=10,
                      progress_bar=False, patience=5)
  config.optimizer.update(schedule="constant", learning_rate=3e-3)
  return config


def tiny_mlp_config() -> ml_collections.ConfigDict:
  """The tiny config with the shared-bottom MLP: quick to compile and to step, for the tests of
  what does not depend on the model (workdirs, resumes, command lines)."""
  return tiny_config("shared_bottom")


def write_config_file(path, module: str, function: str) -> str:
  """A config file for the command lines whose ``get_config()`` returns
  ``<module>.<function>()``, a module of tests/; returns its path."""
  path.write_text(f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
                  f"from {module} import {function}\n\n\n"
                  f"def get_config():\n  return {function}()\n")
  return str(path)


def _params(workdir, config, kind=checkpointing.LATEST):
  exp = trainer.Experiment(config)
  ckpt = checkpointing.Checkpoints(workdir, read_only=True)
  state, meta = ckpt.restore(exp.abstract_state, kind)
  ckpt.close()
  return state, meta


def _metrics(summary: dict) -> list:
  """The evaluations of a run's history, without their timings."""
  return [{k: v for k, v in h.items() if k != "train_seconds"} for h in summary["history"]]


def _interrupt_after(monkeypatch, step: int, exception=KeyboardInterrupt):
  """Makes the next runs' input pipeline raise ``exception`` when asked for batch ``step + 1``
  of the run (a crash right after step ``step``)."""
  real = trainer.train_batches_from

  def interrupted(exp, position):
    done = position["epoch"] * exp.steps_per_epoch + position["batch"]
    for batch in real(exp, position):
      if done == step:
        raise exception("simulated crash")
      done += 1
      yield batch
  monkeypatch.setattr(trainer, "train_batches_from", interrupted)


def test_train_evaluate_and_resume_exactly(tmp_path, monkeypatch):
  config = tiny_config()
  straight = str(tmp_path / "straight")
  summary = trainer.train_and_evaluate(config, straight)
  assert summary["epochs"] == 3 and summary["steps"] == 90 and summary["stopped_by"] is None
  assert summary["train_step_traces"] == 1 and summary["eval_step_traces"] == 1
  assert 0.5 < summary["best_validation_score"] <= 1.0  # learned something on easy data
  with open(os.path.join(straight, "metrics.json")) as f:
    assert json.load(f)["best_step"] == summary["best_step"]
  assert os.listdir(os.path.join(straight, "tensorboard"))

  # A second run saves every 7 steps and crashes mid-epoch (step 45 of 90); the restart in the
  # same workdir continues from step 42 with the batches the first run would have seen next.
  resumed = str(tmp_path / "resumed")
  config.train.checkpoint_every_steps = 7  # does not change the trajectory
  _interrupt_after(monkeypatch, 45)
  with pytest.raises(KeyboardInterrupt):
    trainer.train_and_evaluate(config, resumed)
  monkeypatch.undo()
  assert checkpointing.Checkpoints(resumed, read_only=True).steps() == [30, 35, 42]
  resumed_summary = trainer.train_and_evaluate(config, resumed)
  assert [h["epoch"] for h in resumed_summary["history"]] == [1, 2, 3]
  assert _metrics(resumed_summary) == _metrics(summary)  # every validation metric, exactly

  a, _ = _params(straight, config)
  b, meta = _params(resumed, config)
  assert meta["step"] == int(a.step) == int(b.step) == 90
  assert meta["data_position"] == {"epoch": 3, "batch": 0, "steps_per_epoch": 30, "groups": 1}
  chex.assert_trees_all_equal(a, b)  # bit for bit: parameters, Adam moments, step, key

  # The best checkpoint evaluates to the metrics recorded for it.
  result = trainer.evaluate_checkpoint(config, straight, "validation")
  assert result["step"] == summary["best_step"]
  for task, m in result["metrics"].items():
    assert m["auc"] == pytest.approx(summary["best_validation"][task]["auc"], abs=1e-6)
    assert m["examples"] == 240


def test_step_compiles_once_and_eval_padding_needs_no_retrace():
  config = tiny_config()
  exp = trainer.Experiment(config)
  bound_train, bound_eval = step_lib.bind_steps(exp.model, exp.tx, exp.schema, (1.0, 1.0))

  @chex.assert_max_traces(n=1)
  def train_fn(state, batch):
    return bound_train(state, batch)

  @chex.assert_max_traces(n=1)
  def eval_fn(state, batch):
    return bound_eval(state, batch)

  train_step = parallel.jit_train_step(train_fn, exp.mesh, exp.state_sharding)
  eval_step = parallel.jit_eval_step(eval_fn, exp.mesh, exp.state_sharding)
  state = exp.init_state()
  batches = exp.data.train_batches(64, seed=0)
  for _ in range(3):
    state, metrics = train_step(state, parallel.global_batch(next(batches), exp.mesh))
  assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))
  eval_batches = list(exp.data.eval_batches("validation", 96))  # 240 rows: last batch padded
  assert float(eval_batches[-1]["weight"].sum()) == 240 - 2 * 96
  for local in eval_batches:
    eval_step(state, parallel.global_batch(local, exp.mesh))
  # The batch really is split over all 8 devices.
  batch = parallel.global_batch(eval_batches[0], exp.mesh)
  assert len(batch["numeric"].sharding.device_set) == jax.device_count() == 8


def test_nan_loss_stops_with_clear_error(tmp_path, monkeypatch):
  config = tiny_config()
  real = trainer.train_batches_from

  def poisoned(exp, position):
    for batch in real(exp, position):
      batch = dict(batch, numeric=np.full_like(batch["numeric"], np.nan))
      yield batch

  monkeypatch.setattr(trainer, "train_batches_from", poisoned)
  with pytest.raises(FloatingPointError, match="training loss is nan at step 10"):
    trainer.train_and_evaluate(config, str(tmp_path / "nan"))


def test_nan_label_names_the_task_and_step(tmp_path, monkeypatch):
  config = tiny_config()
  real = trainer.train_batches_from

  def nan_labels(exp, position):
    for i, batch in enumerate(real(exp, position)):
      if i == 3:  # the 4th step: task y2 only; NaN parameters then spread to y1 at step 5
        labels = batch["labels"].copy()
        labels[:, 1] = np.nan
        batch = dict(batch, labels=labels)
      yield batch

  monkeypatch.setattr(trainer, "train_batches_from", nan_labels)
  with pytest.raises(FloatingPointError, match=r"at step 10 \(not finite: task 'y2' from step 4, "
                                               r"task 'y1' from step 5\).*then train in a new "
                                               r"--workdir"):
    trainer.train_and_evaluate(config, str(tmp_path / "nan"))


def test_a_save_between_log_steps_checks_the_loss_first(tmp_path, monkeypatch):
  """A checkpoint saved between two log steps (``train.checkpoint_every_steps``, a stop) after
  the loss became non-finite: the run fails there and the checkpoint is not written."""
  config = tiny_config()
  config.train.update(log_every=50, checkpoint_every_steps=3)
  real = trainer.train_batches_from

  def nan_labels(exp, position):
    for i, batch in enumerate(real(exp, position)):
      if i == 1:
        batch = dict(batch, labels=np.full_like(batch["labels"], np.nan))
      yield batch

  monkeypatch.setattr(trainer, "train_batches_from", nan_labels)
  workdir = tmp_path / "nan"
  with pytest.raises(FloatingPointError, match=r"at step 3 \(not finite: task 'y1' from step 2"):
    trainer.train_and_evaluate(config, str(workdir))
  ckpt = checkpointing.Checkpoints(str(workdir), read_only=True)
  assert ckpt.steps() == []
  ckpt.close()


def test_config_errors_name_the_key(tmp_path):
  config = tiny_config()
  config.train.task_weights = (1.0, 1.0, 1.0)
  with pytest.raises(ValueError, match="train.task_weights has 3 entries"):
    trainer.Experiment(config)
  config = tiny_config()
  config.train.batch_size = 60
  with pytest.raises(ValueError, match="train.batch_size=60 must be divisible"):
    trainer.Experiment(config)
  config = tiny_config()
  config.optimizer.learning_rate = -1.0
  with pytest.raises(ValueError, match="optimizer.learning_rate"):
    trainer.Experiment(config)
  # Values that trained without a word: a negative final ratio ends the schedule going uphill,
  # weights all 0 never train, NaN compared false with every bound.
  for key, value, match in [
      ("seed", -1, r"seed=-1; expected an int in \[0, 2\*\*63\)"),  # else numpy refused it late
      ("optimizer.final_lr_ratio", -1.0, r"final_lr_ratio=-1.0; expected a number >= 0"),
      ("optimizer.b2", 1.5, r"optimizer.b2=1.5; expected a number in \[0, 1\)"),
      ("optimizer.weight_decay", -0.1, r"weight_decay=-0.1; expected a number >= 0"),
      ("optimizer.warmup_steps", -100, r"warmup_steps=-100; expected an int >= 0"),
      ("optimizer.learning_rate", float("nan"), r"learning_rate=nan must be positive"),
      ("optimizer.learning_rate", float("inf"), r"learning_rate=inf; expected a finite"),
      ("train.task_weights", (0.0, 0.0), r"task_weights=\(0.0, 0.0\); expected one number >= 0 "
                                         r"per task \['y1', 'y2'\], not all 0"),
      ("train.task_weights", ("abc",), r"task_weights=\('abc',\); expected one number"),
      ("train.task_weights", (1.0, float("nan")), r"task_weights=\(1.0, nan\)")]:
    config = tiny_config()
    config.update_from_flattened_dict({key: value})
    with pytest.raises(ValueError, match=match):
      trainer.Experiment(config)


@pytest.mark.parametrize("module, arg", [("census", "mmoe"), ("census_apem", None),
                                         ("synthetic", "mmoe,0.5"), ("funnel", "aitm"),
                                         ("spec", "events.json,apem")])
def test_every_shipped_config_takes_a_data_dir(module, arg):
  """The synthetic and funnel configs had no data.data_dir: --config.data.data_dir=... was "no
  key", and their files went under ./data whatever the README said."""
  import importlib  # pylint: disable=g-import-not-at-top
  from apem_jax import config_validation  # pylint: disable=g-import-not-at-top
  get_config = importlib.import_module(f"apem_jax.configs.{module}").get_config
  config = get_config(arg) if arg else get_config()
  assert config.data.data_dir == "data"
  config_validation.apply_override(config, "data.data_dir=/shared/data", "--config")
  assert config.data.data_dir == "/shared/data"


def test_set_override_parses_by_the_keys_type_unset_placeholders_too():
  """``--set`` (benchmarks/quality.py) refused keys whose default is an unset placeholder
  (``train.calibration_weight``, ``data.stream``): it read the type from the value, None."""
  from apem_jax import config_validation  # pylint: disable=g-import-not-at-top
  from apem_jax.configs import funnel  # pylint: disable=g-import-not-at-top
  config = funnel.get_config("aitm")
  for override in ("train.calibration_weight=0.3", "data.stream=true", "data.shard_rows=700",
                   "train.batch_size=2048"):
    config_validation.apply_override(config, override)
  assert (config.train.calibration_weight, config.data.stream, config.data.shard_rows,
          config.train.batch_size) == (0.3, True, 700, 2048)
  for override, match in (("data.stream=yes", "data.stream is a bool; expected true or false"),
                          ("train.nosuch=1", "no config key 'train.nosuch'"),
                          ("data.shard_rows=1.5", "data.shard_rows has type int")):
    with pytest.raises(ValueError, match=match):
      config_validation.apply_override(config, override)


def test_a_key_one_config_lacks_and_the_other_holds_unset_or_at_default_is_no_difference():
  """A config built without its unset keys (``data.stream`` None) was refused against a
  checkpoint that holds them ("the run's trajectory" on resume, "a different config" on eval);
  only the other direction (a checkpoint older than the key) was forgiven."""
  from apem_jax import config_validation  # pylint: disable=g-import-not-at-top
  saved = tiny_config().to_dict()
  saved["data"].update(stream=None, shard_rows=None)
  saved["train"]["funnel"] = "entire_space"  # the default
  current = tiny_config().to_dict()
  del current["train"]["funnel"]
  for a, b in ((saved, current), (current, saved)):
    assert config_validation.saved_config_differences(a, b) == []
    assert config_validation.resume_diff(a, b) == ([], {})
  saved["train"]["funnel"] = "conditional"  # not the default: a difference either way
  for a, b in ((saved, current), (current, saved)):
    assert config_validation.saved_config_differences(a, b) == ["train.funnel"]
  # Where the prepared shards are cut does not change a model: eval and export accept it.
  current["data"]["shard_rows"] = 5000
  assert config_validation.model_data_diff(saved, current) == ["train.funnel"]


def test_eval_refuses_missing_checkpoint_and_mismatched_config(tmp_path):
  config = tiny_config()
  with pytest.raises(FileNotFoundError, match="no best checkpoint"):
    trainer.evaluate_checkpoint(config, str(tmp_path / "empty"), "test")
  config.train.num_epochs = 1
  trainer.train_and_evaluate(config, str(tmp_path / "run"))
  other = tiny_config()
  other.train.num_epochs = 1
  other.model.num_groups = 2
  with pytest.raises(ValueError, match="model.num_groups"):
    trainer.evaluate_checkpoint(other, str(tmp_path / "run"), "test")


def test_command_line_rejects_unknown_key(tmp_path):
  result = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/census_apem.py", "--workdir",
       str(tmp_path / "w"), "--config.train.no_such_key=3"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "no_such_key" in result.stderr
  assert not (tmp_path / "w").exists()


def _tree(directory) -> dict[str, bytes]:
  """Every file under ``directory`` with its contents."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def test_a_workdir_is_only_changed_by_a_run_it_accepts(tmp_path, capsys):
  config = tiny_mlp_config()
  config.train.num_epochs = 1
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  before = _tree(workdir)

  changed = tiny_mlp_config()
  changed.train.num_epochs = 2
  changed.seed = 1
  changed.optimizer.learning_rate = 1e-2
  changed.train.batch_size = 128
  with pytest.raises(ValueError, match=r"change the run's trajectory: \['optimizer.learning_rate', "
                                       r"'seed', 'train.batch_size'\]"):
    trainer.train_and_evaluate(changed, workdir)
  shorter = tiny_mlp_config()
  shorter.train.num_epochs = 1
  shorter.model.tower_hidden = (8,)
  with pytest.raises(ValueError, match=r"\['model.tower_hidden'\]"):
    trainer.train_and_evaluate(shorter, workdir)
  assert _tree(workdir) == before  # config.json and preprocessing.json included

  # The same config on data that changed (one label): refused, naming the cause.
  real_load = trainer.load_dataset

  def one_label_changed(data_config):
    data = real_load(data_config)
    data.arrays["train"]["labels"][0, 0] = 1.0 - data.arrays["train"]["labels"][0, 0]
    return data

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(trainer, "load_dataset", one_label_changed)
    with pytest.raises(ValueError, match="the data changed since the checkpoint was trained"):
      trainer.train_and_evaluate(tiny_mlp_config(), workdir)
  assert _tree(workdir) == before

  # num_epochs may grow and patience change; the run records it.
  longer = tiny_mlp_config()
  longer.train.update(num_epochs=2, patience=7)
  capsys.readouterr()
  summary = trainer.train_and_evaluate(longer, workdir)
  assert "The learning rate at step 30 stays 0.003." in capsys.readouterr().out
  assert [h["epoch"] for h in summary["history"]] == [1, 2]
  assert summary["resumes"] == [{"step": 30, "changed": {"train.num_epochs": [1, 2],
                                                          "train.patience": [5, 7]}}]
  # Rerunning the finished run changes nothing, and records no second change.
  assert trainer.train_and_evaluate(longer, workdir)["resumes"] == summary["resumes"]


def test_a_longer_run_says_what_it_does_to_the_cosine_learning_rate():
  config = tiny_mlp_config()
  config.optimizer.update(schedule="cosine", learning_rate=1e-2, warmup_steps=0,
                          final_lr_ratio=0.0)
  # Step 10 of 20 steps: half the cosine, 0.005; of 40: a quarter, 0.01 * (1 + cos(pi/4)) / 2.
  assert trainer._schedule_change(config, 10, 10, 2, 4) == (
      "The learning-rate schedule now spans 4 epochs, not 2: the rate at step 10 is 0.008536, "
      "not 0.005.")


def test_a_deleted_newest_checkpoint_resumes_from_the_one_before_never_from_scratch(tmp_path):
  config = tiny_mlp_config()
  config.train.update(num_epochs=1, checkpoint_every_steps=10)
  workdir = str(tmp_path / "run")
  straight = trainer.train_and_evaluate(config, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "30"))
  summary = trainer.train_and_evaluate(config, workdir)
  assert summary["steps"] == 30 and _metrics(summary) == _metrics(straight)
  assert summary["wall_seconds_this_run"] > 0 and len(summary["history"]) == 1


def test_a_single_class_validation_task_does_not_block_the_best_checkpoint(tmp_path,
                                                                            monkeypatch):
  real_load = trainer.load_dataset

  def one_class(data_config):
    data = real_load(data_config)
    data.arrays["validation"]["labels"][:, 1] = 0.0
    return data

  monkeypatch.setattr(trainer, "load_dataset", one_class)
  config = tiny_config()
  config.train.num_epochs = 1
  summary = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  best = summary["best_validation"]
  assert np.isnan(best["y2"]["auc"])  # reported as such
  assert summary["best_step"] == 30
  assert summary["best_validation_score"] == pytest.approx(best["y1"]["auc"])
  result = trainer.evaluate_checkpoint(config, str(tmp_path / "run"), "validation")
  assert result["step"] == 30


@pytest.mark.parametrize("process", [0, 1])
def test_only_process_0_prepares_the_data_the_others_wait(monkeypatch, process):
  calls = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: process)
  monkeypatch.setattr(trainer, "load_dataset", lambda data_config: calls.append("load") or "data")
  monkeypatch.setattr(trainer.multihost_utils, "sync_global_devices",
                      lambda name: calls.append("barrier"))
  assert trainer.load_dataset_prepared_once(None) == "data"
  assert calls == (["load", "barrier"] if process == 0 else ["barrier", "load"])


def _scramble_data_files(checkpoint_dir: str) -> None:
  """Random bytes in the middle of every data file of a checkpoint's state."""
  rng = np.random.default_rng(0)
  for root, _, files in os.walk(os.path.join(checkpoint_dir, "state")):
    if os.path.basename(root) != "d":
      continue
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size // 2)
        f.write(rng.bytes(min(64, size - size // 2)))


def test_a_corrupt_checkpoint_is_named_and_the_run_falls_back_to_one_that_restores(tmp_path,
                                                                                  capsys):
  config = tiny_mlp_config()
  config.train.update(num_epochs=1, checkpoint_every_steps=10)
  workdir = str(tmp_path / "run")
  straight = trainer.train_and_evaluate(config, workdir)
  both = str(tmp_path / "both")
  shutil.copytree(workdir, both)
  newest = os.path.join(workdir, "checkpoints", "30")
  _scramble_data_files(newest)
  summary = trainer.train_and_evaluate(config, workdir)  # redoes steps 21-30, saves 30 again
  out = capsys.readouterr().out
  assert f"checkpoint {newest} " in out and "trying the checkpoint before it" in out
  assert "Resuming from" in out and "at step 20" in out
  assert _metrics(summary) == _metrics(straight)
  a, _ = _params(workdir, config)  # the re-saved step restores
  assert int(a.step) == 30

  for step in (20, 30):
    _scramble_data_files(os.path.join(both, "checkpoints", str(step)))
  before = _tree(both)
  with pytest.raises(checkpointing.CorruptCheckpointError, match="no checkpoint restores"):
    trainer.train_and_evaluate(config, both)
  assert _tree(both) == before


def test_a_balancing_method_trains_and_its_state_resumes_exactly(tmp_path, monkeypatch):
  config = tiny_config("mmoe")
  config.train.update(num_epochs=2, balancing="uncertainty")  # state: log-variances, their Adam
  straight = trainer.train_and_evaluate(config, str(tmp_path / "straight"))
  assert straight["best_validation_score"] > 0.5
  # The loss weights are curves in TensorBoard: exp(-s_t) / 2 for a binary task, moving from 0.5.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(tmp_path / "straight" / "tensorboard"))
  events.Reload()
  for task in ("y1", "y2"):
    weights = [e.value for e in events.Scalars(f"train/loss_weight/{task}")]
    assert len(weights) >= 4 and np.all(np.isfinite(weights)) and np.ptp(weights) > 1e-4
  _interrupt_after(monkeypatch, 40)
  with pytest.raises(KeyboardInterrupt):
    trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
  monkeypatch.undo()
  resumed = trainer.train_and_evaluate(config, str(tmp_path / "resumed"))  # from step 30
  assert _metrics(resumed) == _metrics(straight)
  a, _ = _params(str(tmp_path / "straight"), config)
  b, _ = _params(str(tmp_path / "resumed"), config)
  assert np.all(np.asarray(a.balance["log_var"]) != 0.0)  # it learned the weights
  chex.assert_trees_all_equal(a, b)


def test_scalars_that_are_not_finite_are_left_out_of_tensorboard(tmp_path, capfd):
  """An undefined AUC (NaN) was written, and tensorboardX logged "NaN or Inf found" for each."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  writer = reporting.ScalarWriter(str(tmp_path))
  writer.write(1, {"validation/click/auc": 0.7, "validation/buy/auc": float("nan")})
  writer.write(2, {"validation/click/auc": 0.8, "validation/buy/auc": 0.6})
  writer.close()
  events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  events.Reload()
  assert [e.step for e in events.Scalars("validation/click/auc")] == [1, 2]
  assert [(e.step, e.value) for e in events.Scalars("validation/buy/auc")] == [
      (2, np.float32(0.6))]  # (stored as float32)
  assert "NaN or Inf" not in capfd.readouterr().err


def test_a_key_added_to_the_library_at_its_default_does_not_block_a_resume(tmp_path):
  """A run checkpointed before a config key existed resumes when the key is at its default; at
  another value, the key is a change of the trajectory."""
  config = tiny_mlp_config()
  config.train.num_epochs = 1
  config.optimizer.embedding_optimizer = "adagrad"  # embedding_l2 is the table optimizer's
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  # The checkpoint as an older version of the library wrote it: without two keys.
  ckpt = checkpointing.Checkpoints(workdir)
  exp = trainer.Experiment(config)
  state, meta = ckpt.restore(exp.abstract_state)
  del meta["config"]["optimizer"]["embedding_l2"], meta["config"]["model"]["dropout"]
  ckpt.save(30, state, meta, score=meta["score"])
  ckpt.close()
  longer = tiny_mlp_config()
  longer.train.num_epochs = 2
  longer.optimizer.embedding_optimizer = "adagrad"
  assert trainer.train_and_evaluate(longer, workdir)["steps"] == 60
  other = tiny_mlp_config()
  other.train.num_epochs = 3
  other.optimizer.update(embedding_optimizer="adagrad", embedding_l2=0.1)
  with pytest.raises(ValueError, match=r"trajectory: \['optimizer.embedding_l2'\]"):
    trainer.train_and_evaluate(other, workdir)


def test_eval_explains_what_apem_learned(tmp_path):
  """``eval.py --explain`` on a trained APEM: the averaged weights are distributions, and the
  figures and numbers are written."""
  from apem_jax import interpret
  config = tiny_config()
  config.train.num_epochs = 1
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  exp, state, _ = trainer.restore_checkpoint(config, workdir)
  explanation = interpret.explain(exp, state, "validation", num_examples=3)
  assert explanation["examples_averaged"] == 240
  weights = explanation["pattern_weights"]
  assert weights.shape == (2, 6 + 4) and len(explanation["patterns"]) == 10
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(explanation["group_weights"].sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(explanation["group_assignment"].sum(-2), 1.0, rtol=1e-5)
  assert explanation["examples"].shape == (3, 2, 10)
  paths = interpret.plot(explanation, str(tmp_path / "explain"))
  drawn = ["assignment.png", "examples.png", "explanation.json", "groups.png", "patterns.png"]
  assert sorted(os.path.basename(p) for p in paths) == drawn
  # Drawn again from the numbers alone.
  for p in paths[:-1]:
    os.remove(p)
  redraw = subprocess.run([sys.executable, "-m", "apem_jax.interpret", paths[-1]],
                          capture_output=True, text=True, timeout=120)
  assert redraw.returncode == 0, redraw.stderr
  assert sorted(os.listdir(tmp_path / "explain")) == drawn

  other = tiny_config("shared_bottom")
  other.train.num_epochs = 1
  trainer.train_and_evaluate(other, str(tmp_path / "mlp"))
  exp, state, _ = trainer.restore_checkpoint(other, str(tmp_path / "mlp"))
  with pytest.raises(ValueError, match="has no Pattern Selector"):
    interpret.explain(exp, state, "validation")
  # Refused on shapes, before eval.py evaluates the split; APEM's ablation without a selector too.
  with pytest.raises(ValueError, match="'shared_bottom' has no Pattern Selector"):
    interpret.check_explainable(exp)
  no_selector = tiny_config()
  no_selector.model.pattern_selector = False
  with pytest.raises(ValueError, match="model.pattern_selector=false: no Pattern Selector"):
    interpret.check_explainable(trainer.Experiment(no_selector))
  # No groups (grouping='none'): no groups figure.
  ungrouped = dict(explanation, group_weights=np.zeros((1, 0, 6)), group_assignment=None,
                   patterns=explanation["fields"],
                   pattern_weights=explanation["pattern_weights"][:, :6],
                   examples=explanation["examples"][..., :6])
  assert explanation["selection"] == "softmax"
  paths = interpret.plot(ungrouped, str(tmp_path / "ungrouped"))
  assert sorted(os.path.basename(p) for p in paths) == ["examples.png", "explanation.json",
                                                         "patterns.png"]
  # Evaluation with a config whose batch size exceeds the training rows (a training setting):
  # restored with the run's.
  other.train.batch_size = 4096
  exp, _, _ = trainer.restore_checkpoint(other, str(tmp_path / "mlp"))
  assert exp.config.train.batch_size == 64
  # ... and another balancing method and optimizer than the run's (they shape the training state
  # the checkpoint holds; the restore failed as "cannot be read"): restored with the run's.
  elsewhere = ml_collections.ConfigDict(other.to_dict())
  elsewhere.train.update(balancing="uncertainty", balancing_window=3)
  elsewhere.optimizer.update(embedding_optimizer="lazy_adam", learning_rate=0.5)
  exp, state, _ = trainer.restore_checkpoint(elsewhere, str(tmp_path / "mlp"))
  assert exp.config.train.balancing == "fixed" and state.balance == {}
  assert exp.config.optimizer.to_dict() == other.optimizer.to_dict()
  # ... on a mesh whose data axis the run's batch size does not divide (data axis 8 here,
  # trained on 4): evaluated all the same.
  other.update_from_flattened_dict({"train.batch_size": 12, "train.eval_batch_size": 24,
                                    "parallel.model_parallelism": 2})
  trainer.train_and_evaluate(other, str(tmp_path / "mesh4"))
  other.parallel.model_parallelism = 1
  exp, state, _ = trainer.restore_checkpoint(other, str(tmp_path / "mesh4"))
  assert exp.mesh.shape["data"] == 8 and exp.config.train.batch_size == 12
  assert exp.evaluate(state, "validation")["y1"]["examples"] == 240


def test_a_resume_in_the_middle_of_an_epoch_keeps_the_input_groups():
  """The training order depends on the input's groups (processes, or the streamed input's row
  groups): a run stopped mid-epoch on 2 processes is not resumed on 1 (the rest of the epoch
  would read some rows twice and others not at all); at an epoch's end it may be."""
  middle = trainer.data_position(7, 5, groups=2)
  with pytest.raises(ValueError, match=r"run: the run stopped after batch 2 of epoch 1 with its "
                                       r"training input read in 2 groups .* resume on 2 processes, or "
                                       r"set data.stream_groups=2"):
    trainer.check_input_groups(middle, 1, "run")
  trainer.check_input_groups(middle, 2, "run")
  trainer.check_input_groups(trainer.data_position(10, 5, groups=2), 1, "run")
  trainer.check_input_groups({"epoch": 1, "batch": 2, "steps_per_epoch": 5}, 1, "run")  # older
  # The streamed input's row groups are set on resume to keep them (not a trajectory key: the
  # check above stands for it, as for the processes).
  from apem_jax import config_validation  # pylint: disable=g-import-not-at-top
  saved = {"data": {"name": "spec", "stream_groups": None}, "seed": 0}
  assert config_validation.resume_diff(saved, {"data": {"name": "spec", "stream_groups": 2},
                                               "seed": 0}) == (
      [], {"data.stream_groups": [None, 2]})
