"""The benchmark scripts refuse a bad flag in one line (``script.py: error: ...``, no traceback)
before they measure, compile or write anything."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (benchmarks/ script and its arguments ({out}: an empty folder, {python}: an interpreter that
# exists), the start of the error line it must print last)
CASES = [
    (["throughput.py", "--batch_sizes", "1k", "--out", "{out}/perf.md"],
     "throughput.py: error: argument --batch_sizes: expected comma-separated positive integers, "
     "got '1k'"),
    (["throughput.py", "--models", "foo", "--out", "{out}/perf.md"],
     "throughput.py: error: argument --models: expected distinct comma-separated names among "
     "apem, "),
    (["throughput.py", "--reps", "0", "--out", "{out}/perf.md"],
     "throughput.py: error: argument --reps: expected an integer >= 1, got '0'"),
    (["throughput.py", "--ablations", "se=false|tower_input=pooledd", "--out", "{out}/perf.md"],
     "throughput.py: error: --ablations: model config 'tower_input' must be one of "
     "['pooled', 'flat'], got 'pooledd'"),
    (["throughput.py", "--models", "mmoe", "--batch_sizes", "512", "--rechub_python", "{python}",
      "--out", "{out}/perf.md"],
     "throughput.py: error: --rechub_batch=1024 is not among the batch sizes of ['mmoe']"),
    (["gpu_step.py", "--models", "mmoe,foo", "--json", "{out}/rows.json"],
     "gpu_step.py: error: argument --models: expected distinct comma-separated names among "),
    (["gpu_step.py", "--reps", "0", "--json", "{out}/rows.json"],
     "gpu_step.py: error: argument --reps: expected an integer >= 1, got '0'"),
    (["gpu_step.py", "--dtypes", "float16", "--json", "{out}/rows.json"],
     "gpu_step.py: error: argument --dtypes: expected distinct comma-separated names among "
     "float32, bfloat16, got 'float16'"),
    (["vmap_seeds.py", "--set", "no.such=1"],
     "benchmarks/vmap_seeds.py: error: --set 'no.such=1': no config key 'no.such'"),
    (["vmap_seeds.py", "--workdir", "benchmarks"],
     "benchmarks/vmap_seeds.py: error: --workdir benchmarks exists and is not an empty directory"),
    (["solver_accuracy.py", "--max_tasks", "2"],
     "benchmarks/solver_accuracy.py: error: flag --max_tasks=2: 2 is not integer >= 3"),
    (["prepare_rate.py", "--formats", "json", "--rows", "10", "--dir", "{out}/rate"],
     "prepare_rate.py: error: argument --formats: expected distinct comma-separated names among "
     "csv, parquet, got 'json'"),
    (["embedding_optimizers.py", "--models", "foo"],
     "embedding_optimizers.py: error: argument --models: expected distinct comma-separated names"),
    (["balancing_cost.py", "--methods", "pcgard"],
     "balancing_cost.py: error: argument --methods: expected distinct comma-separated names "
     "among fixed, "),
    (["compile_flags.py", "--reps", "0"],
     "compile_flags.py: error: argument --reps: expected an integer >= 1, got '0'"),
]


def test_every_bad_flag_is_one_line_before_anything_runs(tmp_path):
  out, scratch = tmp_path / "out", tmp_path / "tmp"
  out.mkdir()
  scratch.mkdir()
  env = dict(os.environ, TMPDIR=str(scratch))  # a temporary file left behind shows there
  running = []
  for argv, expected in CASES:  # together: most of each one's time is importing JAX
    args = [a.format(out=out, python=sys.executable) for a in argv[1:]]
    running.append((argv, expected, subprocess.Popen(
        [sys.executable, os.path.join("benchmarks", argv[0]), *args], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
  failures = []
  for argv, expected, process in running:
    stdout, stderr = process.communicate(timeout=300)
    last = (stderr.strip().splitlines() or [""])[-1]
    if (process.returncode == 0 or not last.startswith(expected) or stdout
        or "Traceback (most recent call last)" in stderr):
      failures.append(f"{' '.join(argv)}: exit {process.returncode}, expected {expected!r} as the "
                      f"last line of stderr, nothing on stdout:\n{stdout[-500:]}{stderr[-1500:]}")
  assert not failures, "\n\n".join(failures)
  assert not list(out.iterdir()) and not list(scratch.iterdir())


def test_gpu_step_keeps_the_rows_measured_before_a_failure(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
  import gpu_step  # pylint: disable=g-import-not-at-top

  def bench(name, dtype, batch_size, schema, steps, reps):  # the second row runs out of memory
    if name == "apem":
      raise MemoryError("RESOURCE_EXHAUSTED")
    return {"model": name, "dtype": dtype, "batch": batch_size, "ms_per_step": 1.0,
            "examples_per_s": 1.0, "mflop_per_example": 1.0, "tflop_per_s": 1.0, "compile_s": 1.0}

  monkeypatch.setattr(gpu_step, "bench", bench)
  path = tmp_path / "rows.json"
  with pytest.raises(MemoryError):
    gpu_step.main(["--models", "mmoe,apem", "--dtypes", "float32", "--batch_sizes", "8",
                   "--json", str(path)])
  assert [r["model"] for r in json.loads(path.read_text())["rows"]] == ["mmoe"]
  assert os.listdir(tmp_path) == ["rows.json"]


def test_prepare_rate_leaves_no_files_in_its_temporary_directory(tmp_path):
  """Without --dir it left its generated CSV, spec and prepared cache in the temporary folder."""
  result = subprocess.run(
      [sys.executable, os.path.join("benchmarks", "prepare_rate.py"), "--rows", "3000",
       "--formats", "csv"], cwd=REPO, env=dict(os.environ, TMPDIR=str(tmp_path)),
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "| csv (" in result.stdout
  assert not list(tmp_path.iterdir())
