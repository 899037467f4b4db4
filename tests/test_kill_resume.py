"""Runs killed as schedulers and crashes kill them, restarted with the same command, end
bit-identical to an uninterrupted run: parameters, optimizer state and every validation metric.

Real ``train.py`` processes: one uninterrupted; one killed with SIGKILL at three moments (mid-epoch
after a train step, while a checkpoint is being written in the background, and after an
evaluation before its checkpoint) and stopped once by SIGTERM (which saves a checkpoint and exits
with 143), restarted after each; two processes joined by ``jax.distributed``, one of them sent
SIGTERM.
``benchmarks/kill_resume.py`` kills at random moments instead.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import chex
import pytest

from apem_jax import checkpointing, trainer
from test_trainer import _metrics, tiny_mlp_config, write_config_file
import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  config = tiny_mlp_config()
  config.train.checkpoint_every_steps = 7  # 3 epochs of 30 steps: saves at 7, 14, ..., 30, ...
  return config


@pytest.fixture(scope="module")
def places(tmp_path_factory):
  root = tmp_path_factory.mktemp("kills")
  config = write_config_file(root / "tiny.py", "test_kill_resume", "_config")
  places = dict(root=root, config=config, reference=str(root / "reference"))
  result = _train(places, places["reference"])
  assert result.returncode == 0, result.stderr[-3000:]
  return places


def _train(places, workdir, kill_at=None) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if kill_at:
    env["APEM_JAX_KILL_AT"] = kill_at
  return subprocess.run([sys.executable, "train.py", f"--config={places['config']}",
                         f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)


def _final(workdir):
  config = _config()
  ckpt = checkpointing.Checkpoints(workdir, read_only=True)
  state, meta = ckpt.restore(trainer.Experiment(config).abstract_state)
  ckpt.close()
  with open(os.path.join(workdir, "metrics.json")) as f:
    summary = json.load(f)
  return state, meta, summary


def _assert_same_run(workdir, reference):
  state, meta, summary = _final(workdir)
  expected_state, expected_meta, expected = _final(reference)
  assert meta["step"] == expected_meta["step"] == 90
  chex.assert_trees_all_equal(state, expected_state)  # bit for bit
  assert _metrics(summary) == _metrics(expected) and len(expected["history"]) == 3
  assert summary["best_step"] == expected["best_step"]


def _stop_with(places, workdir, sig, after: str) -> int:
  """Runs the command, sends ``sig`` once it printed a line starting with ``after``; checks it
  saved and exited ``128 + sig``; returns the step it stopped at."""
  process = subprocess.Popen(
      [sys.executable, "train.py", f"--config={places['config']}", f"--workdir={workdir}"],
      cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  lines = []
  for line in process.stdout:  # an evaluation line: training is under way
    lines.append(line)
    if line.startswith(after):
      process.send_signal(sig)
      break
  out, err = process.communicate(timeout=600)
  out = "".join(lines) + out
  assert process.returncode == 128 + sig, (sig, out[-2000:], err[-3000:])
  stopped = [l for l in out.splitlines() if l.startswith("Stopped at step")]
  assert stopped and f"({sig.name}); checkpoint saved" in stopped[0], out[-2000:]
  step = int(stopped[0].split()[3])
  assert checkpointing.Checkpoints(workdir, read_only=True).step_of() == step
  return step


def test_killed_at_three_moments_and_stopped_by_sigterm_ends_bit_identical(places):
  """SIGKILL mid-epoch (after step 17), while the checkpoint of step 30 is being written in the
  background, and after the evaluation of step 90 before its checkpoint; SIGTERM after the
  evaluation of step 60 (exit 143, a checkpoint of the step it stopped at). Each time the same
  command restarts the run; it ends bit-identical to the uninterrupted one."""
  workdir = str(places["root"] / "killed")
  for moment in ("step:17", "save:30"):
    result = _train(places, workdir, kill_at=moment)
    assert result.returncode == -signal.SIGKILL, (moment, result.stderr[-3000:])
  assert 60 <= _stop_with(places, workdir, signal.SIGTERM, "step 60 ") < 90
  result = _train(places, workdir, kill_at="evaluate:90")
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  result = _train(places, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resuming from" in result.stdout
  _assert_same_run(workdir, places["reference"])


def test_sigterm_while_the_last_save_is_written_lets_it_finish(places):
  """SIGTERM after the last step, while the run waits for its checkpoint to be written in the
  background: the save finishes, the run is stopped as by any SIGTERM (exit 143, before the
  test evaluation), and the same command then finds it finished."""
  workdir = str(places["root"] / "term_in_close")
  script = (
      "import os, runpy, signal, sys\n"
      "from apem_jax import checkpointing\n"
      "close = checkpointing.Checkpoints.close\n"
      "def close_after_sigterm(self):\n"
      "  if not self._read_only:\n"
      "    os.kill(os.getpid(), signal.SIGTERM)\n"
      "  close(self)\n"
      "checkpointing.Checkpoints.close = close_after_sigterm\n"
      "sys.argv = ['train.py'] + sys.argv[1:]\n"
      "runpy.run_path('train.py', run_name='__main__')\n")
  result = subprocess.run([sys.executable, "-c", script, f"--config={places['config']}",
                           f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
  assert result.returncode == 128 + signal.SIGTERM, (result.stdout[-2000:], result.stderr[-3000:])
  assert "Stopped at step 90 (SIGTERM); checkpoint saved" in result.stdout
  assert checkpointing.Checkpoints(workdir, read_only=True).step_of() == 90
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "90"  # no partial one
  again = _train(places, workdir)
  assert again.returncode == 0 and "Resuming from" in again.stdout, again.stderr[-3000:]
  _assert_same_run(workdir, places["reference"])


def test_sigint_asks_to_stop_and_a_second_one_interrupts_at_once():
  """Ctrl-C (SIGINT) is a stop request like SIGTERM (the loop saves and the command exits 130);
  a second Ctrl-C raises KeyboardInterrupt at once. The handlers are restored afterwards."""
  before = signal.getsignal(signal.SIGINT)
  with trainer.StopRequests() as requests:
    os.kill(os.getpid(), signal.SIGINT)
    assert requests.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is before


def test_a_preemption_notice_to_one_of_two_processes_stops_both_at_the_same_step(places):
  """Two ``train.py`` processes joined by ``jax.distributed`` (2 CPU devices each): SIGTERM to
  process 1 reaches JAX's preemption service, both processes save the step Orbax's
  ``reached_preemption`` agrees on and exit 143. (Resuming is the one-process code: above.)"""
  workdir = str(places["root"] / "two_processes")
  port = _free_port()
  env = xla_env.with_devices(2, PYTHONUNBUFFERED="1")

  def launch():
    return [subprocess.Popen(
        [sys.executable, "train.py", f"--config={places['config']}", f"--workdir={workdir}",
         f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]

  processes = launch()
  lines = []
  for line in processes[0].stdout:
    lines.append(line)
    if line.startswith("step 30 "):
      processes[1].send_signal(signal.SIGTERM)
      break
  outputs = ["".join(lines) + processes[0].communicate(timeout=600)[0],
             processes[1].communicate(timeout=600)[0]]
  codes = [process.returncode for process in processes]
  assert codes == [128 + signal.SIGTERM] * 2, "\n\n".join(
      f"process {i} (exit {code}):\n{out[-3000:]}" for i, (code, out) in
      enumerate(zip(codes, outputs)))  # both, since one's failure may be the other's exit
  stops = []
  for out in outputs:
    stops += [int(l.split()[3]) for l in out.splitlines() if l.startswith("Stopped at step")]
  assert len(stops) == 2 and stops[0] == stops[1], outputs
  assert checkpointing.Checkpoints(workdir, read_only=True).step_of() == stops[0]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]
