"""benchmarks/throughput.py's report: regenerating docs/performance.md rewrites its measured block
only (the dated, hand-written sections before it were lost, about 330 lines)."""

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raw(step_s: float) -> dict:
  row = {"model": "apem", "batch": 512, "step_s": step_s, "k": 32, "first_call_s": 7.8,
         "flops_per_step": 6.8e8, "pipe_s": 2.6e-4, "e2e_s": 0.026, "eval_s": 2.8,
         "traces": {"train_step": 1, "eval_step": 1}, "step_eps": 512 / step_s,
         "pipe_eps": 2.0e6, "e2e_eps": 19862.0, "flops_per_ex": 1.33e6, "achieved": 3.0e10}
  return {"command": "python benchmarks/throughput.py --reps 3", "now": "2026-12-02 12:48 UTC",
          "seconds": 209.1, "reps": 3, "target_s": 1.0, "profile_batch": 0, "rechub_batch": 1024,
          "cpu": "AMD EPYC, 2 cores, AVX-512", "cores": 2, "jax": "0.10.2", "backend": "cpu",
          "rows": [row], "profile": [], "rechub": None, "ceiling": 3.0e11,
          "side_by_side_batch": 0, "side_by_side": {}}


def _render(tmp_path, raw: dict, out) -> None:
  raw_path = tmp_path / "raw.json"
  raw_path.write_text(json.dumps(raw))
  result = subprocess.run([sys.executable, "benchmarks/throughput.py", "--render", str(raw_path),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


def test_regenerating_keeps_the_sections_before_and_after_the_measured_block(tmp_path):
  out = tmp_path / "performance.md"
  _render(tmp_path, _raw(0.0229), out)  # a new file: a title, the block, the analysis marker
  first = out.read_text()
  assert first.startswith("# Performance\n\n<!-- measured by") and "22,358" in first
  assert "| % of matmul | first call s |" in first and "| 7.8 |" in first
  out.write_text(first.replace("# Performance\n\n", "# Performance\n\n## Update: by hand\n\n")
                 + "\n## Analysis by hand\n")
  _render(tmp_path, _raw(0.0512), out)
  second = out.read_text()
  assert second.startswith("# Performance\n\n## Update: by hand\n\n<!-- measured by")
  assert second.endswith("\n## Analysis by hand\n")
  assert "10,000" in second and "22,358" not in second  # the block itself is the new run's


def test_a_timed_repetition_lasts_at_least_target_s(monkeypatch):
  """Whatever the step time it starts from (the warm-up's), a repetition runs steps until
  ``--target_s`` has passed (it stopped at 50 steps, well under the 1 s the report says)."""
  monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
  import throughput  # pylint: disable=g-import-not-at-top

  def run_k(k):  # 1 ms a step
    time.sleep(1e-3 * k)

  for first_step_s in (0.02, 1e-3, 5e-4):  # too slow, right, too fast
    seconds_per_step, steps = throughput.one_rep(run_k, first_step_s, 0.05)
    assert seconds_per_step * steps >= 0.05 and steps >= 2
  assert throughput.one_rep(run_k, 1e-3, 0.0)[1] == 1  # --target_s 0: one step
