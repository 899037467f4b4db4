"""benchmarks/quality.py end to end on tiny synthetic data: the table is the mean and spread of
the runs' own test results, a half-finished sweep resumes without repeating finished runs, and a
run made with another config is refused rather than reused."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("shared_bottom", "mmoe")


def _sweep_command(tmp_path, *extra: str) -> list[str]:
  return [sys.executable, "benchmarks/quality.py", "--dataset", "synthetic",
          "--models", ",".join(MODELS), "--seeds", "2", "--correlations", "1.0",
          "--set", "data.synthetic.num_examples=1000", "--set", "train.num_epochs=2",
          "--set", "train.batch_size=128", "--runs", str(tmp_path / "runs"),
          "--out", str(tmp_path / "out"), *extra]


def _sweep(tmp_path, *extra: str) -> subprocess.CompletedProcess:
  return subprocess.run(_sweep_command(tmp_path, *extra), cwd=REPO, capture_output=True,
                        text=True, timeout=600)


def _trained(stdout: str) -> list[str]:
  """Run names the sweep trained (it prints '<model>/seed<s>/p<p>: <seconds>s  {...}')."""
  return sorted(line.split(":")[0] for line in stdout.splitlines() if "/seed" in line and "s  {" in line)


def test_sweep_table_resume_and_config_check(tmp_path):
  first = _sweep(tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  assert _trained(first.stdout) == sorted(f"{m}/seed{s}/p1.0" for m in MODELS for s in (0, 1))

  # The table is the mean and sample std of each run's own eval/test.json.
  table = json.loads((tmp_path / "out" / "synthetic.json").read_text())["1.0"]
  for model in MODELS:
    runs = [json.loads((tmp_path / "runs" / "synthetic" / model / f"seed{s}" / "p1.0" / "eval" /
                        "test.json").read_text()) for s in (0, 1)]
    for task, metrics in table[model]["tasks"].items():
      for name, (mean, std) in metrics.items():
        values = [r[task][name] for r in runs]
        np.testing.assert_allclose(mean, np.mean(values), rtol=1e-12)
        np.testing.assert_allclose(std, np.std(values, ddof=1), rtol=1e-12)
    assert table[model]["seeds"] == 2 and table[model]["num_params"] > 0
  text = (tmp_path / "out" / "synthetic.md").read_text()
  assert "Regenerate with `python benchmarks/quality.py --dataset synthetic" in text
  assert (tmp_path / "out" / "synthetic.png").stat().st_size > 0

  # An interrupted sweep: one run lost its test result and is not in the record yet; only that
  # run is redone.
  lost = tmp_path / "runs" / "synthetic" / "mmoe" / "seed1" / "p1.0" / "eval" / "test.json"
  lost.unlink()
  record_path = tmp_path / "out" / "synthetic_runs.json"
  record = json.loads(record_path.read_text())
  assert sorted(record) == sorted(f"{m}/seed{s}/p1.0" for m in MODELS for s in (0, 1))
  del record["mmoe/seed1/p1.0"]
  record_path.write_text(json.dumps(record))
  second = _sweep(tmp_path)
  assert second.returncode == 0, second.stderr[-3000:]
  assert _trained(second.stdout) == ["mmoe/seed1/p1.0"]
  assert lost.exists()

  # A workdir made with another config is refused (a sweep with another config and a record of
  # its own, so that only the workdirs can refuse it), naming the run's config and the key.
  other_config = _sweep(tmp_path, "--set", "optimizer.learning_rate=0.01", "--out",
                        str(tmp_path / "out2"))
  assert other_config.returncode != 0
  assert "seed0/p1.0/config.json" in other_config.stderr
  assert "optimizer.learning_rate" in other_config.stderr
  assert not (tmp_path / "out2" / "synthetic_runs.json").exists()

  # Without the workdirs (another machine, a fresh clone with the committed --out): nothing is
  # trained again and the table is the same. Each run's record names the machine it ran on, and
  # the table says when its training seconds come from several.
  record = json.loads(record_path.read_text())
  here = {entry["machine"] for entry in record.values()}
  assert len(here) == 1 and "cores" in here.pop()
  assert "on the machine that ran them" in (tmp_path / "out" / "synthetic.md").read_text()
  record["mmoe/seed0/p1.0"]["machine"] = "Another CPU, 64 cores, AVX-512"
  record_path.write_text(json.dumps(record))
  shutil.rmtree(tmp_path / "runs")
  third = _sweep(tmp_path)
  assert third.returncode == 0, third.stderr[-3000:]
  assert _trained(third.stdout) == [] and not (tmp_path / "runs" / "synthetic").exists()
  assert json.loads((tmp_path / "out" / "synthetic.json").read_text())["1.0"] == table
  assert "trained on several machines" in (tmp_path / "out" / "synthetic.md").read_text()
  assert "Another CPU, 64 cores, AVX-512 (1 run)" in (tmp_path / "out" / "synthetic.md").read_text()

  # --report_only: the table of what the record holds, training nothing (3 seeds asked, 2 held:
  # partial), its command the sweep's.
  report = subprocess.run([a if a != "2" else "3" for a in _sweep_command(tmp_path)] +
                          ["--report_only"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert report.returncode == 0, report.stderr[-3000:]
  assert _trained(report.stdout) == [] and not (tmp_path / "runs" / "synthetic").exists()
  assert json.loads((tmp_path / "out" / "synthetic.json").read_text())["1.0"] == table
  text = (tmp_path / "out" / "synthetic.md").read_text()
  assert "**partial**" in text and "--seeds 3 --correlations" in text
  assert "--report_only" not in text

  # Another config is refused, naming where the run was recorded and the differing key.
  fourth = _sweep(tmp_path, "--set", "optimizer.learning_rate=0.01")
  assert fourth.returncode != 0
  assert "synthetic_runs.json ['shared_bottom/seed0/p1.0']" in fourth.stderr
  assert "optimizer.learning_rate" in fourth.stderr
  assert fourth.stderr.strip().splitlines()[-1].startswith("benchmarks/quality.py: error: ")
  assert "Traceback" not in fourth.stderr


def test_vmapped_seeds_resume_together_after_a_kill(tmp_path):
  """--vmap_seeds after a kill (MMoE, 3 epochs of 6 steps, a checkpoint per epoch). Seed 1's
  workdir holds only the empty ``checkpoints/`` a kill before the first save leaves: it trains
  with seed 0, killed after step 14 (both saved at 12). Run again with a third seed, which
  cannot join runs past their first evaluation: it trains in a program of its own, then seeds 0
  and 1 resume together from step 12 to the end."""
  command = _sweep_command(tmp_path, "--set", "train.num_epochs=3", "--vmap_seeds")
  command[command.index("--models") + 1] = "mmoe"
  runs = tmp_path / "runs" / "synthetic" / "mmoe"

  def sweep(*extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **({"APEM_JAX_KILL_AT": kill_at} if kill_at else {}))
    out = subprocess.run(command + list(extra), cwd=REPO, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == (-signal.SIGKILL if kill_at else 0), out.stderr[-3000:]
    return out

  (runs / "seed1" / "p1.0" / "checkpoints").mkdir(parents=True)
  assert "Training 2 runs in one program" in sweep(kill_at="step:14").stdout

  more = sweep("--seeds", "3").stdout
  assert more.index("seeds [2] trained in one program") < more.index(
      "Resuming the runs at step 12 (epoch 2.00): 2 of 2 runs still training")
  assert "seeds [0, 1] trained in one program" in more
  for seed, runs_in_program in ((0, 2), (1, 2), (2, 1)):
    summary = json.loads((runs / f"seed{seed}" / "p1.0" / "metrics.json").read_text())
    assert summary["vmapped"]["runs"] == runs_in_program and summary["steps"] == 18
  table = json.loads((tmp_path / "out" / "synthetic.json").read_text())["1.0"]
  assert table["mmoe"]["seeds"] == 3


# --vmap_seeds' choice of programs, with vmap_runs.train_runs replaced by one that refuses any
# program holding a run with checkpoints beside another run (checkpoints at different steps).
CHOOSE_PROGRAMS = r"""
import json, os, sys
sys.path.insert(0, "benchmarks")
from absl import flags
import quality
from apem_jax import vmap_runs

runs, out = sys.argv[1:3]
flags.FLAGS(["quality.py", "--dataset", "synthetic", "--runs", runs, "--out", out,
             "--set", "train.num_epochs=2"])
calls = []

def train_runs(configs, shared, run_dirs):
  calls.append([c.seed for c in configs])
  if len(run_dirs) > 1 and any(os.path.isdir(os.path.join(d, "checkpoints")) for d in run_dirs):
    raise vmap_runs.NotResumableTogether("no common step")
  return [{"stopped_by": None}] * len(configs)

vmap_runs.train_runs = train_runs
quality.train_seeds_vmapped(quality.Cell(1.0, "mmoe"), [0, 1, 2], {})
config = quality._config(quality.Cell(1.0, "mmoe"), 0)
unfinished = {name: quality._unfinished(os.path.join(runs, name), config)
              for name in sorted(os.listdir(runs)) if name.startswith("summary_")}
print(json.dumps({"calls": calls, "unfinished": unfinished}))
"""


def test_vmapped_seeds_choose_their_programs(tmp_path):
  """Seeds 0 and 1 hold checkpoints at steps that do not meet, seed 2 none: the three are tried
  as one program, then seed 2 alone, then seeds 0 and 1, which are left to resume one by one.
  Which runs count as still to train, by their ``metrics.json``."""
  runs = tmp_path / "runs"
  for seed, step in ((0, 6), (1, 12)):
    (runs / "synthetic" / "mmoe" / f"seed{seed}" / "p1.0" / "checkpoints" / str(step)).mkdir(
        parents=True)
  num_epochs = 2  # the script's --set train.num_epochs
  summaries = {"summary_finished": {"stopped_by": None, "stopped_early": False,
                                    "epochs": num_epochs},
               "summary_stopped": {"stopped_by": {"signal": "SIGTERM", "step": 3},
                                   "stopped_early": False, "epochs": 0.5},
               "summary_stopped_after_its_end": {"stopped_by": {"signal": "SIGTERM", "step": 9},
                                                 "stopped_early": False, "epochs": num_epochs},
               "summary_stopped_early": {"stopped_by": {"signal": "SIGTERM", "step": 9},
                                         "stopped_early": True, "epochs": 1.0},
               "summary_failed": {"error": "loss nan", "stopped_by": {"signal": "SIGTERM"},
                                  "stopped_early": False, "epochs": 0.5}}
  for name, summary in summaries.items():
    (runs / name).mkdir()
    (runs / name / "metrics.json").write_text(json.dumps(summary))
  (runs / "summary_killed").mkdir()
  (runs / "summary_evaluated" / "eval").mkdir(parents=True)
  (runs / "summary_evaluated" / "eval" / "test.json").write_text("{}")
  (runs / "summary_evaluated" / "metrics.json").write_text(
      json.dumps(summaries["summary_stopped"]))
  out = subprocess.run([sys.executable, "-c", CHOOSE_PROGRAMS, str(runs), str(tmp_path / "out")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["calls"] == [[0, 1, 2], [2], [0, 1]]
  assert "mmoe/seeds/p1.0: seeds [2] trained in one program" in out.stdout
  assert ("mmoe/seeds/p1.0: seeds [0, 1] hold checkpoints at different steps; they resume one "
          "by one") in out.stdout
  assert result["unfinished"] == {
      "summary_evaluated": False, "summary_failed": False, "summary_finished": False,
      "summary_killed": True, "summary_stopped": True, "summary_stopped_after_its_end": False,
      "summary_stopped_early": False}


def test_a_run_stopped_by_sigterm_is_not_taken_for_a_finished_one(tmp_path):
  """SIGTERM during a run: the sweep saves it and exits 143 (as train.py), without evaluating
  the half-trained run on test or putting it in the table; a rerun resumes it."""
  cmd = _sweep_command(tmp_path, "--set", "train.num_epochs=1000")
  with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True) as proc:
    workdir = tmp_path / "runs" / "synthetic" / MODELS[0] / "seed0" / "p1.0"
    deadline = time.time() + 300
    while not (workdir / "tensorboard").exists() and proc.poll() is None:
      assert time.time() < deadline, "the first run did not start"
      time.sleep(0.5)
    time.sleep(2)  # into the training loop
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 143, out[-3000:]
  assert "checkpoint saved" in out
  assert not (workdir / "eval" / "test.json").exists()
  assert not (tmp_path / "out" / "synthetic.json").exists()


def test_tuned_sweep_gives_every_model_the_same_budget(tmp_path):
  result = _sweep(tmp_path, "--tune", "2", "--tune_fixed", "train.batch_size", "--seeds", "1")
  assert result.returncode == 0, result.stderr[-3000:]
  tuned = json.loads((tmp_path / "out" / "synthetic_tuned.json").read_text())
  assert tuned["trials_per_model"] == 2 and tuned["fixed"] == ["train.batch_size"]
  assert {m: tuned["models"][f"{m}/p1.0"]["trials"] for m in MODELS} == {m: 2 for m in MODELS}
  # Each model's study is kept with the tables (a rerun from them alone trains no trial again).
  assert sorted(p.name for p in (tmp_path / "out" / "synthetic_tuning").iterdir()) == [
      f"{m}_p1.0.jsonl" for m in sorted(MODELS)]
  # The seed runs use the chosen parameters, in workdirs of their own.
  for model in MODELS:
    config = json.loads((tmp_path / "runs" / "synthetic" / model / "tuned" / "seed0" / "p1.0" /
                         "config.json").read_text())
    params = tuned["models"][f"{model}/p1.0"]["params"]
    assert config["optimizer"]["learning_rate"] == params["optimizer.learning_rate"]
    assert config["model"]["embed_dim"] == params["model.embed_dim"]
  assert "tuned first with the same budget: 2 Optuna trials" in (
      tmp_path / "out" / "synthetic.md").read_text()

  # --report_only: the same table from the studies' choices and the record, training nothing;
  # a budget the studies do not hold yet is refused, one line, nothing written.
  table = (tmp_path / "out" / "synthetic.json").read_text()
  shutil.rmtree(tmp_path / "runs")
  (tmp_path / "out" / "synthetic.json").unlink()
  report = _sweep(tmp_path, "--tune", "2", "--tune_fixed", "train.batch_size", "--seeds", "1",
                  "--report_only")
  assert report.returncode == 0, report.stderr[-3000:]
  assert _trained(report.stdout) == [] and not (tmp_path / "runs").exists()
  assert (tmp_path / "out" / "synthetic.json").read_text() == table
  before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
  more = _sweep(tmp_path, "--tune", "3", "--tune_fixed", "train.batch_size", "--seeds", "1",
                "--report_only")
  assert more.returncode == 1 and "Traceback" not in more.stderr, more.stderr[-3000:]
  assert "holds 2 of its 3 trials; run the tuning to its end first" in more.stderr
  assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
  assert not (tmp_path / "runs").exists()
  # The studies hold their budget but the record is gone: refused, nothing written.
  (tmp_path / "out" / "synthetic_runs.json").unlink()
  (tmp_path / "out" / "synthetic_tuned.json").unlink()
  no_record = _sweep(tmp_path, "--tune", "2", "--tune_fixed", "train.batch_size", "--seeds", "1",
                     "--report_only")
  assert no_record.returncode == 1 and "records no run of this sweep" in no_record.stderr
  assert not (tmp_path / "out" / "synthetic_tuned.json").exists()


def test_balancing_sweep_rows_and_partial_table(tmp_path):
  """--balancings: one row per (model, method), each run trained with its method; the table
  after each round of seeds says how many seeds it holds."""
  result = _sweep(tmp_path, "--balancings", "fixed,pcgrad", "--seeds", "1", "--models", "mmoe")
  assert result.returncode == 0, result.stderr[-3000:]
  table = json.loads((tmp_path / "out" / "synthetic.json").read_text())["1.0"]
  assert sorted(table) == ["mmoe/fixed", "mmoe/pcgrad"]
  for model in ("mmoe",):
    for method in ("fixed", "pcgrad"):
      config = json.loads((tmp_path / "runs" / "synthetic" / model / method / "seed0" / "p1.0" /
                           "config.json").read_text())
      assert config["train"]["balancing"] == method
  assert "One seed (0), so no spread" in (tmp_path / "out" / "synthetic.md").read_text()


def test_validation_table_reads_finished_runs_only(tmp_path):
  """benchmarks/validation_table.py: mean and sample std of each finished run's validation score
  and AUCs; a run without eval/test.json is counted as unfinished, not averaged."""
  scores = {"seed0": 0.9, "seed1": 0.8, "seed2": 0.1}
  for seed, score in scores.items():
    run = tmp_path / "v" / seed
    (run / "eval").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(
        {"best_validation_score": score, "best_validation": {"a": {"auc": score}}}))
    if seed != "seed2":
      (run / "eval" / "test.json").write_text("{}")
  out = subprocess.run([sys.executable, "benchmarks/validation_table.py", f"x={tmp_path / 'v'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  row = out.stdout.strip().splitlines()[-1]
  assert row == "| x | 2 (+1 unfinished) | 0.85000 ± 0.07071 | 0.85000 ± 0.07071 |"


def test_seed_table_compares_sweeps_over_their_common_seeds(tmp_path):
  """benchmarks/seed_table.py: each row over the seeds both sweeps hold (b lacks seed 2; --seeds
  leaves seed 3 out), the validation score read from the runs' metrics.json."""
  metric = {"a": {0: 0.1, 1: 0.3, 2: 0.9, 3: 0.9}, "b": {0: 0.2, 1: 0.6, 3: 0.9}}
  for name, by_seed in metric.items():
    record = {f"m/seed{k}": {"test": {"t": {"gap": v}, "u": {"auc": 0.5}}}
              for k, v in by_seed.items()}
    (tmp_path / f"{name}.json").write_text(json.dumps(record))
    for k, v in by_seed.items():
      (tmp_path / name / "m" / f"seed{k}").mkdir(parents=True)
      (tmp_path / name / "m" / f"seed{k}" / "metrics.json").write_text(
          json.dumps({"best_validation_score": 1 - v}))
  out = subprocess.run([sys.executable, "benchmarks/seed_table.py", "--metric", "gap",
                        "--seeds", "0,1,2", *(f"{n}={tmp_path / n}.json@{tmp_path / n}"
                                              for n in metric)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  header, _, row = out.stdout.strip().splitlines()
  assert header == ("| row | seeds | validation score, a | validation score, b | t gap, a | "
                    "t gap, b |")
  # a: 0.1, 0.3 -> 0.2 ± 0.1414; b: 0.2, 0.6 -> 0.4 ± 0.2828; validation scores 1 - those.
  assert row == ("| m | 2 | 0.8000 ± 0.1414 | 0.6000 ± 0.2828 | 0.2000 ± 0.1414 | "
                 "0.4000 ± 0.2828 |")


def test_plotting_after_every_run_keeps_no_figure_open(tmp_path, monkeypatch):
  """The sweep plots after every run: pyplot's figures, never closed, piled up (matplotlib
  warned past 20 in a 70-run sweep); the plot now leaves no figure behind."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))  # for benchmarks/machine.py
  spec = importlib.util.spec_from_file_location("quality",
                                                os.path.join(REPO, "benchmarks", "quality.py"))
  quality = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quality)
  row = {"tasks": {"income": {"auc": [0.95, 0.001]}, "marital": {"auc": [0.99, 0.001]}}}
  before = len(plt.get_fignums())
  for i in range(3):
    quality.plot({None: {"apem": row, "mmoe": row}}, str(tmp_path / f"{i}.png"), census=True)
    quality.plot({0.5: {"apem": {"tasks": {"a": {"mse": [1.0, 0.1]}, "b": {"mse": [2.0, 0.1]}}}}},
                 str(tmp_path / f"s{i}.png"), census=False)
  assert len(plt.get_fignums()) == before
  assert all((tmp_path / f"{n}{i}.png").stat().st_size > 0 for n in ("", "s") for i in range(3))


def test_flags_that_cannot_work_are_refused_before_anything_is_written(tmp_path):
  cases = {
      "seeds": (["--seeds", "0"], "--seeds=0: expected at least 1"),
      "budget": (["--tune", "-1"], "--tune=-1: expected 0 (no tuning) or a number of trials"),
      "model": (["--models", "mmoe,"], "--models: unknown ['']"),
      "fixed": (["--tune", "2", "--tune_fixed", "train.batchsize"],
                "fixed keys ['train.batchsize'] are not in shared_bottom's search space"),
      "set": (["--tune", "2"], "--set ['train.batch_size']: tuned for shared_bottom, which would "
                               "override the value; add the key to --tune_fixed to keep it"),
      "report": (["--tune", "2", "--tune_fixed", "train.batch_size", "--report_only"],
                 "tuning shared_bottom: no study at"),
      "no record": (["--report_only"], "synthetic_runs.json records no run of this sweep"),
      "balancing": (["--tune", "2", "--tune_fixed", "train.batch_size", "--balancings", "fixd"],
                    "config: train.balancing='fixd'; expected one of"),
  }
  running = {name: subprocess.Popen(_sweep_command(tmp_path, *extra), cwd=REPO, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (extra, _) in cases.items()}
  for name, (_, expected) in cases.items():
    _, stderr = running[name].communicate(timeout=300)
    assert running[name].returncode == 1, (name, stderr[-2000:])
    assert expected in stderr and "Traceback" not in stderr, (name, stderr[-2000:])
  assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def _seed_table(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "benchmarks/seed_table.py", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=60)


def _write_seed_sweep(tmp_path, name: str, runs: dict[str, float]) -> str:
  """A record (and run directories) of ``runs``: run name -> test gap of task t (and 1 - gap as
  the validation score); returns the ``NAME=RECORD@RUNS`` argument."""
  record = {run: {"test": {"t": {"gap": v}, "u": {"auc": 0.5}}} for run, v in runs.items()}
  (tmp_path / f"{name}.json").write_text(json.dumps(record))
  for run, v in runs.items():
    (tmp_path / name / run).mkdir(parents=True)
    (tmp_path / name / run / "metrics.json").write_text(
        json.dumps({"best_validation_score": 1 - v}))
  return f"{name}={tmp_path / name}.json@{tmp_path / name}"


def test_seed_table_rows_of_runs_named_past_their_seed(tmp_path):
  """quality.py names runs <model>[/<balancing>]/seed<k>[/p<corr>][/<mode>]: a synthetic run
  (m/b/seed0/p0.5) is row m/b/p0.5 and a funnel run with a mode (m/seed0/ctr_cvr) row m/ctr_cvr,
  each compared over its seeds with its own run directories (they were dropped)."""
  runs = {"m/b/seed0/p0.5": 0.1, "m/b/seed1/p0.5": 0.3, "m/seed0/ctr_cvr": 0.2,
          "m/seed1/ctr_cvr": 0.6}
  out = _seed_table("--metric", "gap", "--tasks", "t", _write_seed_sweep(tmp_path, "a", runs),
                    _write_seed_sweep(tmp_path, "b", runs))
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip().splitlines()[2:] == [
      "| m/b/p0.5 | 2 | 0.8000 ± 0.1414 | 0.8000 ± 0.1414 | 0.2000 ± 0.1414 | 0.2000 ± 0.1414 |",
      "| m/ctr_cvr | 2 | 0.6000 ± 0.2828 | 0.6000 ± 0.2828 | 0.4000 ± 0.2828 | 0.4000 ± 0.2828 |"]


def test_seed_table_refuses_what_the_sweeps_cannot_give_in_one_line(tmp_path):
  """No common seed (--seeds, or rows named differently), a metric or task the records lack: a
  usage error naming what is there, not a traceback or a table without its columns."""
  a = _write_seed_sweep(tmp_path, "a", {"m/seed0": 0.1, "m/seed1": 0.3})
  b = _write_seed_sweep(tmp_path, "b", {"m/tuned/seed0": 0.1})
  cases = {
      "seeds": (["--seeds", "7", a, a], "no row has a seed that every sweep holds among --seeds "
                                        "[7]: a holds m (seeds [0, 1]); a holds m (seeds [0, 1])"),
      "rows": ([a, b], "no row has a seed that every sweep holds: a holds m (seeds [0, 1]); "
                       "b holds m/tuned (seeds [0])"),
      "metric": (["--metric", "AUC", a, a], "--metric 'AUC': no task of row 'm' in sweep 'a' has "
                                            "it; its metrics: ['auc', 'gap']"),
      "task metric": (["--tasks", "t", a, a], "--metric 'auc': task 't' of row 'm' in sweep 'a' "
                                              "has only ['gap']"),
      "tasks": (["--tasks", "click,buy", a, a], "--tasks: sweep 'a' has no task 'click' in row "
                                                "'m'; its tasks: ['t', 'u']"),
  }
  for name, (args, expected) in cases.items():
    out = _seed_table(*args)
    assert out.returncode == 2, (name, out.stdout, out.stderr)
    assert out.stderr.strip().splitlines()[-1] == f"seed_table.py: error: {expected}", name
    assert "Traceback" not in out.stderr and not out.stdout, name


def _write_validation_run(run, best_validation: dict, score: float = 0.5) -> None:
  (run / "eval").mkdir(parents=True)
  (run / "metrics.json").write_text(json.dumps(
      {"best_validation_score": score, "best_validation": best_validation}))
  (run / "eval" / "test.json").write_text("{}")


def _validation_table(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "benchmarks/validation_table.py", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=60)


def test_validation_table_shows_mse_of_a_regression_task(tmp_path):
  for seed, v in ((0, 1.0), (1, 2.0)):
    _write_validation_run(tmp_path / "v" / f"seed{seed}",
                          {"a": {"auc": v / 4, "loss": 1.0}, "y": {"mse": v, "mae": 0.0}})
  out = _validation_table(f"x={tmp_path / 'v'}")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip().splitlines() == [
      "| variant | runs | validation score | a AUC | y MSE |", "|---|---:|---:|---:|---:|",
      "| x | 2 | 0.50000 ± 0.00000 | 0.37500 ± 0.17678 | 1.50000 ± 0.70711 |"]


def test_validation_table_finds_runs_below_their_seed_and_refuses_a_dir_without_runs(tmp_path):
  """quality.py's synthetic runs are seed<k>/p<corr>/ (they were read as no run at all); a DIR
  without runs is an error naming it rather than a row of nothing; with no task the header and
  its separator have as many columns."""
  for seed, score in ((0, 0.9), (1, 0.8)):
    _write_validation_run(tmp_path / "v" / f"seed{seed}" / "p0.5", {"a": {"auc": score}}, score)
  _write_validation_run(tmp_path / "w" / "seed0", {})
  out = _validation_table(f"x={tmp_path / 'v'}", f"y={tmp_path / 'w'}")
  assert out.returncode == 0, out.stderr
  header, separator, *rows = out.stdout.strip().splitlines()
  assert rows == ["| x | 2 | 0.85000 ± 0.07071 | 0.85000 ± 0.07071 |", "| y | 1 | 0.50000 | - |"]
  (tmp_path / "empty" / "seed0").mkdir(parents=True)
  out = _validation_table(f"x={tmp_path / 'empty'}")
  assert out.returncode == 2 and not out.stdout and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      f"validation_table.py: error: argument NAME=DIR: 'x={tmp_path / 'empty'}': no run "
      f"(seed*/.../metrics.json) under {tmp_path / 'empty'}")
  out = _validation_table(f"y={tmp_path / 'w'}")
  header, separator, row = out.stdout.strip().splitlines()
  assert header.count("|") == separator.count("|") == row.count("|") == 4, out.stdout
  # Two cells of a sweep under one DIR (p0.5, p1.0): a row each, never pooled.
  _write_validation_run(tmp_path / "v" / "seed0" / "p1.0", {"a": {"auc": 0.1}}, 0.1)
  out = _validation_table(f"x={tmp_path / 'v'}")
  assert out.stdout.strip().splitlines()[2:] == [
      "| x p0.5 | 2 | 0.85000 ± 0.07071 | 0.85000 ± 0.07071 |", "| x p1.0 | 1 | 0.10000 | 0.10000 |"]
