"""`jaxrobust-data` (also `python -m jaxrobust.data`): data set tools.

  jaxrobust-data convert SOURCE OUT_DIR [--shard-size N] [--encoding raw|png|jpeg]
      [--splits train,test] [--overwrite] [--data-dir DIR]

writes SOURCE (any `jaxrobust.data.load` name) as a `records:` directory.
Bad input prints one line, `error: ...`, and exits with status 2, having
written nothing.
"""

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from jaxrobust.checks import InputError


class _Parser(argparse.ArgumentParser):
  """An argument parser whose errors are one line and exit status 2."""

  def error(self, message: str) -> NoReturn:
    print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
    raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
  """The command line's parser.

  Returns:
    The parser of `jaxrobust-data`.
  """
  from jaxrobust.data.convert import DEFAULT_SHARD_SIZE, ENCODINGS  # noqa: PLC0415

  main_parser = _Parser(prog="jaxrobust-data", description="jaxrobust's data set tools.")
  commands = main_parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  convert = commands.add_parser(
    "convert",
    help="write a data set as ArrayRecord shards (a records: directory)",
    description="Writes every split of SOURCE as ArrayRecord shards of uint8 images, with "
    "their labels and metadata.json, into OUT_DIR; train from it with "
    "--config.data.name=records:OUT_DIR.",
  )
  convert.add_argument(
    "source",
    metavar="SOURCE",
    help="digits, npz:<path>, idx:<dir>, folder:<path>, tfds:<name>, imagenet:<dir>",
  )
  convert.add_argument("out_dir", metavar="OUT_DIR", help="the directory to write")
  convert.add_argument(
    "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard"
  )
  convert.add_argument(
    "--encoding",
    choices=ENCODINGS,
    default=None,
    help="how images are stored: raw (default) or png; jpeg (the default for imagenet:) keeps "
    "the original files",
  )
  convert.add_argument("--splits", default="train,test", help="comma-separated splits")
  convert.add_argument(
    "--overwrite", action="store_true", help="replace a non-empty OUT_DIR (once complete)"
  )
  convert.add_argument("--data-dir", default=None, help="tensorflow-datasets' data directory")
  return main_parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `jaxrobust-data` with `argv` (default: the process's arguments).

  Args:
    argv: the arguments after the program's name.

  Returns:
    The exit status: 0, or 2 for bad input (after one `error:` line).
  """
  args = parser().parse_args(argv)
  from jaxrobust.data.convert import convert  # noqa: PLC0415

  try:
    out = convert(
      args.source,
      args.out_dir,
      shard_size=args.shard_size,
      encoding=args.encoding,
      splits=[s for s in args.splits.split(",") if s],
      overwrite=args.overwrite,
      data_dir=args.data_dir,
    )
  except InputError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(f"wrote records:{out}")
  return 0
