"""The ``apem-export`` command line (also ``python -m apem_jax.export_main``).

apem-export --workdir runs/census_apem --output exports/census_apem
  [--checkpoint best|latest] [--step N] [--config configs/census_apem.py] [--overwrite]
  [--platforms cpu,cuda] [--check_examples 256]

Flags live here rather than in :mod:`apem_jax.export` so that importing the library defines none.
"""

from __future__ import annotations

import json
import signal
from typing import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from apem_jax import cli, export as export_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_OUTPUT = flags.DEFINE_string("output", None, "The export directory to create.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint.")
_STEP = flags.DEFINE_integer("step", None, "A specific checkpoint step (default: the one --checkpoint names).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional: the config file the run was trained with; the export fails if it "
    "does not match the checkpoint's config (which is what the export uses).", lock_config=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing export at --output.")
_PLATFORMS = flags.DEFINE_list("platforms", ["cpu"],
                               "Platforms to lower for: any of cpu, cuda, rocm, tpu.")
_CHECK_EXAMPLES = flags.DEFINE_integer("check_examples", 256,
                                       "Validation examples the export checks run on.")
_DEBUG = flags.DEFINE_bool("debug", False,
                           "Show the traceback of a user error instead of one line.")
flags.mark_flags_as_required(["workdir", "output"])


def _exit_on_sigterm(signum: int, frame) -> None:
  raise SystemExit(128 + signum)  # the export removes its unfinished files as it unwinds


def _run(argv: Sequence[str]) -> None:
  del argv  # flags only (cli.flags_parser refuses anything else)
  logging.set_verbosity(logging.WARNING)
  signal.signal(signal.SIGTERM, _exit_on_sigterm)
  with cli.user_errors_in_one_line("apem-export", _DEBUG.value,
                                   also=(export_lib.ExportCheckError,)):
    meta = export_lib.export(
        _WORKDIR.value, _OUTPUT.value, checkpoint=_CHECKPOINT.value, step=_STEP.value,
        config=_CONFIG.value, overwrite=_OVERWRITE.value, platforms=tuple(_PLATFORMS.value),
        num_check_examples=_CHECK_EXAMPLES.value)
  checks, ckpt = meta["checks"], meta["checkpoint"]
  which = (f"the checkpoint of step {ckpt['step']}" if ckpt["kind"] == "step" else
           f"the {ckpt['kind']} checkpoint (step {ckpt['step']})")
  print(f"Exported {which} of {_WORKDIR.value} to {_OUTPUT.value}:")
  inputs = meta["saved_model"]["inputs"]
  strings = sum(spec["dtype"] == "string" for spec in inputs.values())
  print(f"  {export_lib.SAVED_MODEL_DIR}/  (signature {export_lib.SIGNATURE!r}: {len(inputs)} raw "
        f"features, {strings} string and {len(inputs) - strings} float32, each [None]; outputs "
        f"{', '.join(meta['saved_model']['outputs'])}, float32 [None])")
  print(f"  {export_lib.STABLEHLO_FILE}  (categorical int32 [b, "
        f"{meta['stablehlo']['inputs'][0]['shape'][1]}], numeric float32 [b, "
        f"{meta['stablehlo']['inputs'][1]['shape'][1]}] -> predictions float32 [b, "
        f"{len(meta['tasks'])}])")
  print(f"  {export_lib.METADATA_FILE}")
  print(f"Checked on a batch of {checks['examples']} validation examples: "
        f"max |diff| / max(1, |value|) vs JAX: SavedModel {checks['max_diff_saved_model']:.2e}, "
        f"StableHLO {checks['max_diff_stablehlo']:.2e} (tolerance {checks['tolerance']:g}).")
  if ckpt.get("validation"):
    print("Validation metrics of the checkpoint: " + json.dumps(ckpt["validation"]))


def main(argv: Sequence[str] | None = None) -> None:
  app.run(_run, argv=list(argv) if argv is not None else None,
          flags_parser=cli.flags_parser("apem-export"))


if __name__ == "__main__":
  main()
