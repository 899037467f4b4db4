"""N runs in one compiled program (apem_jax/vmap_runs.py) against the same runs trained one after
the other by the trainer, on tiny synthetic data."""

import json
import os
import shutil
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apem_jax import checkpointing, trainer, vmap_runs
from test_trainer import tiny_config, tiny_mlp_config, write_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _configs():
  """Two MMoE runs that differ in seed, learning rate, weight decay and patience; cosine
  schedule; an evaluation every 10 steps of 2 epochs (60 steps), so run 1 (patience 1) stops
  early while run 0 (patience 100) goes on."""
  configs = []
  for seed, lr, wd, patience in ((0, 1e-3, 0.0, 100), (1, 1e-2, 1e-2, 1)):
    config = tiny_config("mmoe")
    config.seed = seed
    config.train.update(num_epochs=2, eval_every_steps=10, patience=patience)
    config.optimizer.update(schedule="cosine", warmup_steps=5, learning_rate=lr,
                            weight_decay=wd)
    configs.append(config)
  return configs


def _validation(summary):
  return [(h["step"], h["score"], h["validation"]) for h in summary["history"]]


def _assert_params_match(vmapped, sequential, learning_rate: float) -> None:
  """Every parameter element within 1e-6 of the sequential run's, save at most one in 10^4
  within one learning rate (one Adam step's reach). XLA may round the batched step's arithmetic
  differently from the single run's (with the suite's older CPU emitters, tests/conftest.py, one
  element of MMoE's 65,536 expert weights ended 1.3e-6 apart after 60 steps), and Adam's
  normalised update turns a rounding-level change in a near-zero gradient into up to a step; a
  wrong run's state, a lost update or a stopped run that kept training moves far more elements
  by more."""
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(vmapped)[0],
                          jax.tree.leaves(sequential)):
    diff = np.abs(np.asarray(a) - np.asarray(b))
    name = jax.tree_util.keystr(path)
    assert diff.max() <= learning_rate, (name, diff.max())
    assert np.count_nonzero(diff > 1e-6) <= diff.size // 10_000, (name, np.sort(diff.ravel())[-5:])


@pytest.fixture(scope="module")
def vmapped(tmp_path_factory):
  """``_configs()`` trained as one program: (its workdir, the runs' summaries)."""
  workdir = tmp_path_factory.mktemp("vmapped")
  return workdir, vmap_runs.train_runs(_configs(), str(workdir))


def test_runs_equal_sequential_runs_and_their_dirs_evaluate(vmapped, tmp_path):
  configs = _configs()
  workdir, summaries = vmapped
  assert [s["vmapped"]["varied"] for s in summaries] == [
      {"optimizer.learning_rate": 1e-3, "optimizer.weight_decay": 0.0, "seed": 0,
       "train.patience": 100},
      {"optimizer.learning_rate": 1e-2, "optimizer.weight_decay": 1e-2, "seed": 1,
       "train.patience": 1}]
  assert all(s["train_step_traces"] == 1 and s["eval_step_traces"] == 1 for s in summaries)
  # Run 1 stopped early, its update masked from then on; run 0 trained to the end.
  assert summaries[0]["steps"] == 60 and not summaries[0]["stopped_early"]
  assert summaries[1]["stopped_early"] and summaries[1]["steps"] < 60

  for i, (config, summary) in enumerate(zip(configs, summaries)):
    run_dir = str(workdir / f"run_{i}")
    sequential_dir = str(tmp_path / f"sequential_{i}")
    sequential = trainer.train_and_evaluate(config, sequential_dir)
    with open(os.path.join(run_dir, "metrics.json")) as f:
      assert json.load(f)["best_step"] == summary["best_step"]
    for key in ("best_step", "steps", "stopped_early"):
      assert summary[key] == sequential[key], key
    # Every evaluation: the same steps, scores and metrics (to 1e-6).
    got, want = _validation(summary), _validation(sequential)
    assert [g[0] for g in got] == [w[0] for w in want]
    for (_, score, metrics), (_, want_score, want_metrics) in zip(got, want):
      assert score == pytest.approx(want_score, abs=1e-6)
      for task, m in want_metrics.items():
        for name, value in m.items():
          assert metrics[task][name] == pytest.approx(value, abs=1e-6), (task, name)
    # The best checkpoints hold the same state, and the run's directory evaluates as the
    # trainer's does.
    exp = trainer.Experiment(config)
    states = []
    for d in (run_dir, sequential_dir):
      ckpt = checkpointing.Checkpoints(d, read_only=True)
      states.append(ckpt.restore(exp.abstract_state, checkpointing.BEST)[0])
      ckpt.close()
    _assert_params_match(states[0].params, states[1].params, config.optimizer.learning_rate)
    if i == 1:
      result = trainer.evaluate_checkpoint(config, run_dir, "test")
      expected = trainer.evaluate_checkpoint(config, sequential_dir, "test")
      assert result["step"] == expected["step"] == summary["best_step"]
      for task, m in expected["metrics"].items():
        assert result["metrics"][task]["auc"] == pytest.approx(m["auc"], abs=1e-6)
        assert result["metrics"][task]["logloss"] == pytest.approx(m["logloss"], abs=1e-6)


def _steps(run_dir):
  ckpt = checkpointing.Checkpoints(str(run_dir), read_only=True)
  steps = ckpt.steps()
  ckpt.close()
  return steps


def _final_states(workdir):
  """Per run of ``_configs()`` in ``workdir``: its newest checkpoint's state."""
  states = []
  for i, config in enumerate(_configs()):
    ckpt = checkpointing.Checkpoints(str(workdir / f"run_{i}"), read_only=True)
    states.append(jax.device_get(ckpt.restore(trainer.Experiment(config).abstract_state)[0]))
    ckpt.close()
  return states


def _interrupted(at: int, action):
  """``Runs.global_batch`` that calls ``action()`` at its ``at``-th call (before step ``at`` of
  the program)."""
  batches, calls = vmap_runs.Runs.global_batch, [0]

  def global_batch(self, locals_):
    calls[0] += 1
    if calls[0] == at:
      action()
    return batches(self, locals_)
  return global_batch


def _crash():
  raise KeyboardInterrupt


def _train_crashing(monkeypatch, configs, workdir, at: int) -> None:
  """``train_runs`` interrupted before its step ``at`` as a crash interrupts it."""
  with monkeypatch.context() as patch:
    patch.setattr(vmap_runs.Runs, "global_batch", _interrupted(at, _crash))
    with pytest.raises(KeyboardInterrupt):
      vmap_runs.train_runs(configs, str(workdir))


def _assert_ended_as(summaries, workdir, vmapped) -> None:
  """The runs in ``workdir`` made the evaluations of the uninterrupted program and hold its
  final states, bit for bit."""
  reference_dir, reference = vmapped
  for summary, expected in zip(summaries, reference):
    assert summary["stopped_by"] is None
    for key in ("best_step", "steps", "stopped_early", "best_validation_score"):
      assert summary[key] == expected[key], key
    assert _validation(summary) == _validation(expected)
  chex.assert_trees_all_equal(_final_states(workdir), _final_states(reference_dir))


def test_a_program_killed_or_stopped_resumes_as_if_it_had_run_through(vmapped, tmp_path,
                                                                       monkeypatch):
  """Crashed after step 24 (checkpoints at 10 and 20; run 0's step 20 lost, as a kill between
  the runs' saves loses it), then stopped by SIGTERM after step 35 (a step without an
  evaluation), then run again: every run ends bit for bit as the uninterrupted program's, with
  the same evaluations; run 1 (patience 1) stops early as it did there."""
  workdir = tmp_path / "w"
  _train_crashing(monkeypatch, _configs(), workdir, 25)
  assert not (workdir / "run_0" / "metrics.json").exists()
  shutil.rmtree(workdir / "run_0" / "checkpoints" / "20")

  stop = lambda: os.kill(os.getpid(), signal.SIGTERM)
  with monkeypatch.context() as patch:
    patch.setattr(vmap_runs.Runs, "global_batch", _interrupted(26, stop))  # from step 10
    stopped = vmap_runs.train_runs(_configs(), str(workdir))
  assert stopped[0]["stopped_by"] == {"signal": "SIGTERM", "step": 36}
  assert 36 in _steps(workdir / "run_0")
  with pytest.raises(SystemExit, match="143"):
    trainer.exit_if_stopped(stopped[0])

  summaries = vmap_runs.train_runs(_configs(), str(workdir))
  _assert_ended_as(summaries, workdir, vmapped)

  # Run again once finished: nothing left to train, the same runs.
  again = vmap_runs.train_runs(_configs(), str(workdir))
  assert [s["train_step_traces"] for s in again] == [0, 0]
  assert [_validation(s) for s in again] == [_validation(s) for s in summaries]


def test_run_directories_that_do_not_resume_together_are_refused(vmapped, tmp_path):
  """Runs still training whose checkpoints share no step (one without any beside one past its
  first evaluation; one stopped early by a patience now raised beside one further on) are
  refused in one line naming the directories, before anything is written."""
  reference_dir, _ = vmapped
  workdir = tmp_path / "w"
  shutil.copytree(reference_dir / "run_0", workdir / "run_0")
  configs = _configs()
  for config in configs:
    config.train.update(num_epochs=3, patience=100)  # both runs still training after step 60
  before = sorted(p.name for p in (workdir / "run_0").rglob("*"))
  with pytest.raises(vmap_runs.NotResumableTogether,
                     match=r"^vmap_runs: \S*run_1 hold no checkpoint while "
                           r"\S*run_0 is past its first evaluation \(step 60\)"):
    vmap_runs.train_runs(configs, str(workdir))
  assert not (workdir / "run_1").exists()
  assert sorted(p.name for p in (workdir / "run_0").rglob("*")) == before

  shutil.copytree(reference_dir / "run_1", workdir / "run_1")
  stop_step = _steps(workdir / "run_1")[-1]
  assert stop_step not in _steps(workdir / "run_0")
  with pytest.raises(vmap_runs.NotResumableTogether,
                     match=rf"run_0 has no checkpoint at step {stop_step}, where"):
    vmap_runs.train_runs(configs, str(workdir))


def test_a_program_killed_before_every_first_save_starts_again(vmapped, tmp_path, monkeypatch):
  """Run 1's first checkpoint lost (a kill while the first evaluation's saves were written): the
  runs start again from step 0 and end as the uninterrupted program did."""
  workdir = tmp_path / "w"
  _train_crashing(monkeypatch, _configs(), workdir, 15)
  shutil.rmtree(workdir / "run_1" / "checkpoints" / "10")
  _assert_ended_as(vmap_runs.train_runs(_configs(), str(workdir)), workdir, vmapped)


def _run_1_fails_at_once():
  """Two runs of one epoch (30 steps), an evaluation every 10: run 1's loss is non-finite from
  its first step on (learning rate 1e30)."""
  out = []
  for seed, learning_rate in ((0, 3e-3), (1, 1e30)):
    config = tiny_mlp_config()
    config.seed = seed
    config.train.update(num_epochs=1, eval_every_steps=10)
    config.optimizer.update(learning_rate=learning_rate, grad_clip_norm=1e30)
    out.append(config)
  return out


def test_a_preemption_notice_checks_the_loss_before_the_saves(tmp_path, monkeypatch):
  """The processes agree to stop at step 5 (no log step): run 1, failed since step 1, is
  recorded as failed and not saved, as a SIGTERM there does."""
  monkeypatch.setattr(checkpointing.Checkpoints, "reached_preemption",
                      lambda self, step: step == 5)
  stopped = vmap_runs.train_runs(_run_1_fails_at_once(), str(tmp_path))
  assert [s["stopped_by"] for s in stopped] == [{"signal": "SIGTERM", "step": 5}] * 2
  assert "error" not in stopped[0] and "not finite" in stopped[1]["error"]
  assert _steps(tmp_path / "run_0") == [5] and _steps(tmp_path / "run_1") == []


def test_a_failed_run_stays_failed_through_stops_kills_and_resumes(tmp_path, monkeypatch):
  """Run 1's loss becomes non-finite at once. SIGTERM after step 5 (no log step): the stop checks
  the loss, so run 1 is recorded as failed and not saved, and the program returns (no
  FloatingPointError: the runs did not finish). Run again, then killed after step 13 (run 1's
  record already written, run 0 saved at step 10); run again to the end: run 0 finishes from
  its checkpoint, run 1 stays as it failed, and is then named."""
  def summary(i):
    return json.loads((tmp_path / f"run_{i}" / "metrics.json").read_text())

  with monkeypatch.context() as patch:
    patch.setattr(vmap_runs.Runs, "global_batch",
                  _interrupted(5, lambda: os.kill(os.getpid(), signal.SIGTERM)))
    stopped = vmap_runs.train_runs(_run_1_fails_at_once(), str(tmp_path))
  assert [s["stopped_by"] for s in stopped] == [{"signal": "SIGTERM", "step": 5}] * 2
  assert "error" not in stopped[0] and "not finite" in stopped[1]["error"]
  assert stopped[1]["steps"] == 5 and _steps(tmp_path / "run_1") == []
  assert _steps(tmp_path / "run_0") == [5]

  _train_crashing(monkeypatch, _run_1_fails_at_once(), tmp_path, 9)
  assert _steps(tmp_path / "run_0")[-1] == 10 and _steps(tmp_path / "run_1") == []
  assert summary(1)["error"] == stopped[1]["error"]

  with pytest.raises(FloatingPointError, match=r"1 of 2 runs .*run 1 \("):
    vmap_runs.train_runs(_run_1_fails_at_once(), str(tmp_path))
  finished, failed = summary(0), summary(1)
  assert finished["steps"] == 30 and finished["stopped_by"] is None
  assert [h["step"] for h in finished["history"]] == [10, 20, 30]
  assert failed["error"] == stopped[1]["error"] and failed["steps"] == 5


def test_an_error_older_than_a_checkpoint_is_no_failure(tmp_path):
  """A run is never saved after it fails: a checkpoint at or after its recorded error is that of
  a run trained again since (in a new program, or alone), which is then no failed run."""
  (tmp_path / "metrics.json").write_text(json.dumps({"error": "loss nan", "steps": 10}))
  assert vmap_runs._failed_before(str(tmp_path), 0)["error"] == "loss nan"
  assert vmap_runs._failed_before(str(tmp_path), 10) is None
  (tmp_path / "metrics.json").write_text(json.dumps({"steps": 30}))
  assert vmap_runs._failed_before(str(tmp_path), 0) is None


def test_held_run(tmp_path):
  """The checkpoint manager makes ``checkpoints/`` when the program starts: an empty one holds
  no run."""
  run_dir = tmp_path / "run_0"
  (run_dir / "checkpoints").mkdir(parents=True)
  assert vmap_runs.held_run(str(run_dir)) == []
  (run_dir / "checkpoints" / "20").mkdir()
  (run_dir / "metrics.json").write_text("{}")
  assert vmap_runs.held_run(str(run_dir)) == ["metrics.json", "checkpoints"]


def test_a_stopped_run_stays_frozen():
  configs = _configs()
  runs = vmap_runs.Runs(configs)
  exp = runs.exp
  state = runs.init_state()
  before = jax.device_get(runs.take(state, jnp.int32(1)))
  batches = [next(exp.data.train_batches(64, seed=s)) for s in (0, 1)]
  state, _ = runs.train_step(state, runs.global_batch(batches), jnp.array([True, False]))
  state, _ = runs.train_step(state, runs.global_batch(batches), jnp.array([True, False]))
  assert runs.traces["train_step"] == 1  # the mask is an argument, not a constant
  assert [int(s) for s in state.step] == [2, 0]
  chex.assert_trees_all_equal(jax.device_get(runs.take(state, jnp.int32(1))), before)
  # Run 0 took two steps: its parameters moved.
  with pytest.raises(AssertionError):
    chex.assert_trees_all_equal(jax.device_get(runs.take(state, jnp.int32(0)).params),
                                before.params)


def test_configs_that_cannot_share_a_program_are_refused(tmp_path):
  configs = _configs()
  configs[1].model.embed_dim = 16
  with pytest.raises(ValueError, match=r"^vmap_runs: configs\[1\] differs from configs\[0\] in "
                                       r"'model.embed_dim'"):
    vmap_runs.train_runs(configs, str(tmp_path / "a"))
  configs = _configs()
  configs[1].train.batch_size = 32
  with pytest.raises(ValueError, match="'train.batch_size'"):
    vmap_runs.train_runs(configs, str(tmp_path / "b"))
  configs = _configs()
  for config in configs:
    config.parallel.mode = "pmap"
  with pytest.raises(ValueError, match="parallel.mode='pmap' is not supported"):
    vmap_runs.train_runs(configs, str(tmp_path / "c"))
  configs = _configs()
  configs[1].optimizer.grad_clip_norm = 0.0  # no clipping: another optimizer state
  with pytest.raises(ValueError, match=r"optimizer state has another structure.*"
                                       r"optimizer.grad_clip_norm"):
    vmap_runs.train_runs(configs, str(tmp_path / "d"))
  assert not any((tmp_path / d).exists() for d in "abcd")
  with pytest.raises(ValueError, match="no configs"):
    vmap_runs.train_runs([], str(tmp_path / "e"))


def test_configs_over_values_of_one_key():
  configs, names = vmap_runs.configs_over(tiny_config(), "optimizer.learning_rate=1e-3,0.01")
  assert names == ["optimizer.learning_rate=1e-3", "optimizer.learning_rate=0.01"]
  assert [c.optimizer.learning_rate for c in configs] == [1e-3, 0.01]
  assert vmap_runs.varied_keys(configs) == ["optimizer.learning_rate"]
  for bad, says in (("seed=0", "at least two values"), ("no.such=1,2", "no config key 'no.such'"),
                    ("seed=0,x", "seed has type int")):
    with pytest.raises(ValueError, match=f"^--vmap '[^']*': .*{says}"):
      vmap_runs.configs_over(tiny_config(), bad)
  with pytest.raises(ValueError, match="train.batch_size"):
    vmap_runs.varied_keys(vmap_runs.configs_over(tiny_config(), "train.batch_size=8,16")[0])


def test_train_command_line_vmap(tmp_path):
  """train.py --vmap seed=0,1: one vmapped program, each run in <workdir>/seed=<s> with the
  trainer's files, its balancing method's loss weights among its curves (a bad --vmap:
  test_configs_over_values_of_one_key, and the command line's one-line errors:
  test_user_errors)."""
  config_file = write_config_file(tmp_path / "config.py", "test_trainer", "tiny_mlp_config")
  workdir = tmp_path / "w"
  cmd = [sys.executable, "train.py", "--config", config_file, "--workdir", str(workdir),
         "--config.train.num_epochs=1", "--config.train.balancing=uncertainty"]
  result = subprocess.run(cmd + ["--vmap", "seed=0,1"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  for seed in (0, 1):
    run = workdir / f"seed={seed}"
    assert json.loads((run / "config.json").read_text())["seed"] == seed
    summary = json.loads((run / "metrics.json").read_text())
    assert f"seed={seed}: best validation score {summary['best_validation_score']:.5f}" in (
        result.stdout)
    from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
    events = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for task in ("y1", "y2"):
      weights = [e.value for e in events.Scalars(f"train/loss_weight/{task}")]
      assert len(weights) >= 2 and np.all(np.isfinite(weights)) and np.ptp(weights) > 0, weights
  # The same command again resumes the runs, finished: nothing to train.
  again = subprocess.run(cmd + ["--vmap", "seed=0,1"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "0 of 2 runs still training" in again.stdout


def test_a_second_program_in_a_workdir_adds_its_record(tmp_path):
  path = tmp_path / vmap_runs.RECORD_FILE
  path.write_text(json.dumps({"runs": 2, "failed": {"1": "loss"}}))  # one program, as once written
  vmap_runs.append_record(str(tmp_path), {"runs": 3, "failed": {}})
  assert json.loads(path.read_text()) == {"programs": [{"runs": 2, "failed": {"1": "loss"}},
                                                       {"runs": 3, "failed": {}}]}
  (tmp_path / "new").mkdir()
  vmap_runs.append_record(str(tmp_path / "new"), {"runs": 1})
  assert json.loads((tmp_path / "new" / vmap_runs.RECORD_FILE).read_text()) == {
      "programs": [{"runs": 1}]}
