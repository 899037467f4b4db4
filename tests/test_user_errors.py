"""A corpus of user mistakes, each run as a user would run it: through the command lines.

Every case must exit non-zero, say what is wrong (the key, file or flag, and what was expected)
in one line without a Python traceback, and leave every file it was pointed at as it was.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from apem_jax import trainer
from test_trainer import _tree, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")

TRAIN = [sys.executable, "train.py"]
EVAL = [sys.executable, "eval.py"]
EXPORT = [os.path.join(os.path.dirname(sys.executable), "apem-export")]

# (name, command (with {tiny}, {run}, {new} and {other} filled in), text the error must hold)
CASES = [
    ("non-positive epochs", TRAIN + ["--config={tiny}", "--workdir={new}",
                                     "--config.train.num_epochs=0"],
     "train.py: error: config: train.num_epochs=0 must be positive"),
    ("unknown model", TRAIN + ["--config={tiny}", "--workdir={new}",
                               "--config.model.name=transformer"],
     "train.py: error: unknown model 'transformer'"),
    ("unknown dataset", TRAIN + ["--config={tiny}", "--workdir={new}",
                                 "--config.data.name=imagenet"],
     "train.py: error: data.name"),
    ("batch not divisible by the devices", TRAIN + ["--config={tiny}", "--workdir={new}",
                                                    "--config.train.batch_size=60"],
     "train.py: error: train.batch_size=60 must be divisible by the data axis size 8"),
    ("value of the wrong type", TRAIN + ["--config={tiny}", "--workdir={new}",
                                         "--config.train.batch_size=abc"],
     "train.py: error: flag --config.train.batch_size=abc: invalid literal for int()"),
    ("unknown config key", TRAIN + ["--config={tiny}", "--workdir={new}",
                                    "--config.train.no_such_key=3"],
     "train.py: error: --config.train.no_such_key=3: the config has no key 'no_such_key'"),
    ("resume that changes the trajectory", TRAIN + ["--config={tiny}", "--workdir={run}",
                                                    "--config.optimizer.learning_rate=0.01"],
     "keys change the run's trajectory: ['optimizer.learning_rate']"),
    ("eval of an empty workdir", EVAL + ["--config={tiny}", "--workdir={other}"],
     "eval.py: error: {other}: no best checkpoint"),
    ("eval of an unknown split", EVAL + ["--config={tiny}", "--workdir={run}", "--split=dev"],
     "eval.py: error: flag --split=dev: value should be one of <train|validation|test>"),
    ("eval with another model config", EVAL + ["--config={tiny}", "--workdir={run}",
                                               "--config.model.num_groups=2"],
     "eval.py: error: {run}: its checkpoint was trained with a different config; differing keys: "
     "['model.num_groups']"),
    ("export of a workdir without checkpoints", EXPORT + ["--workdir={other}", "--output={new}"],
     "apem-export: error: {other}: no best checkpoint"),
    ("export over a directory that is no export", EXPORT + ["--workdir={run}", "--output={other}",
                                                            "--overwrite"],
     "apem-export: error: --output {other} is a non-empty directory that holds no export"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
  root = tmp_path_factory.mktemp("user_errors")
  tiny = root / "tiny.py"
  tiny.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {TESTS!r})
      from test_trainer import _tree, tiny_config

      def get_config():
        return tiny_config()
  """))
  config = tiny_config()
  config.train.num_epochs = 1
  run = str(root / "run")
  trainer.train_and_evaluate(config, run)
  other = root / "other"  # a directory a user made, holding a file of theirs
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  return dict(tiny=str(tiny), run=run, other=str(other), new=str(root / "new"), root=root)


def test_every_user_mistake_is_one_line_and_changes_nothing(places):
  before = _tree(str(places["root"]))
  running = {}
  for name, command, _ in CASES:
    argv = [part.format(**places) for part in command]
    running[name] = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
  failures = []
  for name, _, expected in CASES:
    _, stderr = running[name].communicate(timeout=600)
    expected = expected.format(**places)
    if (running[name].returncode == 0 or expected not in stderr
        or "Traceback (most recent call last)" in stderr):
      failures.append(f"{name}: exit {running[name].returncode}, expected {expected!r} in "
                      f"stderr:\n{stderr[-1500:]}")
  assert not failures, "\n\n".join(failures)
  assert not os.path.exists(places["new"])
  assert _tree(str(places["root"])) == before


def test_debug_shows_the_traceback(places):
  result = subprocess.run(TRAIN + [f"--config={places['tiny']}", f"--workdir={places['new']}",
                                   "--config.train.num_epochs=0", "--debug"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode != 0
  assert "Traceback (most recent call last)" in result.stderr
  assert "ValueError: config: train.num_epochs=0 must be positive" in result.stderr
