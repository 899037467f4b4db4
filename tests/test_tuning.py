"""Equal-budget tuning: the same trials for every model, scored on validation only, resumable."""

import os

import numpy as np
import pytest

from apem_jax import trainer, tuning
from test_trainer import tiny_config


def _fake_train(calls):
  """A stand-in for training: the score peaks at learning rate 3e-3, embed_dim 16."""
  def train(config, workdir):
    calls.append((config, workdir))
    lr = config.optimizer.learning_rate
    return {"best_validation_score": -abs(np.log(lr / 3e-3)) - abs(config.model.embed_dim - 16)}
  return train


def test_every_model_gets_the_same_budget_and_the_best_trial_wins(tmp_path):
  results = {}
  for model in ("apem", "mmoe"):
    calls = []
    results[model] = tuning.tune(lambda m=model: tiny_config(m), model, 6,
                                 str(tmp_path / model), seed=0, train=_fake_train(calls))
    assert len(calls) == 6 and results[model].num_trials == 6
    scores = [t["validation_score"] for t in results[model].trials]
    assert results[model].validation_score == max(scores)
    # Each trial's config holds its parameters, shared and the model's own.
    config, workdir = calls[0]
    assert config.model.name == model and os.path.basename(workdir).startswith("trial_")
    assert set(results[model].params) == set(tuning.space(model))
  assert "model.num_groups" in results["apem"].params
  assert "model.num_experts" in results["mmoe"].params


def test_the_same_seed_draws_the_same_trials(tmp_path):
  draws = []
  for run in ("a", "b"):
    calls = []
    tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 4, str(tmp_path / run), seed=3,
                train=_fake_train(calls))
    draws.append([(c.optimizer.learning_rate, c.model.num_experts) for c, _ in calls])
  assert draws[0] == draws[1]


def test_a_trial_cut_short_is_tried_again_in_its_workdir_and_not_counted(tmp_path):
  import optuna
  calls = []
  tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 2, str(tmp_path), train=_fake_train(calls))
  from optuna.storages.journal import JournalFileBackend
  study = optuna.load_study(study_name="mmoe", storage=optuna.storages.JournalStorage(
      JournalFileBackend(str(tmp_path / "study.jsonl"))))
  killed = study.ask()  # a trial a killed process left RUNNING
  killed.suggest_float("optimizer.learning_rate", 3e-4, 1e-2, log=True)
  result = tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 3, str(tmp_path),
                       train=_fake_train(calls))
  assert result.num_trials == 3 and len(calls) == 3
  retried = calls[-1][0].optimizer.learning_rate
  assert retried == pytest.approx(killed.params["optimizer.learning_rate"])


def test_tuning_reads_the_validation_split_only(tmp_path, monkeypatch):
  splits = []
  real = trainer.Experiment.evaluate
  monkeypatch.setattr(trainer.Experiment, "evaluate",
                      lambda self, state, split: splits.append(split) or real(self, state, split))

  def small():
    config = tiny_config("shared_bottom")
    config.train.num_epochs = 1
    return config

  result = tuning.tune(small, "shared_bottom", 2, str(tmp_path), seed=0,
                       fixed=("train.batch_size",))  # 1,920 training rows
  assert result.num_trials == 2 and np.isfinite(result.validation_score)
  assert set(splits) == {"validation"}


def test_a_trial_stopped_by_a_signal_stops_the_tuning_and_is_not_scored(tmp_path):
  """A trial whose run was stopped by SIGTERM (its summary's ``stopped_by``) is half-trained: the
  tuning exits as train.py does (status 143) instead of scoring it, and the next call tries the
  same parameters again in the same workdir (where the run resumes) and counts it once."""
  calls = []

  def stopped(config, workdir):
    calls.append((config, workdir))
    return {"best_validation_score": 1e9, "stopped_by": {"signal": "SIGTERM", "step": 3}}

  with pytest.raises(SystemExit) as exit_info:
    tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 2, str(tmp_path), train=stopped)
  assert exit_info.value.code == 143
  result = tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 2, str(tmp_path),
                       train=_fake_train(calls))
  assert result.num_trials == 2 and len(calls) == 3
  assert calls[1][1] == calls[0][1]  # the stopped trial, again in its workdir
  assert max(t["validation_score"] for t in result.trials) < 1e9


def test_a_study_resumes_from_its_journal_alone_and_refuses_another_base_config(tmp_path):
  """The study is a text journal that can live apart from the trials' workdirs (quality.py keeps
  it with its tables): with the workdirs gone (another machine), finished trials are not trained
  again; a study made with another base config is refused, naming the file and the key."""
  journal = str(tmp_path / "kept" / "mmoe.jsonl")
  calls = []
  first = tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 3, str(tmp_path / "w1"),
                      train=_fake_train(calls), study_path=journal)
  assert len(calls) == 3 and os.path.exists(journal)
  with open(journal, "rb") as f:
    written = f.read()
  again = tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 3, str(tmp_path / "w2"),
                      train=_fake_train(calls), study_path=journal)
  assert len(calls) == 3 and again.params == first.params
  with open(journal, "rb") as f:  # a finished study read again is not written to (the journal
    assert f.read() == written    # is committed: a rerun of a finished sweep changes no file)
  more = tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 4, str(tmp_path / "w2"),
                     train=_fake_train(calls), study_path=journal)
  assert len(calls) == 4 and more.num_trials == 4

  def other():
    config = tiny_config("mmoe")
    config.train.num_epochs += 1
    return config

  with pytest.raises(ValueError, match=r"mmoe\.jsonl: .*another base config.*train\.num_epochs"):
    tuning.tune(other, "mmoe", 4, str(tmp_path / "w3"), train=_fake_train(calls),
                study_path=journal)
  assert not (tmp_path / "w3").exists()  # refused before anything is written


def test_studies_of_two_base_configs_do_not_share_trial_workdirs(tmp_path):
  """Two studies (their own journals) of the same model and seed draw the same parameters; with
  another base config (here one more epoch) their trials train in workdirs of their own, not
  resuming the other study's runs."""
  calls = {"a": [], "b": []}

  def more_epochs():
    config = tiny_config("mmoe")
    config.train.num_epochs += 1
    return config

  for name, make_config in (("a", lambda: tiny_config("mmoe")), ("b", more_epochs)):
    tuning.tune(make_config, "mmoe", 2, str(tmp_path / "trials"), train=_fake_train(calls[name]),
                study_path=str(tmp_path / f"{name}.jsonl"))
  assert _drawn(calls["a"]) == _drawn(calls["b"])
  assert not {w for _, w in calls["a"]} & {w for _, w in calls["b"]}


def test_a_finished_study_is_read_without_writing_though_a_trial_was_left_running(tmp_path):
  """A study that holds its budget, and also a trial a killed process left RUNNING beyond it
  (a larger budget asked for earlier): read for a smaller budget, its journal is not written."""
  import optuna
  from optuna.storages.journal import JournalFileBackend
  journal = tmp_path / "study.jsonl"
  tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 2, str(tmp_path), train=_fake_train([]))
  storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
  study = optuna.load_study(study_name="mmoe", storage=storage)
  study.ask().suggest_float("optimizer.learning_rate", 3e-4, 1e-2, log=True)  # left RUNNING
  written = journal.read_bytes()
  calls = []
  result = tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 2, str(tmp_path),
                       train=_fake_train(calls))
  assert result.num_trials == 2 and not calls
  assert journal.read_bytes() == written


def _drawn(calls):
  return [(c.optimizer.learning_rate, c.model.num_experts, c.train.batch_size) for c, _ in calls]


def test_a_resumed_study_draws_what_an_uninterrupted_one_draws(tmp_path):
  """The startup trials' random draws do not start again from the seed at each resume (that
  drew the first trials' parameters again: 3 distinct of 5)."""
  straight, resumed = [], []
  tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 7, str(tmp_path / "a"),
              train=_fake_train(straight))
  for budget in (2, 3, 7):  # stopped after 2, then after 3
    tuning.tune(lambda: tiny_config("mmoe"), "mmoe", budget, str(tmp_path / "b"),
                train=_fake_train(resumed))
  assert _drawn(resumed) == _drawn(straight) and len(set(_drawn(straight))) == 7


def test_an_interrupted_trial_is_tried_again_and_a_diverged_one_counts(tmp_path):
  calls = []

  def interrupted_then_diverged(config, workdir):
    calls.append((config, workdir))
    if len(calls) == 2:
      raise KeyboardInterrupt  # a second Ctrl-C: Optuna records the trial as failed
    if len(calls) == 4:
      raise FloatingPointError("loss is NaN")
    return _fake_train([])(config, workdir)

  with pytest.raises(KeyboardInterrupt):
    tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 4, str(tmp_path), train=interrupted_then_diverged)
  result = tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 4, str(tmp_path),
                       train=interrupted_then_diverged)
  assert calls[2][1] == calls[1][1]  # the interrupted trial, again in its workdir
  assert len(calls) == 5 and result.num_trials == 4
  assert [t["validation_score"] is None for t in result.trials] == [False, False, True, False]
  again = tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 4, str(tmp_path),
                      train=interrupted_then_diverged)  # the diverged trial is not retried
  assert len(calls) == 5 and again.trials == result.trials


def test_a_trial_that_fails_twice_counts_unscored_and_is_not_tried_again(tmp_path):
  """An error (out of memory, a config the trainer refuses) stops the tuning the first time and
  the trial is tried again on the next call; failing again, it counts, unscored, and the study
  goes on (it was tried again on every call, the study never advancing)."""
  calls = []

  def fails_on_its_second_trial(config, workdir):
    calls.append((config, workdir))
    if len(calls) > 1 and workdir == calls[1][1]:
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    return _fake_train([])(config, workdir)

  with pytest.raises(RuntimeError, match="out of memory"):
    tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 3, str(tmp_path),
                train=fails_on_its_second_trial)
  result = tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 3, str(tmp_path),
                       train=fails_on_its_second_trial)
  assert [w for _, w in calls].count(calls[1][1]) == 2 and len(calls) == 4
  assert [t["validation_score"] is None for t in result.trials] == [False, True, False]
  again = tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 3, str(tmp_path),
                      train=fails_on_its_second_trial)
  assert len(calls) == 4 and again.trials == result.trials

  def always_fails(config, workdir):
    raise ValueError("train.batch_size=2048 exceeds the 480 training examples")

  with pytest.raises(ValueError, match="exceeds"):  # the first error stops the tuning
    tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 1, str(tmp_path / "b"), train=always_fails)
  with pytest.raises(ValueError, match=r"every one of 1 trials diverged or failed \(ValueError: "
                                         r"train.batch_size=2048 exceeds the 480"):
    tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 1, str(tmp_path / "b"), train=always_fails)


def test_a_study_of_the_version_that_counted_every_failed_trial_keeps_them_counted(tmp_path):
  """A journal written before the search space was recorded: its failed trials (a diverged one
  then carried no mark) count, as they did, and are not trained again."""
  def diverges(config, workdir):
    raise FloatingPointError("loss is NaN")

  with pytest.raises(ValueError, match=r"every one of 1 trials diverged or failed$"):
    tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 1, str(tmp_path), train=diverges,
                fixed=("train.batch_size",))
  path = tmp_path / "study.jsonl"  # as that version wrote it: no search space, no mark
  lines = path.read_text().splitlines(keepends=True)
  path.write_text("".join(l for l in lines if "search_space" not in l and "diverged" not in l))
  calls = []
  result = tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 2, str(tmp_path),
                       train=_fake_train(calls), fixed=("train.batch_size",))
  assert len(calls) == 1 and [t["validation_score"] is None for t in result.trials] == [True, False]


def test_a_study_reads_as_many_trials_as_asked_and_refuses_another_search_space(tmp_path):
  calls = []
  six = tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 6, str(tmp_path), train=_fake_train(calls))
  three = tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 3, str(tmp_path),
                      train=_fake_train(calls))
  assert len(calls) == 6 and three.num_trials == 3 and three.trials == six.trials[:3]
  assert three.validation_score == max(t["validation_score"] for t in six.trials[:3])
  with pytest.raises(ValueError, match=r"study.jsonl: the study there searched another space "
                                       r"\(keys \['train.batch_size'\] differ"):
    tuning.tune(lambda: tiny_config("mmoe"), "mmoe", 6, str(tmp_path), train=_fake_train(calls),
                fixed=("train.batch_size",))


@pytest.mark.parametrize("num_trials, fixed, match", [
    (0, (), r"the number of trials must be at least 1, got 0"),
    (2, ("train.batchsize",), r"fixed keys \['train.batchsize'\] are not in mmoe's search space"),
])
def test_a_bad_budget_or_fixed_key_is_refused_before_any_file(tmp_path, num_trials, fixed, match):
  with pytest.raises(ValueError, match=match):
    tuning.tune(lambda: tiny_config("mmoe"), "mmoe", num_trials, str(tmp_path / "t"),
                train=_fake_train([]), fixed=fixed, study_path=str(tmp_path / "j" / "s.jsonl"))
  assert not (tmp_path / "t").exists() and not (tmp_path / "j").exists()
