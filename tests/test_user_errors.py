"""A corpus of user mistakes, each run as a user would run it: through the command lines.

Every case must exit non-zero, say what is wrong (the key, file or flag, and what was expected)
in one line without a Python traceback, and leave every file it was pointed at as it was.
"""

import os
import shutil
import subprocess
import sys

import pytest

from apem_jax import trainer
from test_trainer import _scramble_data_files, _tree, tiny_mlp_config, write_config_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN = [sys.executable, "train.py"]
EVAL = [sys.executable, "eval.py"]
QUALITY = [sys.executable, "benchmarks/quality.py"]
EXPORT = [os.path.join(os.path.dirname(sys.executable), "apem-export")]

# (name, command (with the places of the fixture filled in), text the error must hold)
CASES = [
    ("non-positive epochs", TRAIN + ["--config={tiny}", "--workdir={new}",
                                     "--config.train.num_epochs=0"],
     "train.py: error: config: train.num_epochs=0 must be positive"),
    ("negative seed", TRAIN + ["--config={tiny}", "--workdir={new}", "--config.seed=-1"],
     r"train.py: error: config: seed=-1; expected an int in [0, 2**63)"),
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
    ("a second override without its flag (it would be dropped)",
     TRAIN + ["--config={tiny}", "--workdir={new}", "--config.train.num_epochs=1",
              "train.num_epochs=2"],
     "train.py: error: unexpected argument(s) 'train.num_epochs=2'"),
    ("two values after one --set", QUALITY + ["--models=apem", "--epochs=1", "--runs={new}",
                                              "--out={new}",
                                              "--set", "model.num_groups=4", "model.num_heads=1"],
     "benchmarks/quality.py: error: unexpected argument(s) 'model.num_heads=1'"),
    ("vmapped runs that cannot share a program", TRAIN + ["--config={tiny}", "--workdir={new}",
                                                          "--vmap=train.batch_size=8,16"],
     "train.py: error: vmap_runs: configs[1] differs from configs[0] in 'train.batch_size'"),
    ("resume that changes the trajectory", TRAIN + ["--config={tiny}", "--workdir={run}",
                                                    "--config.optimizer.learning_rate=0.01"],
     "keys change the run's trajectory: ['optimizer.learning_rate']"),
    ("eval of an empty workdir", EVAL + ["--config={tiny}", "--workdir={other}"],
     "eval.py: error: {other}: no best checkpoint"),
    ("eval of an unknown split", EVAL + ["--config={tiny}", "--workdir={run}", "--split=dev"],
     "eval.py: error: flag --split=dev: value should be one of <train|validation|test>"),
    ("eval with another model config", EVAL + ["--config={tiny}", "--workdir={run}",
                                               "--config.model.dropout=0.5"],
     "eval.py: error: {run}: its checkpoint was trained with a different config; differing keys: "
     "['model.dropout']"),
    ("export of a workdir without checkpoints", EXPORT + ["--workdir={other}", "--output={new}"],
     "apem-export: error: {other}: no best checkpoint"),
    ("export over a directory that is no export", EXPORT + ["--workdir={run}", "--output={other}",
                                                            "--overwrite"],
     "apem-export: error: --output {other} is a non-empty directory that holds no export"),
    ("export checked on no example", EXPORT + ["--workdir={run}", "--output={new}",
                                               "--check_examples=0"],
     "apem-export: error: --check_examples=0: the export checks need at least 1 validation "
     "example"),
    ("export for a platform that is none", EXPORT + ["--workdir={run}", "--output={new}/deep",
                                                     "--platforms=gpu"],
     "apem-export: error: --platforms=gpu: expected distinct names among cpu, cuda, rocm, tpu"),
    ("export for one platform twice", EXPORT + ["--workdir={run}", "--output={new}",
                                                "--platforms=cpu,cpu"],
     "apem-export: error: --platforms=cpu,cpu: expected distinct names"),
    ("export over an export", EXPORT + ["--workdir={run}", "--output={exported}"],
     "apem-export: error: --output {exported} already holds an export; pass --overwrite"),
    ("resume of a workdir whose every checkpoint is corrupt",
     TRAIN + ["--config={tiny}", "--workdir={corrupt}"],
     "train.py: error: {corrupt}: no checkpoint restores (checkpoint {corrupt}/checkpoints/30 "),
    ("eval of a corrupt checkpoint", EVAL + ["--config={tiny}", "--workdir={corrupt}"],
     "eval.py: error: checkpoint {corrupt}/checkpoints/30 "),
    ("eval of a deleted step", EVAL + ["--config={tiny}", "--workdir={deleted}", "--step=30"],
     "eval.py: error: no checkpoint at step 30 under {deleted}/checkpoints; available steps: "
     "[20]"),
    ("export of the best checkpoint, deleted", EXPORT + ["--workdir={deleted}", "--output={new}"],
     "apem-export: error: {deleted}: no best checkpoint under {deleted}/checkpoints; it has "
     "unevaluated checkpoints [20] (--checkpoint latest)"),
    ("an unknown key after a value that holds its name", TRAIN + [
        "--config={tiny}", "--workdir={new}", "--config.train.progress_bar=false",
        "--config.train.bar=3"],
     "train.py: error: --config.train.bar=3: the config has no key 'bar'"),
    ("an unknown section of the config", TRAIN + ["--config={tiny}", "--workdir={new}",
                                                  "--config.foo.bar=1"],
     "train.py: error: --config.foo.bar=1: the config has no key 'foo'"),
    ("a config file that does not exist", TRAIN + ["--config={root}/nope.py", "--workdir={new}"],
     "train.py: error: --config: Failed loading config file config_config"),
    ("a config file argument the file does not take", TRAIN + ["--config=configs/census.py:nosuch",
                                                               "--workdir={new}"],
     "train.py: error: flag --config=configs/census.py:nosuch: Error whilst parsing config file: "
     "ValueError: unknown model 'nosuch'"),
    ("a model where configs/spec.py takes the spec file (it trained APEM on a spec 'mmoe')",
     TRAIN + ["--config=configs/spec.py:mmoe", "--config.data.spec={root}/spec.json",
              "--workdir={new}"],
     "'mmoe' is a model, where the spec file goes; expected configs/spec.py:SPEC[,MODEL]"),
    ("a config file that is not Python", EVAL + ["--config={broken}", "--workdir={run}"],
     "eval.py: error: {broken}, line 1: invalid syntax"),
    ("a workdir that is a file", TRAIN + ["--config={tiny}", "--workdir={other}/notes.txt"],
     "train.py: error: workdir {other}/notes.txt is a file; expected a directory"),
    ("eval of a checkpoint with garbage metadata", EVAL + ["--config={tiny}",
                                                           "--workdir={garbage}"],
     "eval.py: error: checkpoint {garbage}/checkpoints/30 cannot be read"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
  root = tmp_path_factory.mktemp("user_errors")
  tiny = write_config_file(root / "tiny.py", "test_trainer", "tiny_mlp_config")
  config = tiny_mlp_config()
  config.train.update(num_epochs=1, checkpoint_every_steps=10)  # keeps steps 20 and 30 (best)
  run = str(root / "run")
  trainer.train_and_evaluate(config, run)
  other = root / "other"  # a directory a user made, holding a file of theirs
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  exported = root / "exported"  # what apem-export recognises as an export
  exported.mkdir()
  (exported / "metadata.json").write_text("{}")
  (exported / "saved_model").mkdir()
  damaged = {name: str(root / name) for name in ("corrupt", "deleted", "garbage")}
  for workdir in damaged.values():
    shutil.copytree(run, workdir)
  for step in (20, 30):
    _scramble_data_files(os.path.join(damaged["corrupt"], "checkpoints", str(step)))
  shutil.rmtree(os.path.join(damaged["deleted"], "checkpoints", "30"))
  with open(os.path.join(damaged["garbage"], "checkpoints", "30", "meta", "metadata"), "w") as f:
    f.write("{not json")
  broken = root / "broken.py"
  broken.write_text("def get_config(:\n")
  return dict(tiny=tiny, run=run, other=str(other), new=str(root / "new"), broken=str(broken),
              exported=str(exported), root=root, **damaged)


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
