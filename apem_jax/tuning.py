"""Equal-budget hyperparameter tuning with Optuna, scored on the validation split only.

Every model gets the same number of trials of the same seeded sampler (Optuna's TPE) over the same
shared search space (:data:`SHARED_SPACE`: learning rate, weight decay, dropout, embedding width,
batch size) plus its own size knobs (:data:`MODEL_SPACES`). A trial trains a config with
:func:`apem_jax.trainer.train_and_evaluate` (early stopping on validation) and scores it by its best
validation selection score; the test split is never read. A trial whose training diverges (NaN loss)
counts against the budget, unscored; one that fails with another error stops the tuning and is tried
again on the next call, and counts, unscored, if it fails a second time. A study is an Optuna
journal, a text file of one JSON line per event (``study_path``; by default ``study.jsonl`` in the
tuning directory, and ``benchmarks/quality.py`` keeps it beside its tables so that it can be
committed), each trial in a workdir named by its parameters, so a killed tuning run resumes where it
stopped (the trial cut short is tried again, and resumes from its checkpoints where its workdir is
still there), on the same machine or, from the journal alone, on another, drawing what an
uninterrupted study would have drawn. A study records the base config and the search space it was
made with and refuses to go on with others. Asked for fewer trials than it holds, a study is read up
to that many.

``tune(make_config, model, num_trials, directory, seed)`` returns the best trial's parameters
and score; :func:`apply` turns parameters into a config (the benchmark then trains the chosen
config with 5 seeds and reports test).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Collection

import ml_collections
import numpy as np

from apem_jax import config_validation

# name -> (kind, arguments): 'log' (low, high) float on a log scale, 'float' (low, high),
# 'choice' (values). Keys are config paths.
SHARED_SPACE: dict[str, tuple[str, tuple]] = {
    "optimizer.learning_rate": ("log", (3e-4, 1e-2)),
    "optimizer.weight_decay": ("choice", (0.0, 1e-5, 1e-4, 1e-3)),
    "model.dropout": ("choice", (0.0, 0.1, 0.2)),
    "model.embed_dim": ("choice", (8, 16, 32)),
    "train.batch_size": ("choice", (512, 1024, 2048)),
}

_TOWERS = ("choice", ((32,), (64, 32), (128, 64)))
MODEL_SPACES: dict[str, dict[str, tuple[str, tuple]]] = {
    "apem": {"model.num_blocks": ("choice", (1, 2)), "model.num_groups": ("choice", (4, 8, 16)),
             "model.tower_hidden": _TOWERS},
    "single_task": {"model.bottom_hidden": ("choice", ((64, 32), (128, 64), (256, 128))),
                    "model.tower_hidden": _TOWERS},
    "shared_bottom": {"model.bottom_hidden": ("choice", ((64, 32), (128, 64), (256, 128))),
                      "model.tower_hidden": _TOWERS},
    "mmoe": {"model.num_experts": ("choice", (4, 8, 16)),
             "model.expert_hidden": ("choice", ((64, 32), (128, 64), (256, 128))),
             "model.tower_hidden": _TOWERS},
    "ple": {"model.num_levels": ("choice", (1, 2)),
            "model.num_shared_experts": ("choice", (1, 2, 4)),
            "model.num_task_experts": ("choice", (1, 2, 4)),
            "model.expert_hidden": ("choice", ((64, 32), (128, 64), (256, 128))),
            "model.tower_hidden": _TOWERS},
    "esmm": {"model.tower_hidden": ("choice", ((64, 32), (128, 64, 32), (256, 128, 64)))},
    "aitm": {"model.tower_hidden": ("choice", ((64, 32), (128, 64, 32), (256, 128, 64))),
             "model.transfer_hidden": ("choice", ((16,), (32,), (64,)))},
}


@dataclasses.dataclass
class Result:
  """The best trial of a study."""

  model: str
  params: dict[str, Any]
  validation_score: float
  num_trials: int
  trials: list[dict]  # every trial: number, params, validation score (None: failed)


def space(model: str, fixed: Collection[str] = ()) -> dict[str, tuple[str, tuple]]:
  """The search space of ``model``, less the ``fixed`` keys."""
  if model not in MODEL_SPACES:
    raise ValueError(f"no search space for model {model!r}; known: {sorted(MODEL_SPACES)}")
  full = {**SHARED_SPACE, **MODEL_SPACES[model]}
  unknown = sorted(set(fixed) - set(full))
  if unknown:
    raise ValueError(f"fixed keys {unknown} are not in {model}'s search space {sorted(full)}")
  return {k: v for k, v in full.items() if k not in fixed}


def _suggest(trial: Any, name: str, kind: str, args: tuple) -> Any:
  if kind == "log":
    return trial.suggest_float(name, *args, log=True)
  if kind == "float":
    return trial.suggest_float(name, *args)
  # Optuna stores choices that are JSON scalars; tuples go by their index.
  if all(isinstance(v, (int, float, str)) for v in args):
    return trial.suggest_categorical(name, list(args))
  return args[trial.suggest_categorical(name + "#", list(range(len(args))))]


def params_of(model_space: dict, optuna_params: dict[str, Any]) -> dict[str, Any]:
  """Optuna's stored parameters -> config values (choices of tuples from their index)."""
  out = {}
  for name, (kind, args) in model_space.items():
    out[name] = args[optuna_params[name + "#"]] if name + "#" in optuna_params else \
        optuna_params[name]
  return out


def apply(config: ml_collections.ConfigDict, params: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``params`` (config path -> value) set."""
  config = ml_collections.ConfigDict(config.to_dict())
  for path, value in params.items():
    node = config
    *parents, key = path.split(".")
    for part in parents:
      node = node[part]
    node[key] = tuple(value) if isinstance(value, list) else value
  return config


def tune(make_config: Callable[[], ml_collections.ConfigDict], model: str, num_trials: int,
         directory: str, seed: int = 0, fixed: Collection[str] = (),
         train: Callable[[ml_collections.ConfigDict, str], dict] | None = None,
         study_path: str | None = None, run_trials: bool = True) -> Result:
  """Runs (or resumes) the study of ``model`` until it has ``num_trials`` finished trials.

  Args:
    make_config: the model's base config (dataset, epochs, seed of the runs).
    model: a model with a search space.
    num_trials: the budget, the same for every model.
    directory: where the trials' workdirs (and, by default, the study) go.
    seed: the sampler's seed.
    fixed: search-space keys not tuned (left as ``make_config`` sets them), the same for every
      model (e.g. ``train.batch_size`` for a dataset too small for the largest one).
    train: ``train(config, workdir) -> summary`` (default: ``trainer.train_and_evaluate``).
    study_path: the study's journal file (default ``<directory>/study.jsonl``).
    run_trials: False: train nothing and write nothing; the study must hold its budget already
      (its result is read from the journal).

  Raises:
    ValueError: the study at ``study_path`` was made with another base config (naming the keys);
      ``run_trials`` is False and the study holds fewer than ``num_trials`` finished trials;
      every trial of the budget diverged or failed.
  """
  import optuna  # pylint: disable=g-import-not-at-top
  from apem_jax import trainer  # pylint: disable=g-import-not-at-top
  if int(num_trials) < 1:
    raise ValueError(f"tuning {model}: the number of trials must be at least 1, got {num_trials}")
  model_space = space(model, fixed)  # (a bad model or fixed key: refused before any file)
  train = train or trainer.train_and_evaluate
  # (ERROR: Optuna logs each failed trial's traceback as a warning; the loop says it in a line)
  optuna.logging.set_verbosity(optuna.logging.ERROR)
  from optuna.storages.journal import JournalFileBackend  # pylint: disable=g-import-not-at-top
  study_path = study_path or os.path.join(directory, "study.jsonl")
  no_study = ValueError(f"tuning {model}: no study at {study_path}; run the tuning first")
  if not run_trials and not os.path.exists(study_path):
    raise no_study
  os.makedirs(os.path.dirname(os.path.abspath(study_path)), exist_ok=True)
  storage = optuna.storages.JournalStorage(JournalFileBackend(study_path))
  exists = model in optuna.get_all_study_names(storage)
  if not run_trials and not exists:
    raise no_study
  # (create_study with load_if_exists appends a line to the journal even where the study exists)
  study = (optuna.load_study(study_name=model, storage=storage) if exists else
           optuna.create_study(study_name=model, direction="maximize", storage=storage))
  state = optuna.trial.TrialState
  # A study of a version that counted every failed trial (it recorded no search space, and no
  # divergence apart): its failed trials stay counted (marked once the study is accepted).
  legacy = bool(study.trials) and "search_space" not in study.user_attrs
  _check_study(study, {"base_config": make_config().to_dict(),
                       "search_space": _space_record(model_space)}, study_path, run_trials)

  legacy_failed = {t.number for t in study.trials if legacy and t.state == state.FAIL}
  base_digest = _digest(make_config().to_dict())

  def counted(t) -> bool:  # ran to its end: scored, or diverged, or failed twice (unscored)
    return t.state == state.COMPLETE or t.state == state.FAIL and (
        t.user_attrs.get(_DIVERGED) or t.user_attrs.get(_FAILED_TWICE) or t.number in legacy_failed
        or study.user_attrs.get(f"{_COUNTED}_{t.number}"))

  def spent():  # the budget: the trials that ran to their end
    return [t for t in study.trials if counted(t)][:num_trials]

  def result() -> Result:
    trials = [{"number": t.number, "params": params_of(model_space, t.params),
               "validation_score": t.value} for t in spent()]
    finished = [t for t in spent() if t.state == state.COMPLETE]
    if not finished:
      errors = sorted({t.user_attrs[_ERROR] for t in spent() if t.user_attrs.get(_FAILED_TWICE)})
      raise ValueError(f"tuning {model}: every one of {num_trials} trials diverged or failed"
                       + (f" ({'; '.join(errors)[:500]})" if errors else ""))
    best = max(finished, key=lambda t: (t.value, -t.number))
    return Result(model, params_of(model_space, best.params), float(best.value), len(spent()),
                  trials)

  if len(spent()) >= num_trials:  # a finished study is read, not written to
    return result()
  if not run_trials:
    raise ValueError(f"tuning {model}: {study_path} holds {len(spent())} of its {num_trials} "
                     f"trials; run the tuning to its end first")
  for number in legacy_failed:
    study.set_user_attr(f"{_COUNTED}_{number}", True)
  os.makedirs(directory, exist_ok=True)  # the trials' workdirs, once the study is accepted

  # A trial cut short (a kill leaves it RUNNING; an interrupt, or a first error other than
  # divergence, leaves it FAIL) is closed, not counted, and its parameters tried again, in the
  # same workdir, where the run resumes from its checkpoints.
  for cut in [t for t in study.trials if t.state == state.RUNNING or (
      t.state == state.FAIL and not counted(t)
      and not study.user_attrs.get(f"interrupted_{t.number}"))]:
    if cut.state == state.RUNNING:
      study.tell(cut.number, state=state.FAIL)
    study.set_user_attr(f"interrupted_{cut.number}", True)
    study.enqueue_trial(cut.params)

  def objective(trial):
    params = {name: _suggest(trial, name, kind, args) for name, (kind, args) in model_space.items()}
    config = apply(make_config(), params)
    # Named by the base config too: a study of another base config (other epochs, another
    # --set) drawing the same parameters does not resume this one's runs.
    workdir = os.path.join(directory, f"trial_{base_digest}_{_digest(params)}")
    try:
      summary = train(config, workdir)
    except FloatingPointError as e:
      trial.set_user_attr(_DIVERGED, True)
      print(f"tuning {model}: trial {trial.number} ({workdir}) diverged, counted unscored: "
            f"{' '.join(str(e).split())}", flush=True)
      raise
    except Exception as e:  # pylint: disable=broad-except
      error = " ".join(f"{type(e).__name__}: {e}".split())[:1000]
      trial.set_user_attr(_ERROR, error)
      if any(t.number != trial.number and t.state == state.FAIL and t.params == trial.params
             and t.user_attrs.get(_ERROR) for t in study.trials):
        trial.set_user_attr(_FAILED_TWICE, True)  # the second time: counted, unscored
        print(f"tuning {model}: trial {trial.number} ({workdir}) failed again, counted "
              f"unscored: {error}", flush=True)
        raise _FailedTwice(error) from e
      raise  # the first time: stops the tuning; the next call tries it again
    trainer.exit_if_stopped(summary)  # the trial stays RUNNING: tried again on the next call
    return float(summary["best_validation_score"])

  while len(spent()) < num_trials:
    # The sampler of each slot of the budget is seeded by the slot: a resumed study draws what
    # an uninterrupted one would have (one sampler for the whole study restarted its random
    # draws from the seed at each resume, drawing the first trials' parameters again).
    study.sampler = optuna.samplers.TPESampler(seed=_slot_seed(seed, len(spent())),
                                               n_startup_trials=min(5, num_trials))
    study.optimize(objective, n_trials=1, catch=(FloatingPointError, _FailedTwice))
  return result()


# A trial's user attributes: its training diverged (counted, unscored); it failed with an error
# (the message); it failed with an error a second time (counted, unscored). A study's attribute
# ``counted_<number>``: a failed trial of a study made by a version that counted them all.
_DIVERGED, _ERROR, _FAILED_TWICE, _COUNTED = "diverged", "error", "failed_twice", "counted"


class _FailedTwice(Exception):
  """A trial's parameters failed with an error a second time (the study goes on)."""


def _slot_seed(seed: int, slot: int) -> int:
  """The sampler's seed for the ``slot``-th trial of the budget."""
  return int(np.random.SeedSequence([int(seed), int(slot)]).generate_state(1)[0])


def _space_record(model_space: dict[str, tuple[str, tuple]]) -> dict:
  """The search space as the study records it (JSON)."""
  return json.loads(json.dumps({k: [kind, list(args)] for k, (kind, args) in model_space.items()}))


def _check_study(study: Any, record: dict, study_path: str, write: bool = True) -> None:
  """Records the base config and the search space in a new study (unless not ``write``);
  refuses a study made with another base config (where the data lives aside) or search space
  (another ``fixed``), whose trials would not be comparable with the ones to come."""
  base = record["base_config"]
  saved = study.user_attrs.get("base_config")
  if saved is None:
    if write:
      study.set_user_attr("base_config", json.loads(json.dumps(base)))
  else:
    differ = config_validation.result_config_differences(saved, base)
    if differ:
      raise ValueError(f"{study_path}: the study there was made with another base config (keys "
                       f"{differ}); give this tuning its own study")
  saved = study.user_attrs.get("search_space")
  if saved is None:
    if write:
      study.set_user_attr("search_space", record["search_space"])
  elif saved != record["search_space"]:
    differ = sorted(k for k in set(saved) | set(record["search_space"])
                    if saved.get(k) != record["search_space"].get(k))
    raise ValueError(f"{study_path}: the study there searched another space (keys {differ} "
                     f"differ: another fixed set?); give this tuning its own study")


def _digest(params: dict[str, Any]) -> str:
  """A short name for a config or a trial's parameters (in its workdir's name)."""
  text = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in sorted(params.items())},
                    sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:12]
