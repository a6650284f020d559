"""eval.py's checks of its flags, made before any work starts: output paths
that cannot be written, a --state file that is not one, a --transfer-from run
whose model takes other images."""

import zipfile
from pathlib import Path

import numpy as np

from jaxrobust import checks, cli, interop
from jaxrobust.interop import flax_files
from jaxrobust.training import checkpoints
from jaxrobust.programs import eval_flags as opts


def check_outputs() -> None:
  """Refuses output files that cannot be written, before any work starts:
  --out, --plot, --state (and a --state file that is not one), --export-torch."""
  for flag, holder in (
    ("--out", opts.OUT),
    ("--plot", opts.PLOT),
    ("--state", opts.STATE),
    ("--save-adversarial", opts.SAVE_ADVERSARIAL),
  ):
    if holder.value is not None:
      cli.check_output_file(flag, holder.value)
  if opts.STATE.value is not None:
    check_state_file(Path(opts.STATE.value))
  if opts.EXPORT.value is not None:
    cli.check_output_file("--export-torch", opts.EXPORT.value)
    interop.check_export_path(opts.EXPORT.value)
  if opts.EXPORT_FLAX.value is not None:
    checks.require(not opts.EXPORT.value, "give either --export-torch or --export-flax, not both")
    flax_files.check_new_directory(opts.EXPORT_FLAX.value, "--export-flax")


def check_state_file(path: Path) -> None:
  """Refuses an existing --state file that is not an evaluation's state (an
  .npz archive that --state wrote), before it is read or overwritten."""
  if not path.exists():
    return
  try:
    with np.load(path, allow_pickle=False) as archive:
      valid = "__fingerprint__" in archive.files
  except (OSError, ValueError, EOFError, AttributeError, zipfile.BadZipFile):
    valid = False  # not an archive (AttributeError: a single .npy array)
  checks.require(
    valid,
    f"--state {str(path)!r} is not a valid evaluation state file (one that --state "
    "wrote); give a new path, or delete it",
  )


def check_transfer_source(source: str | Path, target: str | Path) -> None:
  """Refuses a --transfer-from run whose model takes other images (shape,
  channels) or classes than the model of --workdir: its adversarial examples
  would not fit the model evaluated."""
  theirs = checkpoints.load_config(source)["dataset"]
  ours = checkpoints.load_config(target)["dataset"]
  described = lambda d: (
    f"{'x'.join(map(str, d['input_shape']))} images and {d['num_classes']} classes"
  )
  checks.require(
    list(theirs["input_shape"]) == list(ours["input_shape"])
    and theirs["num_classes"] == ours["num_classes"],
    f"--transfer-from {str(source)!r} has a model of {described(theirs)}; --workdir "
    f"{str(target)!r} has one of {described(ours)}: transfer needs the same images and classes",
  )
