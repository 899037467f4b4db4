"""Quality benchmark: models x seeds on one dataset, selected on validation, reported on test.

  python benchmarks/quality.py --dataset census --models apem,mmoe,ple --seeds 5
  python benchmarks/quality.py --dataset census_education --seeds 5
  python benchmarks/quality.py --dataset synthetic --correlations 0.5,0.9,1.0 --models shared_bottom,mmoe,ple,apem
  python benchmarks/quality.py --dataset funnel --seeds 5 --funnel_modes entire_space,conditional

``--dataset funnel`` is the synthetic conversion funnel (configs/funnel.py): every step's test
entire-space AUC, AUC of the conditional probability on the population that reached the previous
step, logloss, calibration, the oracle AUC of the true probabilities and the model's gap to it.
``--funnel_modes`` runs each model under each ``train.funnel`` mode it supports (rows
``model/mode``; ESMM has no 'off', AITM no 'conditional').

``--balancings fixed,uncertainty,...`` trains every model under each task-balancing method (rows
``model/method``; docs/results/balancing.md).

Every run (model, seed, and correlation, funnel mode or balancing method where the sweep has them)
trains in its own workdir under --runs (checkpoint chosen on validation by the trainer), then its
best checkpoint is evaluated on test. Runs go seed-major (every model's seed 0 first; the table is
rewritten after every run, saying how many seeds each row holds), a run whose ``eval/test.json``
exists is not repeated, and a half-trained one resumes from its latest checkpoint, so an
interrupted sweep picks up where it stopped; a workdir made with another config is refused. Every
finished run's result is also kept, with its config, in ``<out>/<dataset>_runs.json``: committed
beside the table, it lets the same command resume the sweep on another machine or from a fresh
clone (a run recorded there with the same config is not trained again; one recorded with another
config is refused); ``--report_only`` writes the table from that record alone, training
nothing (the state of a sweep running elsewhere; with ``--tune``, from the finished studies'
choices). ``--set key=value`` overrides a config key
for every run. Writes a markdown table (the command that made it at the top), its JSON and a PNG
plot under --out. Results and their reading: docs/results/README.md.
"""

from __future__ import annotations

import collections
import json
import os
import shlex
import sys
import time
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
import numpy as np

from apem_jax import cli, config_validation, reporting, trainer, tuning, vmap_runs
from apem_jax.models import MODELS
from apem_jax.configs import census as census_configs
from apem_jax.configs import funnel as funnel_configs
from apem_jax.configs import synthetic as synthetic_configs
import machine  # benchmarks/machine.py

DATASETS = {"census": "income_marital", "census_education": "education_marital", "synthetic": None,
            "funnel": None}
FUNNEL_METRICS = ["auc", "auc_conditional", "logloss", "calibration", "violation_rate",
                  "oracle_auc", "oracle_gap"]
UNSUPPORTED_MODES = {("esmm", "off"), ("aitm", "conditional")}
ALL_MODELS = "apem,single_task,shared_bottom,mmoe,ple,esmm,aitm"

_DATASET = flags.DEFINE_enum("dataset", "census", list(DATASETS), "Dataset.")
_MODELS = flags.DEFINE_string("models", ALL_MODELS, "Comma-separated registered model names.")
_SEEDS = flags.DEFINE_integer("seeds", 5, "Seeds per model (0 .. seeds-1).")
_CORRELATIONS = flags.DEFINE_string("correlations", "0.5,0.9,1.0", "Synthetic task correlations p.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Override train.num_epochs for every run.")
_FUNNEL_MODES = flags.DEFINE_string("funnel_modes", "entire_space",
                                    "--dataset funnel: comma-separated train.funnel modes.")
_RUNS = flags.DEFINE_string("runs", "runs/benchmark", "Where the runs' workdirs go.")
_OUT = flags.DEFINE_string("out", "docs/results", "Where the table and plot go.")
_VMAP_SEEDS = flags.DEFINE_bool(
    "vmap_seeds", False, "Train the seeds of each model (and correlation, funnel mode) as one "
    "vmapped program (apem_jax/vmap_runs.py) instead of one after the other; each seed's "
    "workdir, test evaluation and result files are those of a sequential run ('train s / run' "
    "is then each seed's share of the shared training time). Seeds a stopped or killed program "
    "left half-trained resume together (those whose checkpoints cannot join the rest, at "
    "other steps, resume one by one, as without the flag); a run trained to its end is reused.")
_TUNE = flags.DEFINE_integer(
    "tune", 0, "Before the seeds, tune every model with this many Optuna trials (the same budget "
    "for each; apem_jax/tuning.py: the shared search space plus the model's size knobs, scored "
    "on validation only), then train the seeds with each model's best parameters (runs under "
    "<runs>/<dataset>/<model>/tuned/; the chosen parameters in <out>/<dataset>_tuned.json; each "
    "model's study, which a rerun resumes, in <out>/<dataset>_tuning/).")
_TUNE_FIXED = flags.DEFINE_list(
    "tune_fixed", [], "Search-space keys not tuned (e.g. train.batch_size on a small dataset).")
_BALANCINGS = flags.DEFINE_list(
    "balancings", [], "Compare task-balancing methods: every model trained under each "
    "train.balancing named here (apem_jax/balancing.py), rows '<model>/<method>', runs under "
    "<runs>/<dataset>/<model>/<method>/.")
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Train nothing: write the table of the sweep these flags describe from "
    "the runs recorded in <out>/<dataset>_runs.json (each checked against its config), e.g. the "
    "state of a sweep still running elsewhere, every seed it holds. With --tune, every model's "
    "study in <out>/<dataset>_tuning/ must hold its trials already (the configs are read there).")
_SET = flags.DEFINE_multi_string(
    "set", [], "key=value config override for every run, e.g. --set train.batch_size=2048 "
    "(repeatable; the value is parsed as the key's type).")


class Cell(NamedTuple):
  """One row of a table: a model under one correlation, funnel mode and balancing method (None
  where the sweep has no such axis)."""
  correlation: float | None
  model: str
  mode: str | None = None
  balancing: str | None = None

  def name(self) -> str:
    """'<model>[/<balancing>]', the start of the cell's run names."""
    return self.model + ("" if self.balancing is None else f"/{self.balancing}")

  def suffix(self) -> str:
    """'[/p<correlation>][/<mode>]', the end of the cell's run names."""
    return (("" if self.correlation is None else f"/p{self.correlation}")
            + ("" if self.mode in (None, "entire_space") else f"/{self.mode}"))


def _config(cell: Cell, seed: int):
  if _DATASET.value == "funnel":
    config = funnel_configs.get_config(cell.model)
    config.train.funnel = cell.mode or "entire_space"
  elif cell.correlation is None:
    config = census_configs.get_config(f"{cell.model},{DATASETS[_DATASET.value]}")
  else:
    config = synthetic_configs.get_config(f"{cell.model},{cell.correlation}")
  if cell.balancing is not None:
    config.train.balancing = cell.balancing
  config.seed = seed
  config.train.progress_bar = False
  if _EPOCHS.value:
    config.train.num_epochs = _EPOCHS.value
  for override in _SET.value:
    config_validation.apply_override(config, override, "--set")
  tuned = _TUNED.get(cell)
  return config if tuned is None else tuning.apply(config, tuned)


# Cell -> the tuned parameters (--tune), filled in before any seed runs.
_TUNED: dict = {}


def _run_name(cell: Cell, seed: int | str) -> str:
  return f"{cell.name()}/" + ("tuned/" if _TUNE.value else "") + f"seed{seed}" + cell.suffix()


def tune_cells(cells: list[Cell]) -> dict:
  """--tune: every cell's model tuned with the same number of trials; fills ``_TUNED``
  (--report_only: read from the studies, which must hold their trials)."""
  chosen = {}
  for cell in cells:
    name = cell.name() + cell.suffix()
    result = tuning.tune(lambda cell=cell: _config(cell, 0), cell.model, _TUNE.value,
                         os.path.join(_RUNS.value, _DATASET.value, "tune", name), seed=0,
                         fixed=_TUNE_FIXED.value,
                         study_path=os.path.join(_OUT.value, f"{_DATASET.value}_tuning",
                                                 name.replace("/", "_") + ".jsonl"),
                         run_trials=not _REPORT_ONLY.value)
    _TUNED[cell] = result.params
    chosen[name] = {"params": {k: list(v) if isinstance(v, tuple) else v
                               for k, v in result.params.items()},
                    "validation_score": result.validation_score, "trials": result.num_trials}
    print(f"tuned {name}: validation score {result.validation_score:.5f} with {result.params}",
          flush=True)
  return chosen


def run_one(cell: Cell, seed: int, record: dict) -> dict:
  """Trains (or resumes) one run and evaluates its best checkpoint on test, unless ``record``
  (the --out record of finished runs) holds it with the same config; adds it to the record."""
  recorded = recorded_result(cell, seed, record)
  if recorded is not None:
    return recorded
  name = _run_name(cell, seed)
  config = _config(cell, seed)
  workdir = os.path.join(_RUNS.value, _DATASET.value, name)
  result_path = os.path.join(workdir, "eval", "test.json")
  summary_path = os.path.join(workdir, "metrics.json")
  check_workdir_config(config, workdir)
  if not os.path.exists(result_path):
    t0 = time.time()
    if not _trained_vmapped(summary_path):  # --vmap_seeds: trained already, evaluate only
      trainer.exit_if_stopped(trainer.train_and_evaluate(config, workdir))
    test = trainer.evaluate_checkpoint(config, workdir, "test")["metrics"]
    reporting.write_json_atomic(result_path, test)
    print(f"{name}: {time.time() - t0:.0f}s  " + json.dumps(test), flush=True)
  with open(result_path) as f, open(summary_path) as g:
    summary = json.load(g)
    result = {"test": json.load(f), "num_params": summary["num_params"],
              "train_seconds": sum(h["train_seconds"] for h in summary["history"]),
              "epochs": summary["epochs"], "machine": machine.describe()}
  record[name] = {"config": config.to_dict(), **result}
  reporting.write_json_atomic(_record_path(), record)
  return result


def recorded_result(cell: Cell, seed: int, record: dict) -> dict | None:
  """The run's result as ``record`` holds it (checked against its config), or None."""
  name = _run_name(cell, seed)
  if name not in record:
    return None
  check_same_config(_config(cell, seed), record[name]["config"], f"{_record_path()} [{name!r}]")
  return {k: v for k, v in record[name].items() if k != "config"}


def _record_path() -> str:
  return os.path.join(_OUT.value, f"{_DATASET.value}_runs.json")


def read_record() -> dict:
  """The finished runs kept under --out: {run name: {config, test, num_params, ...}}."""
  if not os.path.exists(_record_path()):
    return {}
  with open(_record_path()) as f:
    return json.load(f)


def _trained_vmapped(summary_path: str) -> bool:
  """Whether the run's ``metrics.json`` is that of a run of ``vmap_runs`` that finished (one
  stopped by a non-finite loss is resumed by the trainer, which stops on it as it would have;
  one stopped by a signal is resumed by the trainer)."""
  if not os.path.exists(summary_path):
    return False
  with open(summary_path) as f:
    summary = json.load(f)
  return "vmapped" in summary and "error" not in summary and not summary.get("stopped_by")


def train_seeds_vmapped(cell: Cell, seeds: list[int], record: dict) -> None:
  """--vmap_seeds: the seeds of one cell not trained to their end yet, trained as one vmapped
  program into the workdirs ``run_one`` reads (which then evaluates them on test as it does a
  sequential run). Seeds a stopped or killed program left half-trained resume with the others
  (``vmap_runs.resume_points``). Where their checkpoints cannot join the fresh seeds' (a run
  past its first evaluation), the fresh seeds train together and the held ones together; held
  seeds that cannot resume together either (a sequential sweep's, at other steps) are left to
  ``run_one``, which resumes each alone."""
  fresh, held = [], []
  for seed in seeds:
    workdir = os.path.join(_RUNS.value, _DATASET.value, _run_name(cell, seed))
    config = _config(cell, seed)
    check_workdir_config(config, workdir)
    if _run_name(cell, seed) in record:
      continue  # finished, as run_one will read it from the record
    if not vmap_runs.held_run(workdir):
      fresh.append((config, workdir))
    elif _unfinished(workdir, config):
      held.append((config, workdir))
  if _train_together(cell, sorted(fresh + held, key=lambda run: run[0].seed)):
    return
  if fresh and held:  # the fresh seeds always start together; the held ones may too
    _train_together(cell, fresh)
    if _train_together(cell, held):
      return
  print(f"{_run_name(cell, 's')}: seeds {[c.seed for c, _ in held]} hold checkpoints at "
        "different steps; they resume one by one", flush=True)


def _train_together(cell: Cell, runs: list) -> bool:
  """Trains ``runs`` (``(config, workdir)`` pairs) as one vmapped program; False where their
  checkpoints do not resume together (nothing of the runs is written then)."""
  if not runs:
    return True
  shared = os.path.join(_RUNS.value, _DATASET.value, _run_name(cell, "s_vmapped"))
  t0 = time.time()
  try:
    summaries = vmap_runs.train_runs([c for c, _ in runs], shared, run_dirs=[w for _, w in runs])
  except vmap_runs.NotResumableTogether:
    return False
  trainer.exit_if_stopped(summaries[0])
  print(f"{_run_name(cell, 's')}: seeds {[c.seed for c, _ in runs]} trained "
        f"in one program, {time.time() - t0:.0f}s", flush=True)
  return True


def _unfinished(workdir: str, config) -> bool:
  """Whether the run ``workdir`` holds is still to be trained: one stopped by a signal before its
  end (``stopped_by``), or killed (checkpoints but no ``metrics.json``, or a stale one of an
  earlier stop). Not one trained to its end, stopped early, or recorded as failed by
  ``vmap_runs`` (the trainer records no failure: a run it failed counts as killed, and fails
  again wherever it resumes)."""
  if os.path.exists(os.path.join(workdir, "eval", "test.json")):
    return False
  path = os.path.join(workdir, "metrics.json")
  if not os.path.exists(path):
    return True
  with open(path) as f:
    summary = json.load(f)
  return (bool(summary.get("stopped_by")) and "error" not in summary
          and not summary["stopped_early"] and summary["epochs"] < config.train.num_epochs)


def check_workdir_config(config, workdir: str) -> None:
  """A run already in ``workdir`` is reused only if it was made with this config."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      check_same_config(config, json.load(f), path)


def check_same_config(config, saved: dict, where: str) -> None:
  """A run already made (its workdir's config.json, or the --out record) is reused only if it
  was made with exactly this config, where its data lives aside."""
  differ = config_validation.result_config_differences(saved, config.to_dict())
  if differ:
    raise ValueError(f"{where}: the run there was made with another config (keys {differ}); "
                     "give this sweep its own --runs and --out directories")


def _metric_names(task_metrics: dict) -> list[str]:
  if "oracle_auc" in task_metrics:
    return [m for m in FUNNEL_METRICS if m in task_metrics]  # a first step has no violation_rate
  return ["auc", "logloss"] if "auc" in task_metrics else ["mse", "mae"]


def summarise(runs: list[dict]) -> dict:
  """Mean and std over seeds of every task metric, parameter count, training time."""
  order = list(funnel_configs.synthetic_funnel.STEP_NAMES)  # funnel steps in funnel order
  tasks = sorted(runs[0]["test"], key=lambda t: order.index(t) if t in order else -1)
  out = {"num_params": runs[0]["num_params"],
         "train_seconds": float(np.mean([r["train_seconds"] for r in runs])),
         "epochs": float(np.mean([r["epochs"] for r in runs])), "seeds": len(runs), "tasks": {}}
  for task in tasks:
    out["tasks"][task] = {}
    for m in _metric_names(runs[0]["test"][task]):
      values = np.array([r["test"][task][m] for r in runs])
      out["tasks"][task][m] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
  return out


def markdown_table(rows: dict[str, dict], title: str) -> str:
  """rows: {label: summary}."""
  first = next(iter(rows.values()))
  tasks = list(first["tasks"])
  headers = ["model"] + [f"{t} {m}" for t in tasks for m in first["tasks"][t]] + [
      "seeds", "params", "train s / run", "epochs"]
  lines = [f"### {title}", "", "| " + " | ".join(headers) + " |",
           "|" + "---|" * len(headers)]
  for label, s in rows.items():
    cells = [label] + [f"{mean:.5f}" + (f" ± {std:.5f}" if s["seeds"] > 1 else "")
                       for t in tasks for mean, std in s["tasks"][t].values()]
    cells += [str(s["seeds"]), f"{s['num_params']:,}", f"{s['train_seconds']:.0f}",
              f"{s['epochs']:.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows_by_p: dict[float, dict[str, dict]], path: str, census: bool) -> None:
  # A Figure of its own, not pyplot's: pyplot keeps every figure it makes until closed, and the
  # sweep plots after every run.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  if census:
    rows = rows_by_p[None]
    first_tasks = next(iter(rows.values()))["tasks"]
    tasks = list(first_tasks)
    # Funnel: each step's gap to the oracle AUC (lower is better); otherwise test AUC.
    metric = "oracle_gap" if "oracle_gap" in first_tasks[tasks[0]] else "auc"
    fig = Figure(figsize=(5 * len(tasks), 3.5))
    axes = fig.subplots(1, len(tasks))
    for ax, task in zip(np.atleast_1d(axes), tasks):
      labels = list(rows)
      means = [rows[m]["tasks"][task][metric][0] for m in labels]
      stds = [rows[m]["tasks"][task][metric][1] for m in labels]
      ax.bar(labels, means, yerr=stds, capsize=3)
      pad = max(3 * max(stds), 0.5 * (max(means) - min(means)), 1e-5)
      ax.set_ylim(min(means) - pad, max(means) + pad)
      ax.set_title(f"test {'AUC' if metric == 'auc' else 'oracle AUC - AUC'}: {task}")
      ax.tick_params(axis="x", rotation=45)
  else:
    fig = Figure(figsize=(10, 3.5))
    axes = fig.subplots(1, 2)
    models = list(dict.fromkeys(m for rows in rows_by_p.values() for m in rows))
    for t_index, ax in enumerate(axes):
      for m in models:
        ps = sorted(p for p in rows_by_p if m in rows_by_p[p])  # (a partial sweep: some missing)
        task = list(rows_by_p[ps[0]][m]["tasks"])[t_index]
        means = [rows_by_p[p][m]["tasks"][task]["mse"][0] for p in ps]
        stds = [rows_by_p[p][m]["tasks"][task]["mse"][1] for p in ps]
        ax.errorbar(ps, means, yerr=stds, marker="o", capsize=3, label=m)
      ax.set_xlabel("task correlation p")
      ax.set_ylabel(f"test MSE, task {t_index + 1}")
      ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def machines_sentence(runs: list[dict]) -> str:
  """Where the runs' training seconds were measured: the machine in each run's record entry
  (a sweep resumed on another machine holds runs of both; entries from before the record kept
  the machine have none)."""
  counts = collections.Counter(r.get("machine", "not recorded") for r in runs)
  digits = "(metrics move in their last digits from one CPU to another)"
  if len(counts) == 1:
    return f"Training seconds measured on the machine that ran them: {next(iter(counts))} {digits}."
  listed = "; ".join(f"{name} ({n} run{'s' if n > 1 else ''})" for name, n in counts.most_common())
  return (f"The runs were trained on several machines ({listed}), so training seconds compare "
          f"only between runs of one machine {digits}.")


def write_report(cells: list[Cell], runs: dict, labels: dict) -> str:
  """The table, its JSON and plot under --out from the runs finished so far (rewritten after
  every run, so a sweep still running has a table of what it measured: each row the mean over
  the seeds it holds, its ``seeds`` column saying how many); returns the markdown."""
  rows_by_p = {}
  for cell in cells:
    done = [runs[cell, s] for s in range(_SEEDS.value) if (cell, s) in runs]
    if done:
      rows_by_p.setdefault(cell.correlation, {})[labels[cell]] = summarise(done)
  seeds_done = min((len([1 for s in range(_SEEDS.value) if (c, s) in runs]) for c in cells))
  command = "python " + " ".join(shlex.quote(a) for a in sys.argv
                                 if a not in ("--report_only", "--report_only=true"))
  os.makedirs(_OUT.value, exist_ok=True)
  still = ("" if seeds_done == _SEEDS.value else
           f" (**partial**: the sweep had not finished when this was written; a row holds the "
           f"first seeds of the {_SEEDS.value} asked for, as many as its `seeds` column says, and "
           "a row not there has none yet)")
  parts = [f"# Quality benchmark: {_DATASET.value}", "", f"Regenerate with `{command}`", "",
           (f"Mean ± sample std over the seeds{still}" if _SEEDS.value > 1 else
            f"One seed (0){still}, so no spread is measured,")
           + " of each run's best-on-validation checkpoint, evaluated on the test split. "
           + machines_sentence(list(runs.values()))]
  if _TUNE.value:
    parts += ["", f"Every model's config was tuned first with the same budget: {_TUNE.value} "
              f"Optuna trials on the validation split (apem_jax/tuning.py; fixed: "
              f"{_TUNE_FIXED.value or 'nothing'}); the parameters chosen are in "
              f"`{_DATASET.value}_tuned.json`."]
  for p, rows in rows_by_p.items():
    parts += ["", markdown_table(rows, _DATASET.value if p is None else f"correlation p = {p}")]
  text = "\n".join(parts) + "\n"
  with open(os.path.join(_OUT.value, f"{_DATASET.value}.md"), "w") as f:
    f.write(text)
  with open(os.path.join(_OUT.value, f"{_DATASET.value}.json"), "w") as f:
    json.dump({str(p): rows for p, rows in rows_by_p.items()}, f, indent=2)
  plot(rows_by_p, os.path.join(_OUT.value, f"{_DATASET.value}.png"), _DATASET.value != "synthetic")
  return text


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  with cli.user_errors_in_one_line("benchmarks/quality.py"):  # a refused run or config: one line
    sweep()


def check_flags(models: list[str]) -> None:
  """Refuses, in one line, flags that would otherwise fail only after runs were trained or
  files written: no seeds, a negative budget, an unknown model, a --tune_fixed key outside a
  model's search space, a --set key that the tuning would override."""
  if _SEEDS.value < 1:
    raise ValueError(f"--seeds={_SEEDS.value}: expected at least 1")
  if _TUNE.value < 0:
    raise ValueError(f"--tune={_TUNE.value}: expected 0 (no tuning) or a number of trials")
  unknown = [m for m in models if m not in MODELS]
  if unknown:
    raise ValueError(f"--models: unknown {unknown}; registered models: {sorted(MODELS)}")
  if not _TUNE.value:
    return
  set_keys = {override.partition("=")[0].strip() for override in _SET.value}
  for model in models:
    tuned = set_keys & set(tuning.space(model, _TUNE_FIXED.value))
    if tuned:
      raise ValueError(f"--set {sorted(tuned)}: tuned for {model}, which would override the "
                       f"value; add the key to --tune_fixed to keep it")


def sweep() -> None:
  """The sweep the flags describe: tuning (--tune), the runs, the table after each run."""
  models = _MODELS.value.split(",")
  check_flags(models)
  correlations = ([None] if _DATASET.value != "synthetic"
                  else [float(p) for p in _CORRELATIONS.value.split(",")])
  modes = _FUNNEL_MODES.value.split(",") if _DATASET.value == "funnel" else [None]
  balancings = _BALANCINGS.value or [None]
  for m, mode in ((m, mode) for m in models for mode in modes if (m, mode) in UNSUPPORTED_MODES):
    print(f"skipping {m} with train.funnel={mode!r}: the model does not support it")
  cells = [Cell(p, m, mode, b) for p in correlations for m in models for mode in modes
           for b in balancings if (m, mode) not in UNSUPPORTED_MODES]
  labels = {c: c.model + ("" if len(modes) == 1 else f"/{c.mode}")
            + ("" if c.balancing is None else f"/{c.balancing}") for c in cells}
  for cell in cells:  # a bad value (of --set, --balancings, ...) refused before any file
    config_validation.validate(_config(cell, 0))
  if _TUNE.value:
    chosen = tune_cells(cells)
  record = read_record()
  if _REPORT_ONLY.value:
    runs = {(cell, seed): result for seed in range(_SEEDS.value) for cell in cells
            if (result := recorded_result(cell, seed, record)) is not None}
    if not runs:
      raise ValueError(f"--report_only: {_record_path()} records no run of this sweep")
  if _TUNE.value:
    os.makedirs(_OUT.value, exist_ok=True)
    reporting.write_json_atomic(os.path.join(_OUT.value, f"{_DATASET.value}_tuned.json"),
                                {"trials_per_model": _TUNE.value, "fixed": _TUNE_FIXED.value,
                                 "selection": "best validation score (test never read)",
                                 "models": chosen})
  if _REPORT_ONLY.value:
    print(write_report(cells, runs, labels))
    return
  if _VMAP_SEEDS.value:  # every seed of a cell at once, so cell-major
    for cell in cells:
      train_seeds_vmapped(cell, list(range(_SEEDS.value)), record)
  # Seed-major: every cell's seed 0 before any seed 1, so a sweep cut short has every cell, and
  # the table is rewritten after every round.
  runs = {}
  for seed in range(_SEEDS.value):
    for cell in cells:
      runs[cell, seed] = run_one(cell, seed, record)
      text = write_report(cells, runs, labels)
  print(text)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("benchmarks/quality.py"))
