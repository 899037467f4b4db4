"""The ``apem-data`` command line (also ``python -m apem_jax.data_main``): your own data files.

  apem-data infer FILES... --output spec.json [--format csv|parquet|tfrecord] [--rows 100000]
                           [--label COLUMN ...] [--overwrite]
      Reads a sample of the files and writes a starting dataset spec (apem_jax/data/spec.py) with
      what it guessed listed on stdout: edit it, then

  apem-data validate spec.json
      Checks the spec, that its files exist and that every file has exactly the spec's columns.

  apem-data prepare spec.json [--data_dir data] [--shard_rows 100000]
      Prepares the dataset (apem_jax/data/prepare.py) under <data_dir>/prepared/, or finds it
      prepared; train with ``--config configs/spec.py:spec.json[,MODEL]``.

A mistake in the spec or the data ends the command with one line, ``apem-data: error: ...``, and
exit status 1 (``--debug`` shows the traceback instead); a preparation that fails leaves nothing in
the cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from apem_jax import cli

PROGRAM = "apem-data"


class _Parser(argparse.ArgumentParser):
  """Usage errors in one line and exit status 1, as the project's other commands do."""

  def error(self, message):
    sys.exit(f"{PROGRAM}: error: {message} (`{self.prog} --help` lists the options)")


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog=PROGRAM, description="Dataset specs and preparation for your own data files.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Run `apem-data COMMAND --help` for a command's options.")
  parser.add_argument("--debug", action="store_true",
                      help="show the traceback of an error instead of one line")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                   parser_class=_Parser)

  infer = commands.add_parser("infer", help="write a starting spec from a sample of the files")
  infer.add_argument("files", nargs="+", metavar="FILES", help="data files or globs")
  infer.add_argument("--output", required=True, help="the spec file to write")
  infer.add_argument("--format", choices=["csv", "parquet", "tfrecord"], default=None,
                     help="the files' format (default: from the first file's name)")
  infer.add_argument("--rows", type=int, default=100_000, help="rows to sample")
  infer.add_argument("--label", action="append", default=[], metavar="COLUMN",
                     help="make this column a task whatever its name (repeatable)")
  infer.add_argument("--overwrite", action="store_true", help="replace an existing --output")

  validate = commands.add_parser("validate", help="check a spec and its files' columns")
  validate.add_argument("spec", help="the spec file")

  prepare = commands.add_parser("prepare", help="prepare the dataset a spec describes")
  prepare.add_argument("spec", help="the spec file")
  prepare.add_argument("--data_dir", default="data", help="the cache root (data.data_dir)")
  prepare.add_argument("--shard_rows", type=int, default=None, help="rows per TFRecord shard")
  return parser


def _infer(args) -> None:
  from apem_jax.data import infer  # pylint: disable=g-import-not-at-top
  if os.path.isdir(args.output):
    raise IsADirectoryError(f"--output {args.output} is a directory; expected the spec file's "
                            f"path")
  if os.path.exists(args.output) and not args.overwrite:
    raise FileExistsError(f"--output {args.output} exists; give --overwrite to replace it")
  output_dir = os.path.dirname(os.path.abspath(args.output))
  spec, notes = infer.infer_spec(args.files, output_dir=output_dir, file_format=args.format,
                                 sample_rows=args.rows, labels=args.label)
  tmp = args.output + ".tmp"
  with open(tmp, "w") as f:
    json.dump(spec, f, indent=2)
    f.write("\n")
  os.replace(tmp, args.output)
  print(f"wrote {args.output}: {len(spec['features'])} features, {len(spec['tasks'])} tasks. "
        f"What was guessed (check it, then edit the spec):")
  for note in notes:
    print(f"  {note}")


def _validate(args) -> None:
  from apem_jax.data import prepare, spec as spec_lib  # pylint: disable=g-import-not-at-top
  spec = spec_lib.load_spec(args.spec)
  files = prepare.check_files(spec)
  counts = ", ".join(f"{split}: {len(infos)}" for split, infos in files.items())
  print(f"{args.spec}: valid; {len(spec.features)} features, {len(spec.tasks)} tasks; files "
        f"({counts}) have the spec's columns")


def _prepare(args) -> None:
  from apem_jax.data import prepare  # pylint: disable=g-import-not-at-top
  kwargs = {} if args.shard_rows is None else {"shard_rows": args.shard_rows}
  result = prepare.prepare(args.spec, args.data_dir, **kwargs)
  meta = result.metadata
  rows = {s: v["rows"] for s, v in meta["splits"].items()}
  print(f"{'found' if result.reused else 'prepared'} {result.path}")
  print("  rows: " + ", ".join(f"{s} {n:,}" for s, n in rows.items()))
  dropped = meta["splits"]["train"]["inconsistent_funnel_dropped"]
  if dropped:
    print(f"  dropped {dropped:,} training rows with an inconsistent funnel")
  if not result.reused:
    t = meta["timing"]
    print(f"  pass 1 {t['pass1_rows'] / max(t['pass1_seconds'], 1e-9):,.0f} rows/s, pass 2 "
          f"{t['pass2_rows'] / max(t['pass2_seconds'], 1e-9):,.0f} rows/s, "
          f"{t['total_seconds']:.1f} s in all")


def _run(argv: Sequence[str] | None) -> None:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format=f"{PROGRAM}: %(message)s")
  command = {"infer": _infer, "validate": _validate, "prepare": _prepare}[args.command]
  with cli.user_errors_in_one_line(PROGRAM, args.debug, also=(OSError,)):
    command(args)


def main(argv: Sequence[str] | None = None) -> None:
  """The program (``argv=None``: the command line). Run as the program, it ends with
  ``os._exit`` once its output is flushed: Arrow's thread pools are torn down at interpreter exit
  with a race that now and then aborts the process ("terminate called without an active
  exception", apache/arrow#34314; seen here once in ~16 runs of a failing prepare), which
  would turn exit status 0 or 1 into 134. Given ``argv``, it returns or raises as a function."""
  if argv is not None:
    _run(argv)
    return
  status = 0
  try:
    _run(None)
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      status = e.code or 0
    else:
      print(e.code, file=sys.stderr)
      status = 1
  except BaseException:  # a bug: its traceback, then the usual status
    import traceback  # pylint: disable=g-import-not-at-top
    traceback.print_exc()
    status = 1
  sys.stdout.flush()
  sys.stderr.flush()
  logging.shutdown()
  os._exit(status)  # pylint: disable=protected-access


if __name__ == "__main__":
  main()
