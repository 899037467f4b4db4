"""Every command that the README and docs/ show runs in the `.venv` the README's commands create.

The commands are read from the documents themselves, so a newly documented command is covered
without editing this file. Each runs with ``--help`` (argument parsing and every import it
needs); what the commands do is tested elsewhere.
"""

import json
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# `python [-m module | script.py]`, optionally as `.venv/bin/python`, or a console script.
COMMAND = re.compile(r"\bpython3?\s+(-m\s+[\w.]+|[\w/]+\.py)|\b(apem-export|tensorboard|saved_model_cli)\b")
# Documented as running elsewhere than the project's .venv, with the reason.
OTHER_ENVIRONMENTS = {
    "benchmarks/rechub_mmoe.py": "its own venv with torch and torch-rechub "
                                 "(docs/performance_mmoe_vs_rechub.md)",
}


def documented_commands() -> list[str]:
  found = set()
  for path in DOCUMENTS:
    for match in COMMAND.finditer(path.read_text()):
      found.add(" ".join((match.group(1) or match.group(2)).split()))
  return sorted(found)


def _help_argv(command: str) -> list[str]:
  bin_dir = pathlib.Path(sys.executable).parent
  if command.startswith("-m "):
    return [sys.executable, "-m", command.split()[1], "--help"]
  if command.endswith(".py"):
    return [sys.executable, command, "--help"]
  if command == "saved_model_cli":  # its --help is per subcommand
    return [str(bin_dir / command), "show", "--help"]
  return [str(bin_dir / command), "--help"]


def test_documents_show_the_main_commands():
  assert {"train.py", "eval.py", "apem-export", "-m apem_jax.export_main", "tensorboard",
          "saved_model_cli", "benchmarks/quality.py", "benchmarks/throughput.py"} <= set(
              documented_commands())


def test_every_documented_command_runs_in_the_venv():
  commands = [c for c in documented_commands() if c not in OTHER_ENVIRONMENTS]
  # Started together: most of each command's time is importing JAX or TensorFlow.
  running = {c: subprocess.Popen(_help_argv(c), cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for c in commands}
  failures = []
  for command, process in running.items():
    output, _ = process.communicate(timeout=600)
    # absl's --help (train.py, eval.py, export, saved_model_cli) prints the flags, then exits 1.
    absl_help = process.returncode == 1 and output.rstrip().endswith(
        "Try --helpfull to get a list of all flags.")
    crashed = "Traceback (most recent call last)" in output
    if not (process.returncode == 0 or absl_help) or crashed or "--" not in output:
      failures.append(f"{command} (exit {process.returncode}): {output[-500:]}")
  assert not failures, "\n\n".join(failures)


def test_the_input_keys_are_flags_of_every_shipped_config_and_old_workdirs_lack_them():
  """``--config.data.stream=true`` (README) and the streamed input's keys are settable on every
  shipped config; left unset (None: the loader's default) they are no difference from the
  config of a workdir written before they existed."""
  from apem_jax import config_validation  # pylint: disable=g-import-not-at-top
  from apem_jax.configs import census, funnel, spec, synthetic  # pylint: disable=g-import-not-at-top
  for config in (census.get_config("mmoe"), funnel.get_config("esmm"),
                 synthetic.get_config("mmoe,0.5"), spec.get_config("s.json,apem")):
    keys = {"shard_rows", "stream", "shuffle_buffer", "stream_groups", "interleave_cycle"}
    assert keys <= set(config.data) and all(config.data[k] is None for k in keys)
    current = config.to_dict()
    saved = json.loads(json.dumps(current))
    for key in keys:
      del saved["data"][key]
    assert config_validation.saved_config_differences(saved, current) == []
    current["data"]["stream"] = True
    assert config_validation.saved_config_differences(saved, current) == ["data.stream"]
  result = subprocess.run([sys.executable, "train.py", "--config", "configs/census_apem.py",
                           "--workdir", "unused", "--config.data.stream=true",
                           "--config.data.shard_rows=1000", "--helpshort"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert "error" not in result.stderr, result.stderr[-2000:]
